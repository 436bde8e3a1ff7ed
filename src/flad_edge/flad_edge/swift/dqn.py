"""Phase 2 of SWIFT: a Double DQN that builds a pipeline stage by stage (§4.1.3, Eq. 12).

Episode: start at layer 0 with every vehicle unplaced. An action is the paper's coupled decision -- which
vehicle goes next in the path (scheduling) and how many layers it takes (partition size (v, M_cap^v)). The
Q-network scores (state, action) feature vectors, so one network serves clusters of any size and profiles
of any depth; candidates are all valid (v, end) pairs, thinned to at most `MAX_ENDS` ends per vehicle.

State features (the paper's five components): (1) remaining model capacity M_cap - sum M_cap^v, (2) current
partitions (stages placed, layers left), (3) memory-efficiency ratios M_cap^v / mem_v, (4) t_cmp and t_com
so far, (5) the path (position in it). Action features describe the vehicle and the partition it would take.

Reward (Eq. 12): r = w1 * -(t_cmp^v + t_com^v) + w2 1(M_cap^v <= mem_v) + w3 1(disjoint) + w4 1(DAG valid),
with times normalised by a per-instance reference time; at the terminal state r -= t_path. Invalid actions
(memory overflow, overlapping or non-contiguous ranges, dead ends from which the remaining vehicles cannot
cover the model) are masked with the exact cover table, so the indicators are always 1 and every rollout is
feasible whenever the instance is. For the `bottleneck` objective the step cost is the increase of the
largest stage cost and the terminal penalty the bottleneck.

Hyper-parameters (documented choice): MLP 2x128 ReLU, Adam lr 1e-3, batch 64, gamma 1 (finite episodes
of exactly n steps), Huber loss, replay 10k, epsilon 1 -> 0.05 over 60% of the episodes, target network
synced every 200 updates, one update per 2 environment steps, w = (1, 0.1, 0.1, 0.1).
Training instances: 3-9 vehicles from the Table-1 mix (40-70% of memory usable), synthetic profiles of
0.5-16 GB (log-uniform) and 16-48 layers with 1-3 raw-input layers pinned to stage 0, mu in [0.3, 0.7],
nu in [1.1, 1.5].
The policy is saved with safetensors (atomically) and reused; its metadata records objective and budget.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from flad_core.atomic import atomic_write_bytes
from flad_core.config import ConfigError
from flad_edge.swift.cost import CostModel
from flad_edge.swift.cover import cover_table
from flad_edge.swift.model import random_cluster, synthetic_profile

log = logging.getLogger(__name__)

FEATURE_VERSION = "2"
N_FEATURES = 26
MAX_ENDS = 12
W = (1.0, 0.1, 0.1, 0.1)
DEFAULT_EPISODES = int(os.environ.get("FLAD_SWIFT_DQN_EPISODES", "800"))


class PolicyFileError(ConfigError):
    """A file at a policy path that is there but not a usable DQN policy (unreadable, corrupt, foreign).

    `load_or_train` raises it instead of training over the file: the file is left as it is. A ConfigError, so
    `flad` reports it as one line naming the path."""

    def __init__(self, path: str | Path, exc: BaseException) -> None:
        why = " ".join(str(exc).split())   # one line: torch's load_state_dict errors span several
        super().__init__(str(path), f"not a usable DQN policy ({type(exc).__name__}: {why}); left as it is: move "
                                    "it away to train a new one there, or pass another path (`flad edge "
                                    "train-policy --out FILE` makes one)")
        self.path = Path(path)


def default_policy_path(objective: str = "path") -> Path:
    """Where a trained policy lives unless told otherwise ($FLAD_SWIFT_POLICY_DIR or ~/.cache/flad/swift)."""
    root = Path(os.environ.get("FLAD_SWIFT_POLICY_DIR") or Path.home() / ".cache" / "flad" / "swift")
    return root / f"dqn_{objective}.safetensors"


class Env:
    """One planning episode on a cost model (the MDP of Phase 2)."""

    def __init__(self, cm: CostModel, objective: str, cover: np.ndarray, first: int | None = None) -> None:
        self.cm, self.objective, self.cover, self.first = cm, objective, cover, first
        cl = cm.cluster
        self.tfl = np.array([v.tflops for v in cl.vehicles])
        self.link = np.array([v.link_mbps for v in cl.vehicles])
        self.stab = np.array([v.stability for v in cl.vehicles])
        self.m_cap = float(cm.mem_prefix[-1]) or 1.0
        k = cl.n_batch * cl.nu
        self.t_ref = (float(cm.flops_prefix[-1]) * k / (self.tfl.mean() * 1e12 * cl.mu)
                      + 2 * float(cm.act.mean()) * k / (self.link.mean() * 1e6 / 8) * max(1, cm.n - 1)) or 1.0
        self.act_max = float(cm.act.max()) or 1.0
        self.reset()

    def reset(self) -> None:
        self.pos, self.R = 0, (1 << self.cm.n) - 1
        self.order: list[int] = []
        self.cuts = [0]
        self.cum = 0.0
        self.worst = 0.0
        self.eff: list[float] = []

    @property
    def done(self) -> bool:
        return self.R == 0

    def candidates(self) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Valid (vehicle, end) actions and their feature rows."""
        cm, L, a, R = self.cm, self.cm.L, self.pos, self.R
        k = bin(R).count("1")
        vs = [self.first] if (self.first is not None and not self.order) else [v for v in range(cm.n) if R >> v & 1]
        acts: list[tuple[int, int]] = []
        for v in vs:
            bmax = min(int(cm.max_end[v, a]), L - (k - 1))
            if bmax <= a:
                continue
            bs = np.arange(max(a + 1, cm.min_first if a == 0 else 0), bmax + 1)
            bs = bs[self.cover[R ^ (1 << v)][bs]]
            if len(bs) > MAX_ENDS:  # keep the cheapest cuts to send and an even spread, plus the largest
                small = bs[np.argsort(cm.act[bs - 1], kind="stable")[: MAX_ENDS // 2]]
                spread = bs[np.linspace(0, len(bs) - 1, MAX_ENDS // 2).round().astype(int)]
                bs = np.unique(np.concatenate([small, spread, bs[-1:]]))
            acts.extend((v, int(b)) for b in bs)
        return self._features(acts), acts

    def _features(self, acts: list[tuple[int, int]]) -> np.ndarray:
        cm, L, a, R = self.cm, self.cm.L, self.pos, self.R
        n = cm.n
        k = bin(R).count("1")
        out = np.zeros((len(acts), N_FEATURES), dtype=np.float32)
        if not acts:
            return out
        v = np.array([x[0] for x in acts])
        b = np.array([x[1] for x in acts])
        rem_mem_now = self.m_cap - float(cm.mem_prefix[a])
        mem_R = float(cm.mem_v[self._bits(R)].sum())
        out[:, 0] = (L - a) / L
        out[:, 1] = rem_mem_now / self.m_cap
        out[:, 2] = len(self.order) / n
        out[:, 3] = k / n
        out[:, 4] = self.cum / self.t_ref
        out[:, 5] = self.worst / self.t_ref
        out[:, 6] = float(np.mean(self.eff)) if self.eff else 0.0
        out[:, 7] = min(4.0, mem_R / max(rem_mem_now, 1.0))
        out[:, 8] = n / 10
        part_mem = cm.mem_prefix[b] - cm.mem_prefix[a]
        tc = cm.cmp[v, a, b]
        tm = cm.com[v, a, b]
        out[:, 9] = np.minimum(4.0, cm.mem_v[v] / self.m_cap)
        out[:, 10] = self.tfl[v] / self.tfl.max()
        out[:, 11] = self.link[v] / self.link.max()
        out[:, 12] = self.stab[v]
        out[:, 13] = (b - a) / L
        out[:, 14] = part_mem / cm.mem_v[v]
        out[:, 15] = part_mem / self.m_cap
        out[:, 16] = tc / self.t_ref
        out[:, 17] = tm / self.t_ref
        out[:, 18] = b == L
        out[:, 19] = (L - b) / L
        rest_mem = mem_R - cm.mem_v[v]
        rem_after = self.m_cap - cm.mem_prefix[b]
        out[:, 20] = np.where(rest_mem > 0, np.minimum(4.0, rem_after / np.maximum(rest_mem, 1.0)), 0.0)
        tfl_R = np.where(self._bits(R), self.tfl, 0.0)
        top = np.argsort(-tfl_R, kind="stable")
        second = tfl_R[top[1]] if n > 1 else 0.0
        tfl_rest_max = np.where(v == top[0], second, tfl_R[top[0]])
        kk = cm.cluster.n_batch * cm.cluster.nu / (1e12 * cm.cluster.mu)
        lb = np.where(tfl_rest_max > 0, (cm.flops_prefix[-1] - cm.flops_prefix[b]) * kk / np.maximum(tfl_rest_max,
                                                                                                      1e-9), 0.0)
        out[:, 21] = np.minimum(10.0, lb / self.t_ref)
        out[:, 22] = np.where(k > 1, (tfl_R.sum() - self.tfl[v]) / max(k - 1, 1) / self.tfl.max(), 0.0)
        out[:, 23] = np.where(b < L, cm.act[b - 1] / self.act_max, 0.0)
        out[:, 24] = np.minimum(10.0, self._step_cost(tc + tm) / self.t_ref)
        out[:, 25] = 1.0 if self.objective == "path" else 0.0
        return out

    def _bits(self, R: int) -> np.ndarray:
        return (R >> np.arange(self.cm.n)) & 1 == 1

    def _step_cost(self, stage: np.ndarray | float) -> np.ndarray | float:
        return stage if self.objective == "path" else np.maximum(0.0, stage - self.worst)

    def step(self, action: tuple[int, int]) -> float:
        """Apply (vehicle, end); return the Eq. 12 reward (normalised)."""
        v, b = action
        cm, a = self.cm, self.pos
        part_mem = float(cm.mem_prefix[b] - cm.mem_prefix[a])
        stage = float(cm.cmp[v, a, b] + cm.com[v, a, b])
        mem_ok = part_mem <= cm.mem_v[v] * (1 + 1e-12)
        disjoint = b > a and v not in self.order
        dag_ok = bool(self.R >> v & 1)
        r = W[0] * -float(self._step_cost(stage)) / self.t_ref + W[1] * mem_ok + W[2] * disjoint + W[3] * dag_ok
        self.order.append(v)
        self.cuts.append(b)
        self.cum += stage
        self.worst = max(self.worst, stage)
        self.eff.append(part_mem / cm.mem_v[v])
        self.pos, self.R = b, self.R ^ (1 << v)
        if self.done:
            final = self.cum if self.objective == "path" else self.worst
            r -= final / self.t_ref
        return r


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch single-threaded for a block: tiny MLPs only lose to thread hand-offs on a shared host."""
    threads = torch.get_num_threads()
    if threads != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads != 1:
            torch.set_num_threads(threads)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(N_FEATURES, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1))


@dataclass
class DQNPolicy:
    """A trained Q-network; `rollout` plans greedily w.r.t. Q under the feasibility mask."""

    net: nn.Module
    objective: str = "path"
    meta: dict[str, str] = field(default_factory=dict)

    @torch.no_grad()
    def q_values(self, feats: np.ndarray) -> np.ndarray:
        """Q(s, a) for candidate rows (call under `one_thread()`: a small MLP is 10x slower with BLAS threads)."""
        return self.net(torch.from_numpy(feats)).squeeze(-1).numpy()

    def rollout(self, cm: CostModel, first: int | None = None, objective: str | None = None,
                cover: np.ndarray | None = None) -> tuple[list[int], list[int]] | None:
        if cover is None:
            cover = cover_table(cm)
        env = Env(cm, objective or self.objective, cover, first)
        with one_thread():
            while not env.done:
                feats, acts = env.candidates()
                if not acts:
                    return None
                env.step(acts[int(self.q_values(feats).argmax())])
        return env.order, env.cuts

    def save(self, path: str | Path) -> None:
        meta = {"feature_version": FEATURE_VERSION, "objective": self.objective, **self.meta}
        data = st_save({k: v.detach().contiguous() for k, v in self.net.state_dict().items()}, metadata=meta)
        atomic_write_bytes(path, data)

    @classmethod
    def load(cls, path: str | Path) -> DQNPolicy:
        raw = Path(path).read_bytes()
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
        if meta.get("feature_version") != FEATURE_VERSION:
            raise ValueError(f"{path}: policy feature version {meta.get('feature_version')!r}, "
                             f"need {FEATURE_VERSION!r}; retrain it")
        net = _mlp()
        net.load_state_dict(st_load(raw))
        net.eval()
        pol = cls(net, meta.get("objective", "path"), meta)
        with one_thread():  # pay torch's first-call setup here, not inside a timed plan
            pol.q_values(np.zeros((1, N_FEATURES), np.float32))
        return pol


def random_instance(rng: np.random.Generator) -> CostModel:
    """A training instance drawn like the bench's (Table-1 mix, synthetic profiles)."""
    n = int(rng.integers(3, 10))
    cl = random_cluster(n, seed=int(rng.integers(1 << 31)), mem_fraction=float(rng.uniform(0.4, 0.7)),
                        mu=float(rng.uniform(0.3, 0.7)), nu=float(rng.uniform(1.1, 1.5)), n_batch=100)
    # footprints log-uniform 0.5-16 GB: from "fits anywhere" (the real tiny/paper encoders at batch 4) to
    # "needs most of the cluster" (the paper's 14 GB); some profiles pin raw-input layers to stage 0
    pr = synthetic_profile(float(np.exp(rng.uniform(np.log(0.5), np.log(16.0)))), n_layers=int(rng.integers(16, 49)),
                           seed=int(rng.integers(1 << 31)))
    pr.meta["min_first_stage_end"] = int(rng.integers(1, 4))
    return CostModel(cl, pr)


def train(episodes: int = DEFAULT_EPISODES, objective: str = "path", seed: int = 0, batch: int = 64,
          lr: float = 1e-3, gamma: float = 1.0, buffer_size: int = 10_000, target_sync: int = 200,
          instances: list[CostModel] | None = None, time_budget_s: float | None = None,
          train_every: int = 2, progress: bool = True) -> DQNPolicy:
    """Train a Double DQN policy on random instances (or the given ones); deterministic for a seed.

    A progress bar (episodes, on stderr) shows unless `progress=False` or stdout/stderr is not a terminal."""
    from tqdm import tqdm

    show = progress and sys.stdout.isatty() and sys.stderr.isatty()
    bar = tqdm(total=episodes, desc=f"train DQN policy ({objective})", unit="ep", leave=False, disable=not show)
    with one_thread(), bar:
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        online, target = _mlp(), _mlp()
        target.load_state_dict(online.state_dict())
        opt = torch.optim.Adam(online.parameters(), lr=lr)
        replay: deque = deque(maxlen=buffer_size)
        updates, t0, done_eps, steps = 0, time.perf_counter(), 0, 0
        for ep in range(episodes):
            if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
                break
            bar.update()
            eps = max(0.05, 1.0 - ep / max(1.0, 0.6 * episodes))
            cm = instances[ep % len(instances)] if instances else random_instance(rng)
            if float(cm.mem_v.sum()) < float(cm.mem_prefix[-1]) or cm.n > cm.L:
                continue
            cover = cover_table(cm)
            first = int(rng.integers(cm.n)) if rng.random() < 0.5 else None
            env = Env(cm, objective, cover, first)
            feats, acts = env.candidates()
            if not acts:
                continue
            done_eps += 1
            while True:
                if rng.random() < eps:
                    i = int(rng.integers(len(acts)))
                else:
                    with torch.no_grad():
                        i = int(online(torch.from_numpy(feats)).argmax())
                r = env.step(acts[i])
                if env.done:
                    nfeats = np.zeros((0, N_FEATURES), np.float32)
                else:
                    nfeats, nacts = env.candidates()
                replay.append((feats[i], r, nfeats, env.done or len(nfeats) == 0))
                steps += 1
                if len(replay) >= batch and steps % train_every == 0:
                    _update(online, target, opt, replay, rng, batch, gamma)
                    updates += 1
                    if updates % target_sync == 0:
                        target.load_state_dict(online.state_dict())
                if env.done or len(nfeats) == 0:
                    break
                feats, acts = nfeats, nacts
        online.eval()
        meta = {"episodes": str(done_eps), "seed": str(seed), "updates": str(updates),
                "train_time_s": f"{time.perf_counter() - t0:.2f}",
                "hparams": json.dumps({"lr": lr, "batch": batch, "gamma": gamma, "buffer": buffer_size,
                                       "target_sync": target_sync, "train_every": train_every, "w": W,
                                       "hidden": [128, 128]})}
        log.info("trained DQN policy (%s): %s episodes, %d updates in %.1f s", objective, done_eps, updates,
                 time.perf_counter() - t0)
        return DQNPolicy(online, objective, meta)


def _update(online: nn.Module, target: nn.Module, opt: torch.optim.Optimizer, replay: deque,
            rng: np.random.Generator, batch: int, gamma: float) -> None:
    idx = rng.integers(len(replay), size=batch)
    items = [replay[int(i)] for i in idx]
    x = torch.from_numpy(np.stack([it[0] for it in items]))
    r = torch.tensor([it[1] for it in items], dtype=torch.float32)
    done = torch.tensor([it[3] for it in items], dtype=torch.bool)
    width = max(1, max(len(it[2]) for it in items))
    nx = np.zeros((batch, width, N_FEATURES), np.float32)
    mask = np.zeros((batch, width), bool)
    for j, it in enumerate(items):
        nx[j, : len(it[2])] = it[2]
        mask[j, : len(it[2])] = True
    nxt = torch.from_numpy(nx)
    m = torch.from_numpy(mask)
    with torch.no_grad():  # Double DQN: the online net picks a', the target net values it
        q_on = online(nxt).squeeze(-1).masked_fill(~m, -math.inf)
        a_star = q_on.argmax(dim=1, keepdim=True)
        q_tg = target(nxt).squeeze(-1).gather(1, a_star).squeeze(1)
        y = r + gamma * torch.where(done, torch.zeros_like(q_tg), q_tg)
    q = online(x).squeeze(-1)
    loss = nn.functional.smooth_l1_loss(q, y)
    opt.zero_grad()
    loss.backward()
    nn.utils.clip_grad_norm_(online.parameters(), 10.0)
    opt.step()


def _feature_version(path: Path) -> str | None:
    """The feature version a FLAD policy file records (None: not readable as one)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get("feature_version")
    except Exception:   # safetensors raises its own error type for a foreign file
        return None


def _load_existing(path: Path) -> DQNPolicy | None:
    """The policy saved at `path`, or None for a FLAD policy of an older feature version (it cannot be used;
    it is retrained in place, as before). Anything else there that does not load raises PolicyFileError."""
    try:
        return DQNPolicy.load(path)
    except Exception as exc:   # safetensors raises its own error type for a foreign file
        old = _feature_version(path)
        if old is not None and old != FEATURE_VERSION:
            log.warning("DQN policy %s has feature version %r, need %r; retraining it", path, old, FEATURE_VERSION)
            return None
        raise PolicyFileError(path, exc) from exc


def load_or_train(path: str | Path | None = None, objective: str = "path", episodes: int | None = None,
                  seed: int = 0) -> DQNPolicy:
    """Reuse the saved policy at `path` (default location per objective); train and save one if missing.

    A file there that is not a usable policy (unreadable, corrupt, foreign) raises PolicyFileError and is left
    untouched; only a FLAD policy of an older feature version is retrained in its place."""
    p = Path(path) if path else default_policy_path(objective)
    if p.exists():
        pol = _load_existing(p)
        if pol is not None:
            return pol
    log.info("no DQN policy at %s; training one (%d episodes)", p, episodes or DEFAULT_EPISODES)
    pol = train(episodes or DEFAULT_EPISODES, objective, seed)
    pol.save(p)
    return pol
