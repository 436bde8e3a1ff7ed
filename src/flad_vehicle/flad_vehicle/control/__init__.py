"""Vehicle control: LMDrive's waypoint PID and closed-loop driving agents for the embedded world."""

from flad_vehicle.control.pid import LMDriveController, PIDConfig, PIDController, WaypointPID, to_ros_control

__all__ = ["LMDriveController", "PIDConfig", "PIDController", "WaypointPID", "to_ros_control"]
