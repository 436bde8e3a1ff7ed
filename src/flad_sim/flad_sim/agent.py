"""The agent API and the closed-loop route runner (the leaderboard's evaluator, embedded).

An agent sees an observation dict and returns a Control. By default the observation is the ego state,
the route info and the current frame labels; the sensor side plugs its cameras/LiDAR in with
`observe=` (a callable (world, ego_id) -> dict, merged over the default observation).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from flad_sim.labels import LabelMaker
from flad_sim.metrics import STATUS_RUNNING, RouteRecord, RouteScorer
from flad_sim.physics import Control
from flad_sim.route import Route
from flad_sim.world import World

log = logging.getLogger(__name__)


@dataclass
class RouteInfo:
    """What an agent is told at the start of a route (the route itself is the 'GPS route' of CARLA)."""

    route: Route
    town: str
    ego_id: int
    route_id: str = ""
    world: World | None = None      # privileged handle, for experts only; learned agents must not use it


@runtime_checkable
class Agent(Protocol):
    def reset(self, route_info: RouteInfo) -> None: ...

    def run_step(self, observation: dict[str, Any]) -> Control: ...


class RouteFollowerAgent:
    """A blind baseline: pure pursuit along the route at a fixed speed, ignoring lights and traffic.

    Non-privileged (uses only the ego state and the route). Used for scripted infraction scenarios;
    `lateral_offset(s)` (metres, + left) lets a scenario drive beside the route; `go_after_s` holds the
    brake until that simulated time.
    """

    def __init__(self, speed: float = 6.0, lateral_offset: Callable[[float], float] | None = None,
                 go_after_s: float = 0.0, stop_at_s: float | None = None) -> None:
        self.speed = speed
        self.lateral_offset = lateral_offset
        self.go_after_s = go_after_s
        self.stop_at_s = stop_at_s

    def reset(self, route_info: RouteInfo) -> None:
        self.route = route_info.route
        self.s = 0.0

    def run_step(self, observation: dict[str, Any]) -> Control:
        ego = observation["ego"]
        r = self.route
        rear = (ego.x, ego.y)
        self.s, _ = r.project(rear, self.s, back=5.0, ahead=25.0)
        ld = max(4.5, min(3.0 + 0.5 * abs(ego.speed), 12.0))
        s_t = self.s + ld
        tx, ty = r.point_at(s_t)
        if self.lateral_offset is not None:
            h = r.heading_at(s_t)
            off = self.lateral_offset(s_t)
            tx, ty = tx - math.sin(h) * off, ty + math.cos(h) * off
        alpha = math.atan2(ty - ego.y, tx - ego.x) - ego.yaw
        alpha = (alpha + math.pi) % (2 * math.pi) - math.pi
        delta = math.atan2(2.0 * 2.9 * math.sin(alpha), ld)
        steer = max(-1.0, min(1.0, -delta / math.radians(70.0)))
        stop = observation["time_s"] < self.go_after_s or (self.stop_at_s is not None and self.s >= self.stop_at_s)
        if stop:
            return Control(steer=steer, brake=1.0)
        err = self.speed - ego.speed
        if err > 0:
            return Control(throttle=min(1.0, 0.3 + 0.3 * err), steer=steer)
        return Control(steer=steer, brake=min(1.0, -0.2 * err))


Observe = Callable[[World, int], dict[str, Any]]
OnTick = Callable[[World, int, dict[str, Any], Control], None]


class RouteRunner:
    """Runs one agent on one route in a world in closed loop and scores it.

    The default observation is {"ego": EgoState, "time_s", "route": Route, "route_s": progress, "labels":
    LabelMaker.current()} (labels=False skips the labels, e.g. for an expert that does not read them).
    `observe(world, ego_id)` adds sensor data to the observation; `on_tick(world, ego_id, obs, control)`
    is called after each agent step (data collection hooks in here). The ego is spawned at the route start
    unless `ego_id` is given.
    """

    def __init__(self, world: World, route: Route, agent: Agent, observe: Observe | None = None,
                 ego_id: int | None = None, on_tick: OnTick | None = None, max_ticks: int | None = None,
                 privileged: bool = False, labels: bool = True) -> None:
        self.world = world
        self.route = route
        self.agent = agent
        self.observe = observe
        self.on_tick = on_tick
        self.ego_id = world.spawn_ego(route) if ego_id is None else ego_id
        self.scorer = RouteScorer(route, world.town)
        self.labels = LabelMaker(world, self.ego_id, route)
        self.max_ticks = max_ticks
        self.privileged = privileged
        self.with_labels = labels

    def observation(self) -> dict[str, Any]:
        obs: dict[str, Any] = {"ego": self.world.ego_state(self.ego_id), "time_s": self.world.time_s,
                               "route": self.route, "route_s": self.scorer.progress}
        if self.with_labels:
            obs["labels"] = self.labels.current(self.scorer.progress)
        if self.observe is not None:
            obs.update(self.observe(self.world, self.ego_id))
        return obs

    def run(self) -> RouteRecord:
        w, ego = self.world, self.ego_id
        info = RouteInfo(self.route, w.town.name, ego, self.route.route_id, w if self.privileged else None)
        self.agent.reset(info)
        ticks = 0
        while self.scorer.status == STATUS_RUNNING:
            obs = self.observation()
            try:
                control = self.agent.run_step(obs)
            except Exception as exc:          # an agent bug ends its route, not the evaluation
                log.exception("agent failed on route %s", self.route.route_id)
                self.scorer.fail(w.time_s, f"{type(exc).__name__}: {exc}")
                break
            if self.on_tick is not None:
                self.on_tick(w, ego, obs, control)
            w.step({ego: control})
            e = w.egos[ego]
            self.scorer.update(w.time_s, e.center(), e.yaw, e.v, w.events(ego))
            ticks += 1
            if self.max_ticks is not None and ticks >= self.max_ticks:
                break
        rec = self.scorer.record()
        log.info("route %s: %s RC %.1f IS %.3f DS %.1f (%.1f s)", rec.route_id, rec.status, rec.rc, rec.is_, rec.ds,
                 rec.duration_s)
        return rec


def run_routes(town: str | int, seed: int, routes: list[Route], make_agent: Callable[[], Agent],
               privileged: bool = False, **world_kwargs: Any) -> list[RouteRecord]:
    """Each route in a fresh world (seeded by seed and route index), as the leaderboard does."""
    out = []
    for i, r in enumerate(routes):
        w = World(town, seed=seed * 1000 + i, **world_kwargs)
        out.append(RouteRunner(w, r, make_agent(), privileged=privileged).run())
    return out
