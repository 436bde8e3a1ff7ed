"""`flad_msgs/VehicleIdentity` (what a pooled worker adopts) is registered and round-trips field for field."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flad_core import codec
from flad_core.interfaces import flad_type_names

from msg_strategies import assert_equal, message

TYPE = "flad_msgs/msg/VehicleIdentity"


def test_identity_is_registered_with_its_fields():
    assert TYPE in flad_type_names()
    msg = codec.new(TYPE)
    assert (msg.vehicle_id, msg.profile_name, msg.town, msg.data_root, msg.predicted_dwell_s, msg.seed) == (
        "", "", "", "", 0.0, 0)
    assert msg.device.__msgtype__ == "flad_msgs/msg/DeviceProfile"


def test_a_full_identity_round_trips():
    device = codec.new("flad_msgs/msg/DeviceProfile", name="jetson_agx", mem_bytes=32 * 1024**3, tflops=3.85,
                       link_mbps=100.0, emulated=True)
    msg = codec.new(TYPE, header=codec.header(frame_id="pool"), vehicle_id="v0421", profile_name="jetson_agx",
                    device=device, town="Town05", data_root="/data/fleet", predicted_dwell_s=437.25, seed=2**32 - 1)
    back = codec.decode(codec.encode(msg), TYPE)
    assert_equal(msg, back)
    assert back.device.mem_bytes == 32 * 1024**3 and back.seed == 2**32 - 1 and back.predicted_dwell_s == 437.25


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_identity_round_trips(data):
    msg = data.draw(message(TYPE))
    raw = codec.encode(msg)
    back = codec.decode(raw, TYPE)
    assert_equal(msg, back)
    assert codec.encode(back) == raw
