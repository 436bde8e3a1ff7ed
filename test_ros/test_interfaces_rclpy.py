"""Our .msg files, the rosbags type store (flad_core.codec) and real ROS 2 agree byte for byte.

For every flad_msgs and carla_msgs type (and the standard types FLAD streams), hypothesis builds
messages from the type store; rclpy deserializes our CDR into its generated class with the same field
values and constants, and rclpy's own serialization of that message has the same length and the same
bytes (alignment padding aside: Fast-CDR leaves it uninitialised) and decodes with our codec.
"""

from __future__ import annotations

import array
import importlib
from dataclasses import fields, is_dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rclpy.serialization import deserialize_message, serialize_message

from flad_core import codec
from flad_core.interfaces import flad_type_names

from msg_strategies import assert_equal, message

REPO = Path(__file__).resolve().parents[1]
FLAD_TYPES = flad_type_names()
# Standard types FLAD puts on the bus (sensors, waypoints, odometry, clock): rosbags' built-in ROS 2 Jazzy
# definitions must match the real packages as well.
STANDARD_TYPES = ["std_msgs/msg/Header", "sensor_msgs/msg/Image", "sensor_msgs/msg/PointCloud2",
                  "sensor_msgs/msg/NavSatFix", "sensor_msgs/msg/Imu", "nav_msgs/msg/Path", "nav_msgs/msg/Odometry",
                  "geometry_msgs/msg/PoseStamped", "rosgraph_msgs/msg/Clock"]
EXAMPLES = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def ros_class(typename: str) -> type:
    package, kind, name = typename.split("/")
    return getattr(importlib.import_module(f"{package}.{kind}"), name)


def assert_same_fields(ours, theirs, path: str) -> None:
    """Field-by-field equality of a rosbags message and an rclpy (rosidl-generated) one."""
    if is_dataclass(ours):
        ros_fields = set(theirs.get_fields_and_field_types())
        our_fields = {f.name for f in fields(ours) if f.name != "__msgtype__" and f.name not in ros_fields
                      and f.name.isupper()}
        for const in our_fields:    # rosbags keeps .msg constants as fields; rosidl as class attributes
            assert getattr(type(theirs), const) == getattr(ours, const), f"{path}.{const}: constants differ"
        our_fields = {f.name for f in fields(ours) if f.name != "__msgtype__"} - our_fields
        assert our_fields == ros_fields, f"{path}: fields differ: ours {sorted(our_fields)}, ROS {sorted(ros_fields)}"
        for name in sorted(our_fields):
            assert_same_fields(getattr(ours, name), getattr(theirs, name), f"{path}.{name}")
    elif isinstance(ours, np.ndarray):
        assert isinstance(theirs, array.array | np.ndarray | bytes | list), f"{path}: {type(theirs)}"
        got = np.asarray(theirs if not isinstance(theirs, bytes) else list(theirs), dtype=ours.dtype)
        assert got.shape == ours.shape and got.tobytes() == ours.tobytes(), f"{path}: {ours!r} != {theirs!r}"
    elif isinstance(ours, list):
        assert len(ours) == len(theirs), f"{path}: {len(ours)} items vs {len(theirs)}"
        for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            assert_same_fields(a, b, f"{path}[{i}]")
    elif isinstance(ours, float):
        assert isinstance(theirs, float) and np.float64(ours).tobytes() == np.float64(theirs).tobytes(), \
            f"{path}: {ours!r} != {theirs!r}"
    else:
        assert type(ours) is type(theirs) and ours == theirs, f"{path}: {ours!r} != {theirs!r}"


def test_every_interface_type_is_generated_and_imports():
    """colcon built a Python class for every .msg file of flad_msgs and carla_msgs, and nothing else."""
    assert len(FLAD_TYPES) >= 16
    for typename in FLAD_TYPES:
        cls = ros_class(typename)
        assert cls.__module__.startswith(typename.split("/")[0]), typename
        assert f"{typename.split('/')[0]}/msg/{cls.__name__}" == typename
    for package in ("flad_msgs", "carla_msgs"):
        generated = {n for n in dir(importlib.import_module(f"{package}.msg")) if not n.startswith("_")}
        sources = {t.split("/")[-1] for t in FLAD_TYPES if t.startswith(package + "/")}
        assert generated == sources, package


@pytest.mark.parametrize("typename", FLAD_TYPES + STANDARD_TYPES)
def test_codec_and_rclpy_agree_byte_for_byte(typename):
    cls = ros_class(typename)

    @EXAMPLES
    @given(ours=message(typename, max_len=6))
    def check(ours):
        data = codec.encode(ours)
        theirs = deserialize_message(data, cls)
        assert_same_fields(ours, theirs, typename)
        back = serialize_message(theirs)
        # Same bytes, except that Fast-CDR leaves alignment padding uninitialised where rosbags writes zeros.
        assert len(back) == len(data), f"{typename}: rclpy wrote {len(back)} bytes, the codec {len(data)}"
        differ = [i for i, (a, b) in enumerate(zip(back, data, strict=True)) if a != b and b != 0]
        assert not differ, f"{typename}: bytes {differ} differ: rclpy {back.hex()}, codec {data.hex()}"
        again = codec.decode(back, typename)
        assert_equal(again, ours, typename)
        assert codec.encode(again) == data, typename

    check()


@pytest.mark.parametrize("typename", FLAD_TYPES)
def test_default_rclpy_message_decodes_as_codec_default(typename):
    """A message built by rclpy with no fields set is what `codec.new` builds, .msg default values included."""
    expected = codec.new(typename)
    assert_equal(codec.decode(serialize_message(ros_class(typename)()), typename), expected, typename)


@EXAMPLES
@given(junk=st.binary(max_size=64))
def test_codec_rejects_what_rclpy_cannot_read_as_a_heartbeat(junk):
    """Bytes our decoder accepts as a Heartbeat are bytes rclpy reads into the same message (no laxer codec)."""
    try:
        ours = codec.decode(junk, "flad_msgs/msg/Heartbeat")
    except codec.CodecError:
        return
    assert_same_fields(ours, deserialize_message(junk, ros_class("flad_msgs/msg/Heartbeat")), "Heartbeat")
