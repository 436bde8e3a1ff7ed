"""Vehicle control: LMDrive's waypoint PID and closed-loop driving agents for the embedded world."""

from flad_vehicle.control.pid import PIDConfig, PIDController, WaypointPID, to_ros_control

__all__ = ["PIDConfig", "PIDController", "WaypointPID", "to_ros_control"]
