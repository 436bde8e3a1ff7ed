"""Hierarchical FedAvg (and robust alternatives): edges average their clients, the cloud averages edges.

FedAvg weights each update by its number of training samples. An edge's aggregate carries the sum
of its clients' samples, so the cloud's sample-weighted average of edge aggregates equals a flat
sample-weighted average over every client (the two-tier identity the tests check).

A poisoned client can spoil a plain average with one update, so each tier may instead use a robust rule
(`AggregationConfig.rule`): coordinate-wise median, trimmed mean, Krum or multi-Krum, with the arithmetic
of Flower's implementations (see `median`, `trimmed_mean`, `krum_scores`), and screens every update first
(`screen_update`, `screen_round`): tensors of the wrong shape or dtype, NaN/inf, and updates that moved the
model far more than the round's typical update are rejected with their reason and never aggregated.

`RoundCollector` runs one round's bookkeeping: it accepts each update at most once (by update id and
by client), refuses updates for other rounds or from clients not selected, and decides when the round
may close: every selected client has answered, or the deadline passed with at least a quorum.
A late or dead client therefore never blocks a round.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
import yaml

from flad_core.config import ConfigError, from_dict

log = logging.getLogger(__name__)

State = Mapping[str, torch.Tensor]

# The robust rules follow Flower (github.com/adap/flower), src/py/flwr/server/strategy/aggregate.py at commit
# 00cd859ae81b903e3188d0a55b358c7c7e2821c4 (aggregate, aggregate_median, aggregate_krum, _compute_distances,
# _trim_mean, aggregate_trimmed_avg), used by the strategies (same folder) fedmedian.py @ 0e73550a296d (FedMedian),
# fedtrimmedavg.py @ 05c252a9929b (FedTrimmedAvg, beta = 0.2 by default) and krum.py @ 047571ee4cfc (Krum:
# num_malicious_clients, num_clients_to_keep; 0 = Krum).
# Flower aggregates parameter vectors, not deltas; so do these functions (an update here is a whole state).
# Each rule is translation-equivariant, so on deltas from one global model they would pick/produce the same.
RULES = ("fedavg", "median", "trimmed_mean", "krum", "multi_krum")

#: the norm rule needs this many updates: with two there is no majority -- a far-moving update may be the honest
#: one (a bigger cluster) or the poisoned one, and the rule cannot tell -- and with one nothing to compare with.
#: Fewer: the rule is skipped (logged); the per-update checks (shape, dtype, NaN/inf) still apply.
MIN_UPDATES_FOR_NORM = 3


class AggregationError(ValueError):
    pass


@dataclass
class AggregationConfig:
    """How one tier (edge or cloud) combines a round's updates, and which updates it refuses to combine."""

    rule: str = "fedavg"            # fedavg | median | trimmed_mean | krum | multi_krum
    # trimmed_mean: the fraction of values cut at each end, per coordinate (Flower FedTrimmedAvg's beta, 0.2)
    trim_fraction: float = 0.2
    # krum / multi_krum: the number f of malicious updates assumed; each update is scored over its n - f - 2
    # nearest neighbours (Flower's num_malicious_clients; Flower's default is 0, ours 1: choosing Krum means
    # expecting an attacker)
    krum_f: int = 1
    # multi_krum: how many best-scored updates are averaged (Flower's num_clients_to_keep); 0: n - f, i.e.
    # every update but the f worst. More than the round has: all of them (Flower's slice would keep fewer)
    multi_krum_keep: int = 0
    # screen updates before aggregating: shape/dtype against the reference model, NaN/inf, the norm bound
    validate_updates: bool = True
    # reject an update whose distance from the reference model is more than norm_bound x the round's median
    # distance (None: no norm rule). Why 5: honest FLAD clients differ in how far they move -- a cluster of k
    # members trains k pipelines x local_steps, and an Adam step moves each weight by about lr, so an honest
    # cluster (cap 4 in the paper) can move up to ~4x as far as a solo vehicle; 5 keeps every honest one,
    # while weights scaled by even 2 move by ||w||, orders of magnitude more than a round of training does.
    norm_bound: float | None = 5.0

    def validate(self) -> None:
        if self.rule not in RULES:
            raise ConfigError("rule", f"must be one of {', '.join(RULES)}, got {self.rule!r}")
        if not isinstance(self.trim_fraction, (int, float)) or not 0 <= self.trim_fraction < 0.5:
            raise ConfigError("trim_fraction", f"must be in [0, 0.5), got {self.trim_fraction!r}")
        if not isinstance(self.krum_f, int) or isinstance(self.krum_f, bool) or self.krum_f < 0:
            raise ConfigError("krum_f", f"must be an integer >= 0, got {self.krum_f!r}")
        if (not isinstance(self.multi_krum_keep, int) or isinstance(self.multi_krum_keep, bool)
                or self.multi_krum_keep < 0):
            raise ConfigError("multi_krum_keep", f"must be an integer >= 0 (0: n - f), got {self.multi_krum_keep!r}")
        if not isinstance(self.validate_updates, bool):
            raise ConfigError("validate_updates", f"must be true or false, got {self.validate_updates!r}")
        if self.norm_bound is not None and (not isinstance(self.norm_bound, (int, float))
                                            or not math.isfinite(self.norm_bound) or self.norm_bound < 1):
            raise ConfigError("norm_bound", f"must be a number >= 1 (or null: no norm rule), got {self.norm_bound!r}")

    def to_spec(self) -> str:
        """The command-line form (`--aggregation`): `rule,key=value,...`; `parse` reads it back."""
        def text(value: Any) -> str:
            return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)

        options = [f"{f.name}={text(getattr(self, f.name))}" for f in fields(self) if f.name != "rule"]
        return ",".join([self.rule, *options])

    @classmethod
    def parse(cls, spec: str) -> AggregationConfig:
        """`median` or `trimmed_mean,trim_fraction=0.1` or `krum,krum_f=2,norm_bound=null` (errors name the key)."""
        data: dict[str, Any] = {}
        for i, part in enumerate(p.strip() for p in spec.split(",")):
            if not part:
                continue
            if "=" not in part:
                if i != 0:
                    raise ConfigError(part, "expected key=value after the rule")
                data["rule"] = part
                continue
            key, _, value = part.partition("=")
            try:
                data[key.strip()] = yaml.safe_load(value)
            except yaml.YAMLError as exc:
                raise ConfigError(key.strip(), f"cannot read {value!r}") from exc
        return from_dict(cls, data)


# -- aggregation rules -----------------------------------------------------------------------------------
def _check_states(states: Sequence[State], weights: Sequence[float]) -> list[str]:
    """The common tensor names; raises when the updates cannot be combined."""
    if not states:
        raise AggregationError("no updates to aggregate")
    if len(states) != len(weights):
        raise AggregationError(f"{len(states)} updates but {len(weights)} weights")
    keys = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if list(s) != keys and set(s) != set(keys):
            raise AggregationError(f"update {i} has different tensors than update 0")
    for k in keys:
        if any(s[k].shape != states[0][k].shape for s in states):
            raise AggregationError(f"tensor {k} differs in shape between updates")
    return keys


def _heaviest(weights: Sequence[float]) -> int:
    return max(range(len(weights)), key=lambda i: weights[i])


def fedavg(states: Sequence[State], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Weighted average of state dicts (float tensors averaged in float64, cast back).

    Non-float tensors (counters such as BatchNorm's num_batches_tracked) cannot be averaged; they are
    taken from the update with the largest weight.
    """
    keys = _check_states(states, weights)
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise AggregationError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    heaviest = _heaviest(weights)
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        ref = states[0][k]
        if ref.is_floating_point():
            acc = torch.zeros(ref.shape, dtype=torch.float64)
            for s, w in zip(states, weights, strict=True):
                acc += s[k].double() * (w / total)
            out[k] = acc.to(ref.dtype)
        else:
            out[k] = states[heaviest][k].clone()
    return out


def _coordinatewise(states: Sequence[State], weights: Sequence[float], reduce) -> dict[str, torch.Tensor]:
    """`reduce` over the updates (dim 0, float64) per float tensor; non-float ones as fedavg takes them."""
    keys = _check_states(states, weights)
    heaviest = _heaviest(weights)
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        ref = states[0][k]
        if ref.is_floating_point():
            out[k] = reduce(torch.stack([s[k].double() for s in states])).to(ref.dtype)
        else:
            out[k] = states[heaviest][k].clone()
    return out


def _np_median(x: torch.Tensor) -> torch.Tensor:
    """numpy.median along dim 0: the middle value, or the mean of the two middle ones; NaN where any is NaN."""
    n = x.shape[0]
    srt = x.sort(dim=0).values
    med = srt[n // 2] if n % 2 else (srt[n // 2 - 1] + srt[n // 2]) / 2
    return torch.where(torch.isnan(x).any(dim=0), torch.full_like(med, math.nan), med)


def median(states: Sequence[State], weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Coordinate-wise median, unweighted (Flower aggregate_median: np.median over the clients, axis 0).

    `weights` only decide where non-float tensors come from (the heaviest update, as in fedavg)."""
    return _coordinatewise(states, weights if weights is not None else [1.0] * len(states), _np_median)


def trim_bounds(n: int, trim_fraction: float) -> tuple[int, int]:
    """Flower's _trim_mean cut: the values kept per coordinate are [int(trim_fraction * n), n - that)."""
    lowercut = int(trim_fraction * n)
    uppercut = n - lowercut
    if lowercut >= uppercut:
        # Flower raises "Proportion too big." only for lowercut > uppercut; at equality it averages nothing (NaN)
        raise AggregationError(f"trim fraction {trim_fraction} of {n} updates leaves nothing to average")
    return lowercut, uppercut


def trimmed_mean(states: Sequence[State], trim_fraction: float,
                 weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Coordinate-wise trimmed mean, unweighted (Flower aggregate_trimmed_avg / _trim_mean, after scipy's).

    Per coordinate the int(trim_fraction * n) smallest and as many largest values are cut and the rest is
    averaged; NaN sorts last, as in np.partition."""
    lo, hi = trim_bounds(len(states), trim_fraction)
    return _coordinatewise(states, weights if weights is not None else [1.0] * len(states),
                           lambda x: x.sort(dim=0).values[lo:hi].mean(dim=0))


def _float_keys(state: State) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point()]


def squared_distances(states: Sequence[State]) -> torch.Tensor:
    """Flower _compute_distances: ||w_i - w_j||^2 between the flattened updates (float tensors; float64)."""
    keys = _float_keys(states[0])
    n = len(states)
    d = torch.zeros((n, n), dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            d[i, j] = d[j, i] = sum(float((states[i][k].double() - states[j][k].double()).pow(2).sum()) for k in keys)
    return d


def krum_scores(states: Sequence[State], f: int) -> list[float]:
    """Flower aggregate_krum's scores: each update's summed squared distance to its n - f - 2 (at least 1)
    nearest others -- as in Flower, the first entry of its sorted distance row is taken to be itself."""
    d = squared_distances(states)
    num_closest = max(1, len(states) - f - 2)
    scores = []
    for i in range(len(states)):
        closest = torch.argsort(d[i], stable=True)[1:num_closest + 1]
        scores.append(float(d[i, closest].sum()))
    return scores


def krum_select(states: Sequence[State], f: int, keep: int = 0) -> list[int]:
    """Indices Krum (keep = 0: np.argmin of the scores) or multi-Krum (np.argsort(scores)[::-1][n - keep:]) picks.

    numpy's own argmin/argsort, as in Flower, so that even ties (two mutual nearest neighbours score alike) are
    broken the same way, and a NaN score is picked by Krum as Flower would -- screening keeps NaN out first.
    `keep` > n keeps all n (Flower's slice would keep keep - n of them)."""
    scores = np.asarray(krum_scores(states, f), dtype=np.float64)
    if keep <= 0:
        return [int(np.argmin(scores))]
    return [int(i) for i in np.argsort(scores)[::-1][len(scores) - min(keep, len(scores)):]]


def aggregate_states(states: Sequence[State], weights: Sequence[float], cfg: AggregationConfig
                     ) -> tuple[dict[str, torch.Tensor], list[int]]:
    """`cfg.rule` over the updates; returns the aggregate and the indices of the updates that entered it."""
    n = len(states)
    if cfg.rule == "fedavg":
        return fedavg(states, weights), list(range(n))
    if cfg.rule == "median":
        return median(states, weights), list(range(n))
    if cfg.rule == "trimmed_mean":
        return trimmed_mean(states, cfg.trim_fraction, weights), list(range(n))
    if cfg.rule in ("krum", "multi_krum"):
        _check_states(states, weights)
        if cfg.rule == "krum":
            (best,) = krum_select(states, cfg.krum_f)
            return {k: v.clone() for k, v in states[best].items()}, [best]   # Flower: weights[argmin(scores)]
        keep = cfg.multi_krum_keep or max(1, n - cfg.krum_f)
        used = krum_select(states, cfg.krum_f, keep)
        # Flower: aggregate(best_results), the sample-weighted average of the kept updates
        return fedavg([states[i] for i in used], [weights[i] for i in used]), used
    raise AggregationError(f"unknown aggregation rule {cfg.rule!r}")


# -- screening ---------------------------------------------------------------------------------------------
def screen_update(state: State, reference: State | None) -> str:
    """Why `state` must not be aggregated ("" if it may): a tensor the reference model lacks, a wrong shape
    or dtype, or NaN/inf values."""
    for k, t in state.items():
        if not isinstance(t, torch.Tensor):
            return f"{k} is not a tensor"
        if reference is not None:
            if k not in reference:
                return f"unknown tensor {k}"
            ref = reference[k]
            if t.shape != ref.shape:
                return f"{k} has shape {list(t.shape)}, the global model {list(ref.shape)}"
            if t.dtype != ref.dtype:
                return f"{k} has dtype {t.dtype}, the global model {ref.dtype}"
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            return f"non-finite values in {k} ({nan} NaN, {inf} inf)"
    return ""


def distances_from(states: Sequence[State], center: State) -> list[float]:
    """||state - center|| over each update's float tensors (float64)."""
    return [math.sqrt(sum(float((s[k].double() - center[k].double()).pow(2).sum()) for k in _float_keys(s)))
            for s in states]


class DistanceHistory:
    """How far the updates a tier accepted in its recent rounds moved the model: the norm rule's scale when a
    round has too few updates of its own to tell an outlier (a round where most honest clients are down must
    not let a lone attacker through)."""

    def __init__(self, size: int = 32) -> None:
        self.values: deque[float] = deque(maxlen=size)

    def extend(self, distances: Sequence[float]) -> None:
        self.values.extend(float(d) for d in distances if math.isfinite(d) and d > 0)


def screen_round(states: Sequence[State], reference: State | None, norm_bound: float | None,
                 history: DistanceHistory | None = None) -> dict[int, str]:
    """Round-relative checks, by index: tensor names other than most updates', and the norm bound.

    The norm rule measures each update's distance from the reference (the global model the round started
    from; without one, the coordinate-wise median of the updates) and rejects those beyond norm_bound x the
    lower median distance -- lower, so that with an even count the scale still comes from the honest half.
    The median is over this round's distances and those of the updates accepted in recent rounds
    (`history`, which then learns this round's accepted ones). It is skipped with fewer than
    MIN_UPDATES_FOR_NORM distances in all, or when the median distance is 0 (most updates did not move the
    model: there is no scale to compare with)."""
    rejected: dict[int, str] = {}
    if not states:
        return rejected
    signatures = [tuple(sorted((k, tuple(t.shape), str(t.dtype)) for k, t in s.items())) for s in states]
    common = Counter(signatures).most_common(1)[0][0]
    for i, sig in enumerate(signatures):
        if sig != common:
            rejected[i] = "its tensors (names, shapes, dtypes) differ from most of the round's updates"
    kept = [i for i in range(len(states)) if i not in rejected]
    if norm_bound is None or not kept:
        return rejected
    past = list(history.values) if history is not None and reference is not None else []
    if len(kept) + len(past) < MIN_UPDATES_FOR_NORM:
        log.info("norm rule skipped: %d update(s), it needs %d to tell an outlier", len(kept), MIN_UPDATES_FOR_NORM)
        return rejected
    ok = [states[i] for i in kept]
    center = reference if reference is not None else median(ok)
    dist = distances_from(ok, center)
    med = float(torch.tensor(dist + past, dtype=torch.float64).median())      # torch: the lower median
    if med <= 0:
        log.info("norm rule skipped: the median update did not move the model")
        return rejected
    scale = "the round's median" if not past else f"the median of this round and {len(past)} recent updates"
    for i, d in zip(kept, dist, strict=True):
        if d > norm_bound * med:
            rejected[i] = f"moved the model by {d:.4g}, more than {norm_bound:g} x {scale} {med:.4g}"
    if history is not None and reference is not None:
        history.extend([d for i, d in zip(kept, dist, strict=True) if i not in rejected])
    return rejected


# -- one round ---------------------------------------------------------------------------------------------
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
    """Collects one round's updates; each accepted update is counted exactly once.

    With a `config` whose validate_updates is on, each offered update is screened against `reference` (the
    global model the round started from) when it arrives, and the round's updates against each other (the
    norm rule) when it is aggregated; a rejected update is recorded in `rejected` (client -> reason), never
    enters the aggregate nor the sample count, and its client has answered for this round (no second try).
    Without a config: plain FedAvg, no screening (as before robust aggregation existed)."""

    def __init__(self, round: int, selected: Sequence[str], deadline_s: float, quorum: int = 1,
                 config: AggregationConfig | None = None, reference: State | None = None,
                 history: DistanceHistory | None = None) -> None:
        if quorum < 1 or quorum > max(1, len(selected)):
            raise AggregationError(f"quorum {quorum} impossible with {len(selected)} selected clients")
        self.config = config if config is not None else AggregationConfig(validate_updates=False)
        self.config.validate()
        self.reference = reference
        self.history = history                      # the tier's recent accepted distances (norm rule scale)
        self.round = round
        self.selected = list(selected)
        self.quorum = quorum
        self.started = time.monotonic()
        self.deadline = self.started + deadline_s
        self.updates: dict[str, Update] = {}        # by client: accepted (and, after aggregate(), screened)
        self.seen_ids: set[str] = set()
        self.refused: list[tuple[str, str]] = []    # (client, reason): not for this round, duplicate, late...
        self.rejected: dict[str, str] = {}          # client -> reason: its update failed validation
        self.abstained: set[str] = set()            # selected clients that said they have nothing this round
        self.aggregated_from: list[str] = []        # clients whose updates entered the aggregate (Krum: fewer)
        self._screened = False
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)

    def _refusal(self, update: Update) -> str:
        if update.round != self.round:
            return f"update for round {update.round}, this is round {self.round}"
        if update.client not in self.selected:
            return f"{update.client} was not selected for round {self.round}"
        if update.update_id in self.seen_ids:
            return f"duplicate update {update.update_id}"
        if update.client in self.updates or update.client in self.rejected:
            return f"{update.client} already delivered an update this round"
        if time.monotonic() > self.deadline and len(self.updates) >= self.quorum:
            return "late: the round closed at its deadline"
        if update.num_samples <= 0:
            return f"update claims {update.num_samples} samples"
        return ""

    def offer(self, update: Update) -> tuple[bool, str]:
        """Try to accept `update`; returns (accepted, reason)."""
        with self._lock:
            reason = self._refusal(update)
            if reason:
                self.refused.append((update.client, reason))
                log.info("round %d: refused update from %s: %s", self.round, update.client, reason)
                return False, reason
            self.seen_ids.add(update.update_id)
            invalid = screen_update(update.state, self.reference) if self.config.validate_updates else ""
            if invalid:
                self._reject(update.client, invalid)
                self._done.notify_all()
                return False, f"rejected: {invalid}"
            self.updates[update.client] = update
            self._done.notify_all()
            return True, "accepted"

    def _reject(self, client: str, reason: str) -> None:
        self.rejected[client] = reason
        log.warning("round %d: rejected the update of %s: %s", self.round, client, reason)

    def abstain(self, client: str) -> tuple[bool, str]:
        """`client` has nothing to deliver this round (e.g. an edge without vehicles): stop waiting for it."""
        with self._lock:
            if client not in self.selected:
                return False, f"{client} was not selected for round {self.round}"
            if client in self.updates or client in self.rejected:
                return False, f"{client} already delivered an update this round"
            self.abstained.add(client)
            self._done.notify_all()
            return True, "abstained"

    def complete(self) -> bool:
        """Every selected client has answered: delivered (accepted or rejected) or abstained."""
        return len((set(self.updates) | set(self.rejected) | self.abstained) & set(self.selected)) == len(self.selected)

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
        return [c for c in self.selected if c not in self.updates and c not in self.abstained
                and c not in self.rejected]

    def screen(self) -> None:
        """The round-relative checks (once): updates that fail them move from `updates` to `rejected`."""
        with self._lock:
            if self._screened or not self.config.validate_updates:
                self._screened = True
                return
            ups = list(self.updates.values())
            for i, reason in screen_round([u.state for u in ups], self.reference, self.config.norm_bound,
                                             self.history).items():
                del self.updates[ups[i].client]
                self._reject(ups[i].client, reason)
            self._screened = True

    def aggregate(self) -> tuple[dict[str, torch.Tensor], int]:
        """The configured rule over the screened updates, and the samples of those that entered it."""
        self.screen()
        with self._lock:
            ups = list(self.updates.values())
        if not ups:
            rejected = f" (rejected: {self.rejected})" if self.rejected else ""
            raise AggregationError(f"round {self.round}: no updates{rejected}")
        state, used = aggregate_states([u.state for u in ups], [u.num_samples for u in ups], self.config)
        self.aggregated_from = [ups[i].client for i in used]
        if len(used) < len(ups):
            log.info("round %d: %s kept %s of %s", self.round, self.config.rule, self.aggregated_from,
                     [u.client for u in ups])
        return state, sum(ups[i].num_samples for i in used)


def two_tier(edges: Sequence[Sequence[tuple[State, int]]]) -> tuple[dict[str, torch.Tensor], int]:
    """Cloud aggregate of edge aggregates: each edge averages (state, samples) pairs, the cloud the edges."""
    edge_aggs = []
    for clients in edges:
        state = fedavg([s for s, _ in clients], [n for _, n in clients])
        edge_aggs.append((state, sum(n for _, n in clients)))
    return fedavg([s for s, _ in edge_aggs], [n for _, n in edge_aggs]), sum(n for _, n in edge_aggs)
