"""carla_spawn_objects' `objects.json` for one ego carrying our sensor rig (the closed_loop_carla plan).

launch/carla_objects.json is `carla_objects_json("hero")`.
"""

from __future__ import annotations

import json
from typing import Any


def carla_objects(role: str = "hero", rig: Any = None, blueprint: str = "vehicle.lincoln.mkz_2020") -> dict[str, Any]:
    """carla_spawn_objects' `objects.json` for one ego with our rig (flad_sim.sensors.RigConfig).

    Sensor `spawn_point`s are in the ROS frame of the vehicle (x forward, y LEFT, z up, yaw CCW in degrees)
    relative to CARLA's vehicle origin (bounding-box centre): carla_spawn_objects converts to CARLA itself.
    The sensor ids become the topic names: /carla/<role>/rgb_front/image, /carla/<role>/lidar, ...
    """
    from flad_sim.carla_adapter import DT, REAR_AXLE_TO_CENTER_M
    from flad_sim.sensors import RigConfig

    rig = rig or RigConfig()
    hz = 1.0 / DT
    sensors: list[dict[str, Any]] = []
    for c in rig.cameras:
        sensors.append({"type": "sensor.camera.rgb", "id": c.name,
                        "spawn_point": _spawn(c.x - REAR_AXLE_TO_CENTER_M, c.y, c.z, c.yaw_deg),
                        "image_size_x": c.width, "image_size_y": c.height, "fov": float(c.fov_deg),
                        "sensor_tick": DT})
    lc = rig.lidar
    sensors.append({"type": "sensor.lidar.ray_cast", "id": "lidar",
                    "spawn_point": _spawn(lc.x - REAR_AXLE_TO_CENTER_M, lc.y, lc.z, 0.0),
                    "range": float(lc.range_m), "channels": lc.channels,
                    "points_per_second": int(round(lc.channels * lc.azimuth_steps * hz)),
                    "upper_fov": float(lc.upper_fov_deg), "lower_fov": float(lc.lower_fov_deg),
                    "rotation_frequency": hz, "noise_stddev": float(lc.noise_std_m), "sensor_tick": DT})
    sensors.append({"type": "sensor.other.gnss", "id": "gnss", "spawn_point": _spawn(0.0, 0.0, 0.0, 0.0),
                    "noise_alt_stddev": 0.0, "noise_lat_stddev": 0.0, "noise_lon_stddev": 0.0,
                    "noise_alt_bias": 0.0, "noise_lat_bias": 0.0, "noise_lon_bias": 0.0, "sensor_tick": DT})
    sensors.append({"type": "sensor.other.imu", "id": "imu", "spawn_point": _spawn(0.0, 0.0, 0.0, 0.0),
                    "sensor_tick": DT})
    for pseudo, sid in (("speedometer", "speedometer"), ("odom", "odometry"), ("tf", "tf"),
                        ("objects", "objects"), ("control", "control")):
        sensors.append({"type": f"sensor.pseudo.{pseudo}", "id": sid})
    return {"objects": [{"type": blueprint, "id": role, "sensors": sensors}]}


def carla_objects_json(role: str = "hero") -> str:
    """`carla_objects(role)` as the text of an objects.json file (launch/carla_objects.json is this for 'hero')."""
    return json.dumps(carla_objects(role), indent=2) + "\n"


def _spawn(x: float, y: float, z: float, yaw: float) -> dict[str, float]:
    return {"x": round(float(x), 4), "y": round(float(y), 4), "z": round(float(z), 4), "roll": 0.0, "pitch": 0.0,
            "yaw": round(float(yaw), 4)}
