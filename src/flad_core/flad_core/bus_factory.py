"""`make_bus`: the bus for a role, ZeroMQ (`flad_core.bus.ZmqBus`) or ROS 2 (`flad_core.bus_ros.RosBus`).

Its own module because it knows both transports: `bus_ros` builds on `bus`, so `bus` cannot import it back.
"""

from __future__ import annotations

from flad_core.bus import Bus, BusConfig, BusError, ZmqBus
from flad_core.config import ConfigError
from flad_core.security import SecurityConfig


def make_bus(identity: str, cfg: BusConfig | None = None, security: SecurityConfig | None = None,
             transport: str = "auto") -> Bus:
    """The bus for a role: `zmq`, `ros` (rclpy topics; needs ROS 2), or `auto` (ROS when rclpy imports)."""
    if transport not in ("auto", "zmq", "ros"):
        raise ConfigError("transport", f"must be auto, zmq or ros, got {transport!r}")
    if transport != "zmq":
        try:
            from flad_core.bus_ros import RosBus
        except ImportError as exc:
            if transport == "ros":
                raise BusError(f"transport 'ros' needs rclpy, which does not import here: {exc}") from exc
        else:
            return RosBus(identity, cfg, security)
    return ZmqBus(identity, cfg, security)
