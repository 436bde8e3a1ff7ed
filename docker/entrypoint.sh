#!/usr/bin/env bash
# Start one FLAD role in a container: FLAD_ROLE=edge|vehicle (VEHICLE_ID), FLAD_FLEET=fleet YAML.
set -euo pipefail
# shellcheck disable=SC1091
source /opt/ros/humble/setup.bash
# shellcheck disable=SC1091
[ -f /opt/flad/install/setup.bash ] && source /opt/flad/install/setup.bash
case "${FLAD_ROLE:-}" in
  edge)    exec python3 -m flad_edge.edge --fleet "${FLAD_FLEET}" --duration "${FLAD_DURATION:-86400}" "$@" ;;
  vehicle) exec python3 -m flad_vehicle.agent --fleet "${FLAD_FLEET}" --id "${VEHICLE_ID:?set VEHICLE_ID}" "$@" ;;
  shell)   exec bash ;;
  *)       echo "FLAD_ROLE must be edge, vehicle or shell (got '${FLAD_ROLE:-}')" >&2; exit 2 ;;
esac
