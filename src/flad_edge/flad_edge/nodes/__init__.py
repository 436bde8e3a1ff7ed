"""rclpy nodes: thin adapters that run this package's ROS-free classes on a RosBus (see flad_core.role_node)."""
