"""Hierarchical FedAvg: edges average their clients, the cloud averages edges.

FedAvg weights each update by its number of training samples. An edge's aggregate carries the sum
of its clients' samples, so the cloud's sample-weighted average of edge aggregates equals a flat
sample-weighted average over every client (the two-tier identity the tests check).

`RoundCollector` runs one round's bookkeeping: it accepts each update at most once (by update id and
by client), refuses updates for other rounds or from clients not selected, and decides when the round
may close: every selected client has answered, or the deadline passed with at least a quorum.
A late or dead client therefore never blocks a round.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

State = Mapping[str, torch.Tensor]


class AggregationError(ValueError):
    pass


def fedavg(states: Sequence[State], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Weighted average of state dicts (float tensors averaged in float64, cast back).

    Non-float tensors (counters such as BatchNorm's num_batches_tracked) cannot be averaged; they are
    taken from the update with the largest weight.
    """
    if not states:
        raise AggregationError("no updates to aggregate")
    if len(states) != len(weights):
        raise AggregationError(f"{len(states)} updates but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise AggregationError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    keys = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if list(s) != keys and set(s) != set(keys):
            raise AggregationError(f"update {i} has different tensors than update 0")
    heaviest = max(range(len(states)), key=lambda i: weights[i])
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        ref = states[0][k]
        if any(s[k].shape != ref.shape for s in states):
            raise AggregationError(f"tensor {k} differs in shape between updates")
        if ref.is_floating_point():
            acc = torch.zeros(ref.shape, dtype=torch.float64)
            for s, w in zip(states, weights, strict=True):
                acc += s[k].double() * (w / total)
            out[k] = acc.to(ref.dtype)
        else:
            out[k] = states[heaviest][k].clone()
    return out


@dataclass
class Update:
    """One client's result of a round: its weights, FedAvg weight (samples) and what it did (metrics)."""

    client: str
    round: int
    update_id: str
    num_samples: int
    state: State
    received_at: float = field(default_factory=time.monotonic)
    metrics: Any = None      # the client's own account of its round (e.g. fhdp.client.ClientStats)


class RoundCollector:
    """Collects one round's updates; each accepted update is counted exactly once."""

    def __init__(self, round: int, selected: Sequence[str], deadline_s: float, quorum: int = 1) -> None:
        if quorum < 1 or quorum > max(1, len(selected)):
            raise AggregationError(f"quorum {quorum} impossible with {len(selected)} selected clients")
        self.round = round
        self.selected = list(selected)
        self.quorum = quorum
        self.started = time.monotonic()
        self.deadline = self.started + deadline_s
        self.updates: dict[str, Update] = {}        # by client
        self.seen_ids: set[str] = set()
        self.refused: list[tuple[str, str]] = []    # (client, reason)
        self.abstained: set[str] = set()            # selected clients that said they have nothing this round
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)

    def offer(self, update: Update) -> tuple[bool, str]:
        """Try to accept `update`; returns (accepted, reason)."""
        with self._lock:
            reason = ""
            if update.round != self.round:
                reason = f"update for round {update.round}, this is round {self.round}"
            elif update.client not in self.selected:
                reason = f"{update.client} was not selected for round {self.round}"
            elif update.update_id in self.seen_ids:
                reason = f"duplicate update {update.update_id}"
            elif update.client in self.updates:
                reason = f"{update.client} already delivered an update this round"
            elif time.monotonic() > self.deadline and len(self.updates) >= self.quorum:
                reason = "late: the round closed at its deadline"
            elif update.num_samples <= 0:
                reason = f"update claims {update.num_samples} samples"
            if reason:
                self.refused.append((update.client, reason))
                log.info("round %d: refused update from %s: %s", self.round, update.client, reason)
                return False, reason
            self.seen_ids.add(update.update_id)
            self.updates[update.client] = update
            self._done.notify_all()
            return True, "accepted"

    def abstain(self, client: str) -> tuple[bool, str]:
        """`client` has nothing to deliver this round (e.g. an edge without vehicles): stop waiting for it."""
        with self._lock:
            if client not in self.selected:
                return False, f"{client} was not selected for round {self.round}"
            if client in self.updates:
                return False, f"{client} already delivered an update this round"
            self.abstained.add(client)
            self._done.notify_all()
            return True, "abstained"

    def complete(self) -> bool:
        return len(self.updates) + len(self.abstained - set(self.updates)) == len(self.selected)

    def can_close(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return self.complete() or (now >= self.deadline and len(self.updates) >= self.quorum)

    def wait(self, poll_s: float = 0.05) -> bool:
        """Block until the round can close; False if the deadline passed without a quorum."""
        with self._lock:
            while not self.can_close():
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._done.wait(min(poll_s, remaining))
            return True

    def missing(self) -> list[str]:
        return [c for c in self.selected if c not in self.updates and c not in self.abstained]

    def aggregate(self) -> tuple[dict[str, torch.Tensor], int]:
        """FedAvg of the accepted updates and their total sample count."""
        with self._lock:
            ups = list(self.updates.values())
        if not ups:
            raise AggregationError(f"round {self.round}: no updates")
        return fedavg([u.state for u in ups], [u.num_samples for u in ups]), sum(u.num_samples for u in ups)


def two_tier(edges: Sequence[Sequence[tuple[State, int]]]) -> tuple[dict[str, torch.Tensor], int]:
    """Cloud aggregate of edge aggregates: each edge averages (state, samples) pairs, the cloud the edges."""
    edge_aggs = []
    for clients in edges:
        state = fedavg([s for s, _ in clients], [n for _, n in clients])
        edge_aggs.append((state, sum(n for _, n in clients)))
    return fedavg([s for s, _ in edge_aggs], [n for _, n in edge_aggs]), sum(n for _, n in edge_aggs)
