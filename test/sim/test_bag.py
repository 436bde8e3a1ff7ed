"""rosbag2 MCAP bags: a recorded embedded-world run reads back with our reader and with an independent MCAP
reader (mcap + mcap-ros2-support), bad bags fail clearly, and a recorder that fails never leaves a bag."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flad_core import codec
from flad_core.config import ConfigError
from flad_sim import bridge
from flad_sim.bag import (
    BagError,
    BagRecorder,
    RecordConfig,
    bag_info,
    bridge_topics,
    mcap_file,
    parse_topic_spec,
    read_bag,
    record_route,
)
from flad_sim.expert import ExpertAgent

ROLE = "hero"
SECONDS = 4.0
SMALL = {"seconds": SECONDS, "front_size": 32, "side_size": 16, "lidar_channels": 8, "lidar_azimuth_steps": 64,
         "sensor_every": 2}
CAMERAS = ("rgb_front", "rgb_left", "rgb_right", "rgb_rear")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A 4 s expert run on a small rig, recorded to MCAP."""
    out = tmp_path_factory.mktemp("bag") / "run"
    summary = record_route(RecordConfig(**SMALL), out, lambda w: ExpertAgent(w), "expert", privileged=True,
                           progress=False)
    return out, summary


def expected_topics() -> dict[str, str]:
    t = {bridge.topic(ROLE, c): "sensor_msgs/msg/Image" for c in CAMERAS}
    t.update({
        "/carla/hero/lidar": "sensor_msgs/msg/PointCloud2", "/carla/hero/gnss": "sensor_msgs/msg/NavSatFix",
        "/carla/hero/odometry": "nav_msgs/msg/Odometry", "/carla/hero/speedometer": "std_msgs/msg/Float32",
        "/carla/hero/vehicle_control_cmd": "carla_msgs/msg/CarlaEgoVehicleControl",
        "/carla/hero/navigation": "flad_msgs/msg/Navigation", "/carla/hero/driving_score": "flad_msgs/msg/DrivingScore",
        "/flad/hero/traffic_light": "flad_msgs/msg/TrafficLightState",
        "/flad/hero/expert_waypoints": "nav_msgs/msg/Path",
    })
    return t


def test_bag_reads_back_with_our_reader(recorded):
    bag, summary = recorded
    assert (bag / "metadata.yaml").is_file() and mcap_file(bag).suffix == ".mcap"
    info = bag_info(bag)
    want = expected_topics()
    # infractions appear only when one happened; everything else is always there
    assert set(want) <= set(info.topics) <= set(want) | {"/carla/hero/infraction"}
    for topic, typ in want.items():
        assert info.topics[topic].msgtype == typ, topic
    ticks = int(round(SECONDS / 0.05))
    frames = ticks // SMALL["sensor_every"]
    assert summary["ticks"] == ticks and summary["frames"] == frames
    for topic in ("/carla/hero/odometry", "/carla/hero/gnss", "/carla/hero/speedometer",
                  "/carla/hero/vehicle_control_cmd"):
        assert info.topics[topic].count == ticks, topic
    for topic in [bridge.topic(ROLE, c) for c in CAMERAS] + ["/carla/hero/lidar", "/carla/hero/navigation",
                                                             "/flad/hero/traffic_light"]:
        assert info.topics[topic].count == frames, topic
    # expert waypoints need 2.5 s of future: the route is unfinished after 4 s, so only the first 1.5 s have them
    assert summary["status"] == "running"
    assert info.topics["/flad/hero/expert_waypoints"].count == int(round((SECONDS - 2.5) / 0.1))
    assert info.topics["/carla/hero/driving_score"].count == 1
    # QoS per stream: sensors best effort, control reliable, the final score latched
    assert info.topics["/carla/hero/rgb_front/image"].qos[0]["reliability"] == "best_effort"
    assert info.topics["/carla/hero/odometry"].qos[0]["reliability"] == "best_effort"
    assert info.topics["/carla/hero/vehicle_control_cmd"].qos[0]["reliability"] == "reliable"
    assert info.topics["/carla/hero/driving_score"].qos[0]["durability"] == "transient_local"

    msgs = list(read_bag(bag))
    assert len(msgs) == info.message_count == summary["messages"]
    times = [m.time_ns for m in msgs]
    assert times == sorted(times)
    for m in msgs:
        assert m.msgtype == info.topics[m.topic].msgtype
        assert codec.normalize_type(m.msg.__msgtype__) == m.msgtype
    # every message of a frame is stamped with the frame's simulated time
    for m in msgs:
        if hasattr(m.msg, "header"):
            assert bridge.stamp_key(m.msg.header) <= m.time_ns
    last = msgs[-1]
    assert last.topic == "/carla/hero/driving_score" and last.msg.final
    assert last.msg.driving_score == pytest.approx(summary["ds"])
    assert last.msg.route_completion == pytest.approx(summary["rc"])
    img = bridge.image_from_msg(next(m.msg for m in msgs if m.topic == "/carla/hero/rgb_front/image"))
    assert img.shape == (32, 32, 3) and img.std() > 0
    pts = bridge.points_from_msg(next(m.msg for m in msgs if m.topic == "/carla/hero/lidar"))
    assert pts.shape[1] == 4 and 0 < len(pts) <= 8 * 64 and (pts[:, 3] >= 0).all()
    # the expert label of frame 0 is where the ego really was 0.5 .. 2.5 s later (its odometry, ego frame)
    odo = {m.time_ns: bridge.pose_from_odometry(m.msg) for m in msgs if m.topic == "/carla/hero/odometry"}
    wp0 = next(m for m in msgs if m.topic == "/flad/hero/expert_waypoints")
    keys = np.array(sorted(odo))

    def pose_at(t_ns: int) -> tuple[float, float, float]:
        k = int(keys[np.argmin(np.abs(keys - t_ns))])
        assert abs(k - t_ns) < 1_000_000       # the tick at that time (float time sums differ by a few ns)
        return odo[k]

    x0, y0, yaw0 = pose_at(wp0.time_ns)
    got = bridge.waypoints_from_path(wp0.msg)
    for k, (x, y) in enumerate(got):
        xw, yw, _ = pose_at(wp0.time_ns + int(round((k + 1) * 0.5e9)))
        dx, dy = xw - x0, yw - y0
        c, s = np.cos(yaw0), np.sin(yaw0)
        assert (x, y) == pytest.approx((c * dx + s * dy, -s * dx + c * dy), abs=1e-4)


def test_independent_mcap_reader_decodes_every_message(recorded):
    """mcap + mcap-ros2-support (no rosbags, no FLAD codec) decode the same file from its embedded schemas."""
    from mcap.reader import make_reader
    from mcap_ros2.decoder import DecoderFactory

    bag, _ = recorded
    ours = list(read_bag(bag))
    theirs = []
    with open(mcap_file(bag), "rb") as fh:
        reader = make_reader(fh, decoder_factories=[DecoderFactory()])
        for schema, channel, message, decoded in reader.iter_decoded_messages(log_time_order=True):
            theirs.append((channel.topic, schema.name, message.log_time, decoded, channel.metadata))
    assert len(theirs) == len(ours)
    counts_ours: dict[str, int] = {}
    counts_theirs: dict[str, int] = {}
    for m in ours:
        counts_ours[m.topic] = counts_ours.get(m.topic, 0) + 1
    for topic, *_ in theirs:
        counts_theirs[topic] = counts_theirs.get(topic, 0) + 1
    assert counts_theirs == counts_ours
    for m, (topic, schema, t, dec, meta) in zip(ours, theirs, strict=True):
        assert (topic, schema, t) == (m.topic, m.msgtype, m.time_ns)
        assert "offered_qos_profiles" in meta
        if topic == "/carla/hero/vehicle_control_cmd":
            assert (dec.throttle, dec.steer, dec.brake, dec.hand_brake) == (
                m.msg.throttle, m.msg.steer, m.msg.brake, m.msg.hand_brake)
        elif topic == "/carla/hero/rgb_front/image":
            assert (dec.height, dec.width, dec.encoding, dec.header.frame_id) == (32, 32, "bgra8", "hero/rgb_front")
            assert bytes(dec.data) == m.msg.data.tobytes()
        elif topic == "/carla/hero/lidar":
            assert [f.name for f in dec.fields] == ["x", "y", "z", "intensity"]
            assert bytes(dec.data) == m.msg.data.tobytes()
        elif topic == "/carla/hero/odometry":
            assert dec.pose.pose.position.x == m.msg.pose.pose.position.x
            assert dec.twist.twist.linear.x == m.msg.twist.twist.linear.x
        elif topic == "/carla/hero/navigation":
            assert (dec.instruction, dec.notice, dec.target_point.x) == (
                m.msg.instruction, m.msg.notice, m.msg.target_point.x)
            assert dec.instruction
        elif topic == "/flad/hero/expert_waypoints":
            assert [p.pose.position.x for p in dec.poses] == [p.pose.position.x for p in m.msg.poses]
            assert len(dec.poses) == 5
        elif topic == "/carla/hero/driving_score":
            assert (dec.route_id, dec.driving_score, dec.final) == (m.msg.route_id, m.msg.driving_score, True)
            assert len(dec.infractions) == len(m.msg.infractions)


def test_bad_bags_raise_bag_error_naming_the_file(recorded, tmp_path):
    bag, _ = recorded
    with pytest.raises(BagError, match="no such file"):
        list(read_bag(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BagError, match=r"no metadata\.yaml"):
        bag_info(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(BagError, match=r"notes\.txt"):
        list(read_bag(tmp_path / "notes.txt"))
    fake = tmp_path / "fake.mcap"
    fake.write_bytes(b"\x89MCAP0\r\n" + b"\0" * 100)
    with pytest.raises(BagError, match=r"fake\.mcap"):
        list(read_bag(fake))
    cut = tmp_path / "cut"
    shutil.copytree(bag, cut)
    f = mcap_file(cut)
    os.truncate(f, f.stat().st_size // 2)
    for path in (cut, f):
        with pytest.raises(BagError) as err:
            list(read_bag(path))
        assert f.name in str(err.value) and "truncated" in str(err.value)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_bytes_give_bag_error_or_valid_messages(recorded, tmp_path, data):
    """Whatever bytes are flipped or cut, reading either works (CDR decoded by our codec) or raises BagError."""
    bag, _ = recorded
    raw = bytearray(mcap_file(bag).read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[:data.draw(st.integers(0, len(raw) - 1), label="cut")]
    else:
        for _ in range(data.draw(st.integers(1, 8), label="flips")):
            i = data.draw(st.integers(0, len(raw) - 1), label="at")
            raw[i] ^= data.draw(st.integers(1, 255), label="xor")
    path = tmp_path / f"c{data.draw(st.integers(0, 10**9), label='name')}.mcap"
    path.write_bytes(bytes(raw))
    try:
        for m in read_bag(path):
            assert m.msg is not None
    except BagError as exc:
        assert path.name in str(exc)


def test_recorder_failure_leaves_no_bag(tmp_path):
    target = tmp_path / "bag"
    with pytest.raises(RuntimeError, match="boom"), BagRecorder(target) as rec:
        rec.write("/carla/hero/speedometer", codec.new("std_msgs/msg/Float32", data=1.0), 0)
        assert not target.exists()              # staged in a hidden folder until closed
        raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_run_recording_that_fails_midway_leaves_no_bag(tmp_path):
    target = tmp_path / "run"

    def extras(obs, t, frame):
        if frame == 5:
            raise RuntimeError("recorder hook failed")
        return []

    with pytest.raises(RuntimeError, match="recorder hook failed"):
        record_route(RecordConfig(**{**SMALL, "seconds": 2.0}), target, lambda w: ExpertAgent(w), "expert",
                     privileged=True, extras=extras, progress=False)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_recorder_never_overwrites(recorded):
    bag, _ = recorded
    with pytest.raises(BagError, match="exists already"):
        BagRecorder(bag).open()


def test_recorder_refuses_a_second_type_on_a_topic(tmp_path):
    with BagRecorder(tmp_path / "b") as rec:
        rec.write("/x", codec.new("std_msgs/msg/Float32", data=1.0), 0)
        with pytest.raises(BagError, match="/x is std_msgs/msg/Float32"):
            rec.write("/x", codec.new("std_msgs/msg/Header"), 1)
    assert [m.topic for m in read_bag(tmp_path / "b")] == ["/x"]


_name = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True)


@given(parts=st.lists(_name, min_size=1, max_size=4),
       typename=st.sampled_from(["nav_msgs/msg/Odometry", "sensor_msgs/Image", "flad_msgs/msg/Navigation",
                                 "carla_msgs/CarlaEgoVehicleControl"]))
def test_topic_spec_parses_valid_specs(parts, typename):
    topic = "/" + "/".join(parts)
    assert parse_topic_spec(f"{topic}:{typename}") == (topic, codec.normalize_type(typename))


@given(spec=st.text(max_size=60))
def test_topic_spec_rejects_garbage_with_config_error(spec):
    try:
        topic, typename = parse_topic_spec(spec)
    except ConfigError as exc:
        assert "topic" in str(exc)
    else:
        assert topic.startswith("/") and typename.count("/") == 2
        codec.message_class(typename)


def test_topic_spec_errors_name_the_problem():
    with pytest.raises(ConfigError, match="TOPIC:TYPE"):
        parse_topic_spec("/carla/hero/odometry")
    with pytest.raises(ConfigError, match="not an absolute ROS topic"):
        parse_topic_spec("carla/hero:nav_msgs/msg/Odometry")
    with pytest.raises(ConfigError, match="unknown message type"):
        parse_topic_spec("/x:nav_msgs/msg/Nope")


def test_cli_records_from_a_running_bus(tmp_path, port_base):
    """`flad bag record --from-bus` in a real process records what another process publishes on the hub."""
    from flad_core.bus import BusConfig, BusHub, ZmqBus

    cfg = BusConfig(hub_pub=f"tcp://127.0.0.1:{port_base}", hub_sub=f"tcp://127.0.0.1:{port_base + 1}")
    hub = BusHub(cfg)
    pub = ZmqBus("publisher", cfg)
    stop = threading.Event()

    def publish() -> None:
        i = 0
        while not stop.is_set():
            pub.publish("/carla/hero/speedometer", codec.new("std_msgs/msg/Float32", data=float(i)))
            pub.publish("/carla/hero/vehicle_control_cmd", bridge.control_msg(throttle=0.5, steer=-0.25))
            i += 1
            time.sleep(0.02)

    th = threading.Thread(target=publish, daemon=True)
    th.start()
    out = tmp_path / "busbag"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "flad_core.cli", "bag", "record", "--from-bus", "--hub-sub", cfg.hub_sub,
             "--topic", "/carla/hero/speedometer:std_msgs/msg/Float32",
             "--topic", "/carla/hero/vehicle_control_cmd:carla_msgs/CarlaEgoVehicleControl",
             "--seconds", "3", "--out", str(out), "--runs-dir", str(tmp_path / "runs"), "--no-progress"],
            capture_output=True, text=True, timeout=120)
    finally:
        stop.set()
        th.join(5)
        pub.close()
        hub.close()
    assert proc.returncode == 0, proc.stderr
    info = bag_info(out)
    assert set(info.topics) == {"/carla/hero/speedometer", "/carla/hero/vehicle_control_cmd"}
    msgs = list(read_bag(out))
    speeds = [m.msg.data for m in msgs if m.topic == "/carla/hero/speedometer"]
    assert len(speeds) > 10 and speeds == sorted(speeds)     # one publisher, in order
    ctl = [m.msg for m in msgs if m.topic == "/carla/hero/vehicle_control_cmd"]
    assert ctl and all((c.throttle, c.steer) == (0.5, -0.25) for c in ctl)
    assert info.topics["/carla/hero/speedometer"].qos[0]["reliability"] == "best_effort"
    assert info.topics["/carla/hero/vehicle_control_cmd"].qos[0]["reliability"] == "reliable"


def test_default_bus_topics_are_the_bridge_topics():
    t = bridge_topics("ego1", ("rgb_front",))
    assert t["/carla/ego1/rgb_front/image"] == "sensor_msgs/msg/Image"
    assert t["/carla/ego1/vehicle_control_cmd"] == "carla_msgs/msg/CarlaEgoVehicleControl"
    for typ in t.values():
        codec.message_class(typ)
