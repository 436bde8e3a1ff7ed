"""Launch plans, the edge's part, built on flad_vehicle.launch (plan data types, the vehicle plan, launch_ros):

  plans   the edge's node kinds; the edge, cloud, fleet and closed-loop plans; `PLANS` (every plan)
  carla   carla_spawn_objects' objects.json for our sensor rig (the closed_loop_carla plan)
  run     `flad launch PLAN`: a plan's nodes as supervised processes, without `ros2 launch`
"""
