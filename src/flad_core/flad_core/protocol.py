"""Names of FLAD's own topics and services (carla-ros-bridge names live with the world bridge)."""

TOPIC_HEARTBEAT = "/flad/heartbeat"      # flad_msgs/Heartbeat, every vehicle -> edge
TOPIC_STATUS = "/flad/status"            # flad_msgs/VehicleStatus, every vehicle -> edge
TOPIC_ROUND = "/flad/round"              # flad_msgs/RoundControl, edge -> vehicles
SERVICE_REGISTER = "edge/register"       # VehicleStatus -> Ack
