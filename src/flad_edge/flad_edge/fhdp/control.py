"""The edge's side of the FHDP protocol: assignments out, ready/report messages in, layers gathered back.

Clients (`fhdp.client`) drive their pipelines through one `PipelineControl` per edge; it owns the step
numbering, so no two assignments ever share a step number (vehicles drop buffered frames below an
assignment's first step, and the edge drops backups older than a client's round: both rely on it).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import torch

from flad_core import codec
from flad_core.bus import Bus, BusError
from flad_core.fleet import FleetConfig
from flad_core.protocol import SERVICE_EDGE_READY, SERVICE_EDGE_REPORT, SERVICE_LAYERS, attempt_id
from flad_edge.fhdp.config import FhdpConfig
from flad_vehicle.fhdp.pipeline import Assignment, Pipeline
from flad_vehicle.fhdp.worker import fetch_layers

log = logging.getLogger(__name__)

READY, REPORT = "ready", "report"


class StepNumbers:
    """Step numbers for every assignment this edge sends: ranges that only grow, never reused."""

    def __init__(self, start: int = 0) -> None:
        self._next = start
        self._lock = threading.Lock()

    def take(self, n: int) -> int:
        """Reserve `n` steps; returns the first."""
        with self._lock:
            first = self._next
            self._next += max(0, n)
            return first

    def peek(self) -> int:
        """The next step number to be handed out (every earlier one belongs to a past assignment)."""
        with self._lock:
            return self._next


class ReportBoard:
    """StepReports that vehicles send to `edge/ready` and `edge/report`, by (kind, pipeline, vehicle)."""

    def __init__(self) -> None:
        self._reports: dict[tuple[str, str, str], Any] = {}
        self._lock = threading.Lock()

    def record(self, kind: str, msg: Any) -> Any:
        with self._lock:
            self._reports[(kind, msg.pipeline_id, msg.vehicle_id)] = msg
        return codec.new("flad_msgs/msg/Ack", ok=True, message="noted")

    def get(self, kind: str, pipeline_id: str, vehicle: str) -> Any | None:
        with self._lock:
            return self._reports.get((kind, pipeline_id, vehicle))

    def wait(self, kind: str, pipeline_id: str, vehicles: Sequence[str], timeout_s: float, *,
             check: Callable[[], None] | None = None, on_error: Callable[[str, Any], bool] | None = None,
             poll_s: float = 0.01) -> dict[str, Any]:
        """Every vehicle's report of `kind`.

        `check()` runs before each poll and may raise (failure detection). A report with an error raises
        RuntimeError unless `on_error(vehicle, report)` decides: True takes it as that vehicle's report,
        False stops this poll (the next `check()` is expected to raise)."""
        deadline = time.monotonic() + timeout_s
        out: dict[str, Any] = {}
        while len(out) < len(vehicles):
            if check is not None:
                check()
            for v in vehicles:
                rep = None if v in out else self.get(kind, pipeline_id, v)
                if rep is None:
                    continue
                if rep.error:
                    if on_error is None:
                        raise RuntimeError(f"{v} failed {kind} of {pipeline_id}: {rep.error}")
                    if not on_error(v, rep):
                        break
                out[v] = rep
            if len(out) < len(vehicles):
                if time.monotonic() > deadline:
                    missing = [v for v in vehicles if v not in out]
                    raise TimeoutError(f"{missing} did not report {kind} for {pipeline_id} within {timeout_s:.0f} s")
                time.sleep(poll_s)
        return out


class PipelineControl:
    """Sends assignments to vehicles and collects what they report, for every client of one edge."""

    def __init__(self, bus: Bus, fleet: FleetConfig, cfg: FhdpConfig, layers: Sequence[str]) -> None:
        self.bus, self.fleet, self.cfg = bus, fleet, cfg
        self.layers = list(layers)
        self.steps = StepNumbers()
        self.board = ReportBoard()
        bus.serve(SERVICE_EDGE_READY, "flad_msgs/msg/StepReport", "flad_msgs/msg/Ack",
                  lambda msg: self.board.record(READY, msg))
        bus.serve(SERVICE_EDGE_REPORT, "flad_msgs/msg/StepReport", "flad_msgs/msg/Ack",
                  lambda msg: self.board.record(REPORT, msg))

    def control_address(self, vehicle: str) -> str:
        return self.fleet.vehicle(vehicle).control

    @staticmethod
    def pipeline_base(rnd: int, client_id: str, first: str) -> str:
        """Id shared by every attempt of one client's pipeline in one round (`<base>~<attempt>` after recovery)."""
        return f"r{rnd}-{client_id}-{first}-{uuid.uuid4().hex[:6]}"

    def assignment(self, client_id: str, members: Sequence[str], pipeline: Pipeline, owners: Sequence[str],
                   rnd: int, steps: int, *, pipeline_id: str = "", attempt: int | None = None,
                   fanin_sources: Sequence[str] = ()) -> Assignment:
        """An assignment for `pipeline` (with `fanin_sources`: the fan-in trunk), with its own fresh range of step
        numbers."""
        pid = pipeline_id or self.pipeline_base(rnd, client_id, pipeline.first)
        if attempt is not None:
            pid = attempt_id(pid, attempt)
        return Assignment(
            pipeline_id=pid, round=rnd, cluster_id=client_id, method=self.cfg.planner, pipeline=pipeline,
            members={m: self.control_address(m) for m in members},
            inboxes=[self.fleet.vehicle(v).data for v in pipeline.members], layer_owner=list(owners),
            schedule=self.cfg.schedule, codec=self.cfg.codec, n_micro=self.cfg.n_micro,
            batch_size=self.cfg.batch_size, steps=steps, first_step=self.steps.take(steps),
            time_scale=self.cfg.time_scale, u_shaped=self.cfg.u_shaped, fanin_sources=list(fanin_sources),
            fanin_inboxes=[self.fleet.vehicle(v).data for v in fanin_sources], precision=self.cfg.precision)

    def send(self, service: str, a: Assignment, vehicles: Sequence[str] | None = None,
             before_each: Callable[[], None] | None = None) -> None:
        """Request `service` with `a` from every vehicle that takes part in it (or `vehicles`)."""
        msg = a.to_msg()
        for v in vehicles if vehicles is not None else a.participants:
            if before_each is not None:
                before_each()
            self.bus.request(service, msg, "flad_msgs/msg/Ack", address=self.control_address(v))

    def gather(self, owners: Sequence[str], requester: str,
               fallback: Callable[[str, list[str], Exception | None], dict[str, torch.Tensor]] | None = None,
               reachable: Callable[[str], bool] = lambda _: True) -> dict[str, torch.Tensor]:
        """The client's model, each layer fetched from its owner (weights only).

        With `fallback(owner, layers, error)`, an unreachable owner's layers come from there instead (the
        edge's backup in quick recovery); without it, the fetch error propagates."""
        by_owner: dict[str, list[str]] = {}
        for layer, owner in zip(self.layers, owners, strict=True):
            by_owner.setdefault(owner, []).append(layer)
        state: dict[str, torch.Tensor] = {}
        for owner, layers in by_owner.items():
            payload: dict[str, torch.Tensor] | None = None
            error: Exception | None = None
            if reachable(owner):
                try:
                    payload, _ = fetch_layers(self.bus, self.control_address(owner), SERVICE_LAYERS, layers,
                                              requester, timeout_s=10.0 if fallback is not None else 30.0)
                except BusError as exc:
                    if fallback is None:
                        raise
                    error = exc
                    log.warning("could not fetch layers from %s (%s); using the backup", owner, exc)
            if payload is None:
                if fallback is None:
                    raise RuntimeError(f"no way to fetch {len(layers)} layer(s) held by {owner}")
                payload = fallback(owner, layers, error)
            state.update({k[2:]: v for k, v in payload.items() if k.startswith("p/")})
        return state
