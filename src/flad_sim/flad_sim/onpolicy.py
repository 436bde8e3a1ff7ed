"""On-policy driving data: DAgger (the learner drives, the expert labels) and noise injection (the expert
drives with perturbed controls).

Imitation from expert drives alone leaves a learned driver off-distribution after its first error: it never
saw a frame half a lane off the route, or stopped askew at a junction. The embedded world is cheap, so the
states a learner (or a perturbed expert) actually visits are recorded and labelled by the privileged expert:

- `dagger` (Ross et al., 2011): the learner drives; in each `segment_s` the expert drives instead with
  probability `beta` (the DAgger mixture policy; 0 = the learner alone, as in DAgger's later iterations).
- `noise` (Codevilla et al., 2018 / DART): the expert drives, and every 2-6 s (seeded) a triangular
  perturbation of up to `noise_steer` is added to its steering for `noise_s`, or (with probability
  `noise_longitudinal`) a throttle or brake pulse; the perturbed control is what moves the car.

Either way a frame's waypoint label is the expert's plan from the state the ego is in (`ExpertPlanner`: where
the expert would be 0.5 .. 2.5 s from now along the route centre line, at its own speed), never the future of
the drive that happened (the learner's or the perturbed one). The other labels (light, target point, command,
instruction, notice, BEV) are the world's, as in `flad sim collect`; the samples have the dataset's schema, so
they train every model that trains on expert data, and the shard manifest records how they were made.

The learner is a plugin (`learner`: "module:function" + keyword arguments) that `flad_sim` imports only at run
time, because the models live in the packages above it (flad_vehicle, flad_edge).
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flad_sim.physics import Control

log = logging.getLogger(__name__)

MODES = ("dagger", "noise")


@dataclass
class OnPolicyConfig:
    """How on-policy frames are made (module docstring)."""

    mode: str = "noise"
    beta: float = 0.0                    # dagger: probability that the expert drives a segment
    segment_s: float = 2.0               # dagger: the mixture draws who drives every this many seconds
    learner: str = ""                    # dagger: "module:function" returning an Agent (reset/run_step)
    learner_kwargs: dict[str, Any] = field(default_factory=dict)
    noise_steer: float = 0.3             # noise: peak steering perturbation (steer units, [-1, 1])
    noise_s: float = 1.0                 # noise: duration of one perturbation (s)
    noise_gap_s: tuple[float, float] = (2.0, 6.0)    # noise: seconds between perturbations (uniform)
    noise_longitudinal: float = 0.25     # noise: probability that a perturbation is a throttle/brake pulse
    min_route_m: float = 150.0
    max_route_m: float = 400.0

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"on-policy mode {self.mode!r}: one of {MODES}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta}")
        if self.mode == "dagger" and ":" not in self.learner:
            raise ValueError(f"dagger needs a learner 'module:function', got {self.learner!r}")
        if self.segment_s <= 0 or self.noise_s <= 0 or not 0 < self.noise_gap_s[0] <= self.noise_gap_s[1]:
            raise ValueError("segment_s, noise_s and noise_gap_s must be > 0 (noise_gap_s as (min, max))")
        if not 0.0 <= self.noise_longitudinal <= 1.0 or self.noise_steer < 0:
            raise ValueError("noise_longitudinal must be in [0, 1] and noise_steer >= 0")

    def describe(self) -> dict[str, Any]:
        keys = (("beta", "segment_s", "learner", "learner_kwargs") if self.mode == "dagger" else
                ("noise_steer", "noise_s", "noise_gap_s", "noise_longitudinal"))
        return {"mode": self.mode, "labels": "expert plan from the visited state",
                **{k: getattr(self, k) for k in keys}}


def load_learner(spec: str, kwargs: dict[str, Any]) -> Any:
    """The Agent that `spec` ("module:function") returns for `kwargs`."""
    module, _, name = spec.partition(":")
    factory: Callable[..., Any] = getattr(importlib.import_module(module), name)
    return factory(**kwargs)


class NoiseSchedule:
    """Triangular control perturbations at seeded random times (module docstring)."""

    def __init__(self, cfg: OnPolicyConfig, rng: np.random.Generator, t0: float = 0.0) -> None:
        self.cfg = cfg
        self.rng = rng
        self._plan(t0)
        self.perturbed_ticks = 0

    def _plan(self, after: float) -> None:
        c = self.cfg
        self.start = after + float(self.rng.uniform(*c.noise_gap_s))
        self.longitudinal = bool(self.rng.random() < c.noise_longitudinal)
        self.sign = 1.0 if self.rng.random() < 0.5 else -1.0

    def amount(self, t: float) -> float:
        """The perturbation's shape at time t: 0 outside, rising to 1 at its middle, back to 0 at its end."""
        u = (t - self.start) / self.cfg.noise_s
        return 0.0 if not 0.0 <= u <= 1.0 else 1.0 - abs(2.0 * u - 1.0)

    def apply(self, control: Control, t: float) -> Control:
        if t > self.start + self.cfg.noise_s:
            self._plan(t)
        a = self.amount(t)
        if a <= 0.0:
            return control
        self.perturbed_ticks += 1
        if not self.longitudinal:
            steer = float(np.clip(control.steer + self.sign * self.cfg.noise_steer * a, -1.0, 1.0))
            return Control(throttle=control.throttle, steer=steer, brake=control.brake)
        if self.sign > 0:        # a throttle pulse (and no brake): the expert has to slow down again
            return Control(throttle=float(max(control.throttle, 0.7 * a)), steer=control.steer, brake=0.0)
        return Control(throttle=0.0, steer=control.steer, brake=float(max(control.brake, 0.6 * a)))


@dataclass
class OnPolicySource:
    """A `flad_sim.dataset` sample source (town, n, seed, CollectConfig) -> samples, for `collect()`."""

    cfg: OnPolicyConfig

    @property
    def name(self) -> str:
        return self.cfg.mode

    def __call__(self, town: str, n: int, seed: int, collect_cfg: Any) -> Iterator[dict[str, Any]]:
        return onpolicy_samples(town, n, seed, collect_cfg, self.cfg)


def onpolicy_samples(town: str, n: int, seed: int, collect_cfg: Any, cfg: OnPolicyConfig
                     ) -> Iterator[dict[str, Any]]:
    """`n` on-policy samples in `town` (module docstring): seeded routes, a fresh World per route."""
    from flad_sim.route import random_route
    from flad_sim.schema import sample_fields
    from flad_sim.sensors import SensorRig

    cfg.validate()
    rig = SensorRig(collect_cfg.rig_config())
    specs = sample_fields(rig.camera_sizes, rig.lidar_rays)
    rng = np.random.default_rng([int(seed), 9001, MODES.index(cfg.mode)])
    learner = load_learner(cfg.learner, cfg.learner_kwargs) if cfg.mode == "dagger" else None
    made, route_index = 0, 0
    while made < n:
        from flad_sim.world import World

        world = World(town, seed=(int(seed) * 7919 + route_index) % (2 ** 31))
        rid = f"{town}/{seed}/{cfg.mode}{route_index}"
        route = random_route(world.town, rng, cfg.min_route_m, cfg.max_route_m, route_id=rid)
        for sample in _drive_route(world, route, rig, specs, cfg, collect_cfg.record_every, learner, rng, n - made):
            made += 1
            yield sample
        route_index += 1


def _drive_route(world: Any, route: Any, rig: Any, specs: dict[str, Any], cfg: OnPolicyConfig, record_every: int,
                 learner: Any, rng: np.random.Generator, budget: int) -> Iterator[dict[str, Any]]:
    """One route until the leaderboard scorer ends it (or `budget` frames): records every `record_every` ticks."""
    from flad_sim.agent import RouteInfo
    from flad_sim.bag import cached_sensor_observer
    from flad_sim.closed_loop import ExpertPlanner
    from flad_sim.dataset import sample_from
    from flad_sim.labels import LabelMaker
    from flad_sim.metrics import STATUS_RUNNING, RouteScorer

    ego = world.spawn_ego(route)
    planner = ExpertPlanner(world)
    planner.reset(RouteInfo(route, world.town.name, ego, route.route_id, world))
    if learner is not None:
        learner.reset(RouteInfo(route, world.town.name, ego, route.route_id, None))
    scorer = RouteScorer(route, world.town)
    labels = LabelMaker(world, ego, route)
    observe = cached_sensor_observer(rig)
    noise = NoiseSchedule(cfg, rng, world.time_s)
    expert_turn, next_draw, tick, made = True, -math.inf, 0, 0
    while scorer.status == STATUS_RUNNING and made < budget:
        wp = planner.waypoints()                 # advances the expert; its own control is planner.last_control
        lab = labels.current(scorer.progress)
        sensors = observe(world, ego)["sensors"]  # rendered at most once this tick (recorder and learner)
        if tick % record_every == 0:
            yield sample_from(sensors(), lab, specs, wp)
            made += 1
        t = world.time_s
        if learner is None:
            control = noise.apply(planner.last_control, t)
        else:
            if t >= next_draw:
                expert_turn, next_draw = bool(rng.random() < cfg.beta), t + cfg.segment_s
            obs = {"ego": world.ego_state(ego), "time_s": t, "route": route, "route_s": scorer.progress,
                   "labels": lab, "sensors": sensors}
            control = planner.last_control if expert_turn else learner.run_step(obs)
        world.step({ego: control})
        e = world.egos[ego]
        scorer.update(world.time_s, e.center(), e.yaw, e.v, world.events(ego))
        tick += 1
    log.debug("on-policy route %s: %s after %d ticks, %d frames", route.route_id, scorer.status, tick, made)
