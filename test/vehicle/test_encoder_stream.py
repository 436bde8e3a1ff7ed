"""The encoder loop over a real ZeroMQ bus: a frame the world bridge publishes comes out as the encoder's features.

The features must equal the encoder run directly on the rendered frame (the dataset's format), so the trip
through carla-ros-bridge messages (bgra8 images, LiDAR without no-return rays, odometry, navigation) loses
nothing the encoder reads.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from flad_core.bus import BusConfig, BusHub, ZmqBus
from flad_core.config import ConfigError, from_dict
from flad_sim import bridge as B
from flad_sim.closed_loop import ClosedLoopWorld, WorldBridgeConfig
from flad_vehicle.encoder.stream import EncoderLoop, EncoderNodeConfig, load_encoder, pad_lidar


class _Collect:
    def __init__(self, bus: ZmqBus, topics: dict[str, str]) -> None:
        self.got: dict[str, list] = {t: [] for t in topics}
        self.cond = threading.Condition()
        for topic, typename in topics.items():
            bus.subscribe(topic, typename, lambda m, t=topic: self._on(t, m))

    def _on(self, topic: str, msg: object) -> None:
        with self.cond:
            self.got[topic].append(msg)
            self.cond.notify_all()

    def wait(self, topic: str, n: int = 1, timeout: float = 30.0) -> list:
        end = time.monotonic() + timeout
        with self.cond:
            while len(self.got[topic]) < n and time.monotonic() < end:
                self.cond.wait(0.1)
        return self.got[topic]


@pytest.mark.parametrize("source", ["edge", "encoder_head"])
def test_world_frame_to_features(port_base: int, source: str) -> None:
    cfg = BusConfig(hub_pub=f"tcp://127.0.0.1:{port_base}", hub_sub=f"tcp://127.0.0.1:{port_base + 1}")
    hub = BusHub(cfg)
    world_bus, car_bus, probe_bus = ZmqBus("world", cfg), ZmqBus("car", cfg), ZmqBus("probe", cfg)
    encoder = load_encoder("", seed=3)
    loop = EncoderLoop(car_bus, from_dict(EncoderNodeConfig, {"waypoint_source": source}), encoder=encoder)
    loop.start()
    probe = _Collect(probe_bus, {"/flad/v0/features": "flad_msgs/msg/EncodedFeatures",
                                 "/flad/v0/navigation": "flad_msgs/msg/Navigation",
                                 "/flad/v0/waypoints": "nav_msgs/msg/Path"})
    world = ClosedLoopWorld(world_bus, WorldBridgeConfig(expert_waypoints=False))
    try:
        for _ in range(3):                      # let the world move a little (and ZeroMQ connect)
            world.step()
        time.sleep(0.5)
        deadline = time.monotonic() + 30
        wanted = ["/flad/v0/features", "/flad/v0/navigation"] + (["/flad/v0/waypoints"] if source == "encoder_head"
                                                                  else [])
        while not all(probe.got[t] for t in wanted) and time.monotonic() < deadline:
            world.publish_frame()               # re-published until the subscriptions are up (same stamp)
            probe.wait("/flad/v0/features", len(probe.got["/flad/v0/features"]) + 1, 2.0)
        (feats,) = probe.wait("/flad/v0/features")[:1]
        # the same frame, straight from the world into the encoder
        ego = world.egos[0]
        obs = world.rig.observe(world.world.scene_view(ego.actor_id))
        labels = ego.labels.current(ego.scorer.progress)
        batch = {c: torch.from_numpy(obs[c])[None] for c in encoder.sensor_inputs if c != "lidar"}
        batch["lidar"] = torch.from_numpy(obs["lidar"])[None]
        batch["speed"] = torch.tensor([float(world.world.ego_state(ego.actor_id).speed)])
        batch["target_point"] = torch.from_numpy(np.asarray(labels["target_point"], np.float32))[None]
        with torch.no_grad():
            want = encoder(batch)
        got = np.frombuffer(np.asarray(feats.data, np.uint8).tobytes(), np.float32).reshape(tuple(feats.shape))
        assert feats.dtype == "float32" and tuple(feats.shape) == (31, 64) and feats.vehicle_id == "v0"
        np.testing.assert_allclose(got, want["features"][0].numpy(), atol=1e-4)
        assert B.stamp_key(feats.header) == B.time_key(world.world.time_s)
        nav = probe.wait("/flad/v0/navigation")[0]
        assert nav.instruction == labels["instruction"] and B.stamp_key(nav.header) == B.stamp_key(feats.header)
        if source == "encoder_head":
            path = probe.wait("/flad/v0/waypoints")[0]
            np.testing.assert_allclose(B.waypoints_from_path(path), want["pred.waypoints"][0].numpy(), atol=1e-4)
            assert B.stamp_key(path.header) == B.stamp_key(feats.header)
        else:
            time.sleep(0.3)
            assert probe.got["/flad/v0/waypoints"] == []     # the edge answers, not the encoder
    finally:
        loop.close()
        for b in (world_bus, car_bus, probe_bus, hub):
            b.close()


def test_pad_lidar_restores_the_fixed_size_with_no_return_rows() -> None:
    pts = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = pad_lidar(pts, 5)
    assert out.shape == (5, 4) and (out[:3] == pts).all() and (out[3:] == [0, 0, 0, -1]).all()
    assert pad_lidar(np.zeros((9, 4), np.float32), 5).shape == (5, 4)


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="waypoint_source"):
        from_dict(EncoderNodeConfig, {"waypoint_source": "expert"})
    with pytest.raises(ConfigError, match="threads"):
        from_dict(EncoderNodeConfig, {"threads": 0})
