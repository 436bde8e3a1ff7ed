"""Launch plans, the part a vehicle needs: what `launch/vehicle.launch.py` starts, as plain data.

  spec     the plan data types (NodeKind, NodeSpec, IncludeSpec, LaunchPlan, PlanArgs) and `make_plan`
  vehicle  the vehicle's node kinds and the `vehicle` plan
  ros      the launch_ros adapter (`launch_description`, `plan_actions`) and the same node as a plain process
           (`ros_args`, `params_yaml`, `node_command`)

flad_edge.launch builds the edge, cloud, fleet and closed-loop plans and `flad launch` on these.
"""
