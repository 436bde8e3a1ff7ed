"""FLAD's protocol names: topics, services and sentinel values, in one place for every side.

Vehicles, edges and the cloud import these from here (the bottom layer), so a name cannot drift between
the side that serves it and the side that calls it. carla-ros-bridge names live with the world bridge.
"""

from __future__ import annotations

from typing import Any

# -- fleet membership (vehicle <-> edge) --------------------------------------------------------------------
TOPIC_HEARTBEAT = "/flad/heartbeat"      # flad_msgs/Heartbeat, every vehicle -> edge
TOPIC_STATUS = "/flad/status"            # flad_msgs/VehicleStatus, every vehicle -> edge
TOPIC_ROUND = "/flad/round"              # flad_msgs/RoundControl, edge -> vehicles
SERVICE_REGISTER = "edge/register"       # VehicleStatus -> Ack

# -- FHDP: services a vehicle serves (edge and peers call them) --------------------------------------------
SERVICE_ASSIGN = "vehicle/assign"        # PipelineAssignment -> Ack: prepare a stage (fetch its layers)
SERVICE_START = "vehicle/start"          # PipelineAssignment -> Ack: run the prepared stage's steps
SERVICE_LAYERS = "vehicle/layers"        # LayerRequest -> WeightChunk: the layers this vehicle holds
SERVICE_ABORT = "vehicle/abort"          # PipelineAbort -> Ack: drop the running pipeline (a member left)
SERVICE_ADOPT = "vehicle/adopt"          # VehicleIdentity -> Ack: a pooled worker becomes that vehicle (empty: idle)

# -- FHDP: services the edge serves (vehicles call them) ----------------------------------------------------
SERVICE_EDGE_READY = "edge/ready"                  # StepReport -> Ack: a stage has its layers
SERVICE_EDGE_REPORT = "edge/report"                # StepReport -> Ack: a stage finished its steps
SERVICE_EDGE_LAYERS = "edge/layers"                # LayerRequest -> WeightChunk: the round's global layers
SERVICE_EDGE_BACKUP = "edge/backup"                # WeightChunk -> Ack: changed layers, every e steps
SERVICE_EDGE_BACKUP_LAYERS = "edge/backup-layers"  # LayerRequest -> WeightChunk: a client's backed-up layers
TOPIC_PROGRESS = "/flad/fhdp/progress"             # StepReport per completed step, from a pipeline's loss stage

# -- FL tiers (edge <-> cloud) ---------------------------------------------------------------------------------
SERVICE_UPLOAD = "cloud/upload"          # WeightChunk -> Ack: an edge's aggregate
SERVICE_GLOBAL = "cloud/global"          # LayerRequest-like -> WeightChunk: the round's global model

# -- CELLAdapt -------------------------------------------------------------------------------------------------
SERVICE_WAYPOINTS = "flad/waypoints"     # WaypointRequest -> nav_msgs/Path (the edge waypoint service)

# -- sentinel values in messages --------------------------------------------------------------------------------
EDGE_OWNER = "edge"         # layer_owner: fetch the layer from the edge (the round's global model)
BACKUP_OWNER = "backup"     # layer_owner: restore the layer from the edge's backup of this vehicle's client
ABORTED = "aborted"         # prefix of StepReport.error for a pipeline the edge aborted
ATTEMPT_SEP = "~"           # pipeline_id suffix: "<base>~<attempt>" for a pipeline resumed after a recovery


def pipeline_base_id(pipeline_id: str) -> str:
    """The pipeline id without its attempt suffix: every attempt of one pipeline shares its data stream."""
    return pipeline_id.split(ATTEMPT_SEP, 1)[0]


def attempt_id(base: str, attempt: int) -> str:
    return f"{base}{ATTEMPT_SEP}{attempt}"


def edge_service_address(fleet: Any, service: str) -> str:
    """Address of an edge service; the recovery services share `edge/layers`' socket unless configured."""
    return fleet.bus.services.get(service) or fleet.bus.services.get(SERVICE_EDGE_LAYERS, "")
