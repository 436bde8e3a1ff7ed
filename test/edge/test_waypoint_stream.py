"""The edge waypoint node's logic over a real ZeroMQ bus: features of several vehicles in, one Path each out.

Predictions must equal the model's own `predict` on the same features and instruction (batched across
vehicles), stamped with the features' stamp; malformed features are rejected and counted without stopping
the others.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from flad_core.bus import BusConfig, BusHub, ZmqBus
from flad_core.config import ConfigError, from_dict
from flad_edge.celladapt.model import ADLLM
from flad_edge.celladapt.service import features_to_msg
from flad_edge.celladapt.stream import WaypointNodeConfig, WaypointStream
from flad_sim import bridge as B


def _nav(t: float, instruction: str, notice: str = "", target_point: tuple[float, float] = (10.0, 0.0)) -> object:
    labels = {"target_point": list(target_point), "command": 0, "instruction": instruction, "notice": notice,
              "route_s": 0.0}
    return B.navigation_msg(labels, t, "hero", 100.0)


def test_features_to_waypoints_for_several_vehicles(port_base: int) -> None:
    cfg = BusConfig(hub_pub=f"tcp://127.0.0.1:{port_base}", hub_sub=f"tcp://127.0.0.1:{port_base + 1}")
    hub = BusHub(cfg)
    edge_bus, car_bus = ZmqBus("edge", cfg), ZmqBus("cars", cfg)
    model = ADLLM.build("student")
    stream = WaypointStream(edge_bus, from_dict(WaypointNodeConfig, {"vehicle_ids": ["v0", "v1"], "max_wait_ms": 50.0}),
                            model=model)
    stream.start()
    got: dict[str, list] = {"v0": [], "v1": []}
    cond = threading.Condition()

    def on(vid: str, msg: object) -> None:
        with cond:
            got[vid].append(msg)
            cond.notify_all()

    for vid in got:
        car_bus.subscribe(f"/flad/{vid}/waypoints", "nav_msgs/msg/Path", lambda m, v=vid: on(v, m))
    rng = np.random.default_rng(0)
    feats = {v: rng.standard_normal((31, 64)).astype(np.float32) for v in got}
    texts = {"v0": ("turn left at the next intersection", "", (12.0, 6.0)),
             "v1": ("follow the lane", "red light ahead", (10.0, 0.0))}
    try:
        deadline = time.monotonic() + 30
        t = 1.0
        # navigation first, re-sent until the node has it: a frame whose navigation has not arrived (its
        # subscription not yet up) is answered with the default instruction, which is not what is checked here
        while not all(stream.has_navigation(v) for v in got) and time.monotonic() < deadline:
            for vid in got:
                car_bus.publish(f"/flad/{vid}/navigation", _nav(t, *texts[vid]))
            time.sleep(0.05)
        assert all(stream.has_navigation(v) for v in got)
        while not (got["v0"] and got["v1"]) and time.monotonic() < deadline:
            for vid in got:                     # re-sent (same stamp) until every subscription is up
                msg = features_to_msg(feats[vid], vid, 0)
                msg.header = B._header(t, f"{vid}/base_link")
                car_bus.publish(f"/flad/{vid}/features", msg)
            with cond:
                cond.wait(1.0)
        with torch.no_grad():
            want = model.predict(torch.from_numpy(np.stack([feats["v0"], feats["v1"]])),
                                 [texts["v0"][0], texts["v1"][0]], [texts["v0"][1], texts["v1"][1]],
                                 torch.tensor([texts["v0"][2], texts["v1"][2]])).numpy()
        for i, vid in enumerate(("v0", "v1")):
            path = got[vid][0]
            assert len(path.poses) == 5 and path.header.frame_id == f"{vid}/base_link"
            assert B.stamp_key(path.header) == B.time_key(1.0)
            np.testing.assert_allclose(B.waypoints_from_path(path), want[i], atol=1e-4)
        assert stream.rejected == 0
        # a malformed frame (wrong shape) is rejected and counted; the node keeps answering
        bad = features_to_msg(np.zeros((7, 64), np.float32), "v0", 1)
        car_bus.publish("/flad/v0/features", bad)
        good = features_to_msg(feats["v1"], "v1", 1)
        good.header = B._header(2.0, "v1/base_link")
        car_bus.publish("/flad/v1/features", good)
        end = time.monotonic() + 10
        with cond:
            while not any(B.stamp_key(p.header) == B.time_key(2.0) for p in got["v1"]) and time.monotonic() < end:
                cond.wait(0.2)
        assert any(B.stamp_key(p.header) == B.time_key(2.0) for p in got["v1"])
        assert stream.rejected == 1
    finally:
        stream.close()
        for b in (edge_bus, car_bus, hub):
            b.close()


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="vehicle_ids"):
        from_dict(WaypointNodeConfig, {"vehicle_ids": ["v0", "v0"]})
    with pytest.raises(ConfigError, match="preset"):
        from_dict(WaypointNodeConfig, {"preset": "huge"})
