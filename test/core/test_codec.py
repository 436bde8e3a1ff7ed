"""CDR codec: every FLAD type and the standard types we use round-trip; bad bytes are rejected clearly."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flad_core import codec
from flad_core.interfaces import flad_type_names, load_msg_texts

from msg_strategies import assert_equal, message

STANDARD_TYPES = [
    "std_msgs/msg/Header", "std_msgs/msg/Float32", "sensor_msgs/msg/Image", "sensor_msgs/msg/PointCloud2",
    "sensor_msgs/msg/NavSatFix", "sensor_msgs/msg/Imu", "nav_msgs/msg/Path", "nav_msgs/msg/Odometry",
    "geometry_msgs/msg/PoseStamped", "rosgraph_msgs/msg/Clock",
]
ALL_TYPES = flad_type_names() + STANDARD_TYPES


def test_every_msg_file_is_registered():
    names = flad_type_names()
    for expected in ("flad_msgs/msg/VehicleStatus", "flad_msgs/msg/Heartbeat", "flad_msgs/msg/PipelineTemplate",
                     "flad_msgs/msg/StageAssignment", "flad_msgs/msg/EncodedFeatures", "flad_msgs/msg/RoundControl",
                     "carla_msgs/msg/CarlaEgoVehicleControl", "carla_msgs/msg/CarlaEgoVehicleStatus"):
        assert expected in names
    assert set(load_msg_texts("flad_msgs")) <= set(names)


@pytest.mark.parametrize("typename", ALL_TYPES)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_round_trip(typename, data):
    msg = data.draw(message(typename))
    raw = codec.encode(msg)
    back = codec.decode(raw, typename)
    assert_equal(msg, back)
    assert codec.encode(back) == raw


@pytest.mark.parametrize("typename", flad_type_names())
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_truncation_is_rejected(typename, data):
    raw = codec.encode(data.draw(message(typename)))
    cut = data.draw(st.integers(0, len(raw) - 4))  # CDR pads the end to 4 bytes; cut more than padding
    with pytest.raises(codec.CodecError) as err:
        codec.decode(raw[:cut], typename)
    assert typename in str(err.value)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=300), typename=st.sampled_from(ALL_TYPES))
def test_random_bytes_never_crash(raw, typename):
    try:
        codec.decode(raw, typename)
    except codec.CodecError as exc:
        assert typename in str(exc)


def test_trailing_bytes_and_bad_header_rejected():
    raw = codec.encode(codec.new("flad_msgs/msg/Heartbeat", vehicle_id="v1", seq=3))
    with pytest.raises(codec.CodecError, match="Heartbeat"):
        codec.decode(raw + b"\x00" * 16, "flad_msgs/msg/Heartbeat")
    with pytest.raises(codec.CodecError, match="encapsulation"):
        codec.decode(b"\x07\x07" + raw[2:], "flad_msgs/msg/Heartbeat")


def test_unknown_type_and_field_named():
    with pytest.raises(codec.CodecError, match="unknown message type"):
        codec.decode(b"\x00\x01\x00\x00", "flad_msgs/msg/Nope")
    with pytest.raises(codec.CodecError, match="colour"):
        codec.new("flad_msgs/msg/Heartbeat", colour="red")


def test_wrong_message_type_on_encode():
    hb = codec.new("flad_msgs/msg/Heartbeat")
    with pytest.raises(codec.CodecError, match="expected a flad_msgs/msg/Ack"):
        codec.encode(hb, "flad_msgs/msg/Ack")


def test_non_finite_rejected_when_asked():
    status = codec.new("flad_msgs/msg/VehicleStatus", speed_mps=float("nan"))
    raw = codec.encode(status)
    codec.decode(raw, "flad_msgs/msg/VehicleStatus")  # allowed by default
    with pytest.raises(codec.CodecError, match="speed_mps"):
        codec.decode(raw, "flad_msgs/msg/VehicleStatus", finite=True)


def test_short_names_and_defaults():
    msg = codec.new("flad_msgs/EncodedFeatures", vehicle_id="v9", dtype="float32", shape=np.array([2, 3], np.uint32),
                    data=np.arange(24, dtype=np.uint8))
    back = codec.decode(codec.encode(msg), "flad_msgs/EncodedFeatures")
    assert back.vehicle_id == "v9" and list(back.shape) == [2, 3] and back.data.tobytes() == bytes(range(24))


def test_constants_come_from_msg_files():
    rc = codec.message_class("flad_msgs/msg/RoundControl")
    assert (rc.CMD_START, rc.CMD_STOP, rc.CMD_ABORT) == (0, 1, 2)
