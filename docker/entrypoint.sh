#!/usr/bin/env bash
# Start one FLAD role in a container with `ros2 launch` (the image built the workspace with colcon):
#   FLAD_ROLE=edge     ros2 launch flad_edge edge.launch.py        (orchestrator + waypoint service)
#   FLAD_ROLE=cloud    ros2 launch flad_edge cloud.launch.py       (second aggregation tier)
#   FLAD_ROLE=vehicle  ros2 launch flad_vehicle vehicle.launch.py  (stage worker + encoder + controller; VEHICLE_ID)
#   FLAD_ROLE=shell    bash
# FLAD_FLEET names the fleet YAML; FLAD_EDGE_ADDRESS (vehicles) and FLAD_ROLE_NAME (CARLA ego role) are
# optional. Extra arguments are passed on as launch arguments (name:=value), e.g. rounds:=3.
set -euo pipefail
# shellcheck disable=SC1090
source "/opt/ros/${ROS_DISTRO:-humble}/setup.bash"
# shellcheck disable=SC1091
[ -f /opt/flad/install/setup.bash ] && source /opt/flad/install/setup.bash
fleet=("fleet:=${FLAD_FLEET:?set FLAD_FLEET to the fleet YAML}")
case "${FLAD_ROLE:-}" in
  edge)    exec ros2 launch flad_edge edge.launch.py "${fleet[@]}" "$@" ;;
  cloud)   exec ros2 launch flad_edge cloud.launch.py "${fleet[@]}" "$@" ;;
  vehicle) exec ros2 launch flad_vehicle vehicle.launch.py "${fleet[@]}" "vehicle_id:=${VEHICLE_ID:?set VEHICLE_ID}" \
             ${FLAD_EDGE_ADDRESS:+"edge_address:=${FLAD_EDGE_ADDRESS}"} \
             ${FLAD_ROLE_NAME:+"role_name:=${FLAD_ROLE_NAME}"} "$@" ;;
  shell)   exec bash ;;
  *)       echo "FLAD_ROLE must be edge, cloud, vehicle or shell (got '${FLAD_ROLE:-}')" >&2; exit 2 ;;
esac
