"""Each infraction type triggered by a scripted drive in the world, scored with the right penalty."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flad_sim import scene
from flad_sim.agent import RouteFollowerAgent, RouteRunner
from flad_sim.expert import ExpertAgent
from flad_sim.metrics import STATUS_COMPLETED, STATUS_DEVIATION
from flad_sim.physics import Control
from flad_sim.route import Route, build_route
from flad_sim.towns import CONTROL_LIGHT, CONTROL_STOP, TURN_STRAIGHT, Town
from flad_sim.world import World


def approach(town: Town, control: int) -> Route:
    """~30 m before a controlled junction, straight through it, ~25 m beyond."""
    for sl in town.stop_lines:
        lk = town.links[sl.link]
        nxt = [n for n, t in lk.out if t == TURN_STRAIGHT]
        if sl.control == control and nxt and lk.length > 45 and town.links[nxt[0]].length > 35:
            return build_route(town, [lk.id, nxt[0]], 0, lk.length - 35.0, 25.0, route_id=f"approach/{control}")
    raise AssertionError("no suitable approach")


def straight(town: Town) -> Route:
    lk = next(lk for lk in town.links if lk.length > 70)
    return build_route(town, [lk.id], 0, 2.0, lk.length - 2.0, route_id="straight")


def empty_world(town: str) -> World:
    return World(town, seed=0, n_vehicles=0, n_pedestrians=0)


def kinds(rec) -> list[str]:
    return [i.kind for i in rec.infractions]


def test_red_light() -> None:
    w = empty_world("Town02")
    route = approach(w.town, CONTROL_LIGHT)
    sig = w.town.stop_lines[route.stops[0][1]].signal
    runner = RouteRunner(w, route, RouteFollowerAgent(speed=8.0))
    ego = runner.ego_id
    # hold until the light has just turned red, then drive through it
    was = w.signal_states[sig]
    while not (was != scene.TL_RED and w.signal_states[sig] == scene.TL_RED):
        was = w.signal_states[sig]
        w.step({ego: Control(brake=1.0)})
    rec = runner.run()
    assert rec.status == STATUS_COMPLETED
    assert kinds(rec) == ["red_light"]
    assert rec.infractions[0].penalty == 0.7
    assert rec.is_ == pytest.approx(0.7) and rec.ds == pytest.approx(70.0)
    assert rec.infractions[0].time_s > 0 and math.isfinite(rec.infractions[0].x)


def test_green_light_is_clean() -> None:
    w = empty_world("Town02")
    route = approach(w.town, CONTROL_LIGHT)
    sig = w.town.stop_lines[route.stops[0][1]].signal
    runner = RouteRunner(w, route, RouteFollowerAgent(speed=8.0))
    while w.signal_states[sig] != scene.TL_RED:
        w.step({runner.ego_id: Control(brake=1.0)})
    while w.signal_states[sig] != scene.TL_GREEN:      # a fresh green: 7 s is enough to reach and cross
        w.step({runner.ego_id: Control(brake=1.0)})
    rec = runner.run()
    assert rec.status == STATUS_COMPLETED and rec.infractions == [] and rec.ds == 100.0


def test_running_a_stop_sign_and_stopping_at_it() -> None:
    w = empty_world("Town05")
    route = approach(w.town, CONTROL_STOP)
    rec = RouteRunner(w, route, RouteFollowerAgent(speed=7.0)).run()
    assert kinds(rec) == ["stop_sign"] and rec.is_ == pytest.approx(0.8) and rec.ds == pytest.approx(80.0)
    w2 = empty_world("Town05")
    rec2 = RouteRunner(w2, route, ExpertAgent(w2), privileged=True).run()
    assert rec2.status == STATUS_COMPLETED and rec2.infractions == [] and rec2.ds == 100.0


def _obstacle_ahead(add, ticks: int = 400):
    w = empty_world("Town01")
    route = straight(w.town)
    p = route.point_at(35.0)
    aid = add(w, p, route.heading_at(35.0))
    rec = RouteRunner(w, route, RouteFollowerAgent(speed=7.0), max_ticks=ticks).run()
    return rec, aid


def test_vehicle_collision_counted_once() -> None:
    rec, aid = _obstacle_ahead(lambda w, p, h: w.add_vehicle(p[0], p[1], h))
    coll = [i for i in rec.infractions if i.kind.startswith("collision")]
    assert [(i.kind, i.actor_id, i.penalty) for i in coll] == [("collision_vehicle", aid, 0.6)]
    assert rec.is_ == pytest.approx(0.6)


def test_pedestrian_collision() -> None:
    rec, aid = _obstacle_ahead(lambda w, p, h: w.add_pedestrian(p[0], p[1]))
    coll = [i for i in rec.infractions if i.kind.startswith("collision")]
    assert [(i.kind, i.actor_id, i.penalty) for i in coll] == [("collision_pedestrian", aid, 0.5)]
    assert rec.is_ == pytest.approx(0.5)


def test_static_collision_stops_the_car() -> None:
    rec, aid = _obstacle_ahead(lambda w, p, h: w.add_static_obstacle(p[0], p[1], h), ticks=300)
    coll = [i for i in rec.infractions if i.kind.startswith("collision")]
    assert [(i.kind, i.actor_id, i.penalty) for i in coll] == [("collision_static", aid, 0.65)]
    assert rec.rc < 50.0 and rec.ds == pytest.approx(rec.rc * 0.65)


def test_outside_route_lanes_in_world() -> None:
    w = empty_world("Town01")
    route = straight(w.town)
    # drive two lanes to the left (the opposite direction) between s = 20 and 50 m
    off = lambda s: 7.0 if 20.0 <= s <= 50.0 else 0.0  # noqa: E731
    rec = RouteRunner(w, route, RouteFollowerAgent(speed=6.0, lateral_offset=off)).run()
    assert rec.status == STATUS_COMPLETED
    assert 15.0 / route.length < rec.outside_lanes_fraction < 40.0 / route.length
    assert rec.is_ == pytest.approx(1.0 - rec.outside_lanes_fraction)
    assert [i.kind for i in rec.infractions] == ["outside_route_lanes"]


def test_route_deviation_in_world() -> None:
    w = empty_world("Town01")
    t = w.town
    # a route that turns at the junction; the agent follows a copy that goes straight on instead
    lk = next(lk for lk in t.links if any(turn != TURN_STRAIGHT for _, turn in lk.out)
              and any(turn == TURN_STRAIGHT for _, turn in lk.out) and lk.length > 40)
    turn_to = next(n for n, turn in lk.out if turn != TURN_STRAIGHT)
    straight_to = next(n for n, turn in lk.out if turn == TURN_STRAIGHT)
    k_turn = 0 if (t.links[turn_to].dir - lk.dir) % 4 == 1 else lk.n_lanes - 1
    route = build_route(t, [lk.id, turn_to], k_turn, lk.length - 30.0, min(60.0, t.links[turn_to].length - 5),
                        route_id="turn")
    fake = build_route(t, [lk.id, straight_to], k_turn, lk.length - 30.0, t.links[straight_to].length - 5)

    class Liar(RouteFollowerAgent):
        def reset(self, route_info) -> None:
            super().reset(route_info)
            self.route = fake

    rec = RouteRunner(w, route, Liar(speed=7.0)).run()
    assert rec.status == STATUS_DEVIATION
    assert rec.infractions[-1].kind == STATUS_DEVIATION and rec.infractions[-1].penalty == 1.0
    assert 0.0 < rec.rc < 100.0 and rec.ds == pytest.approx(rec.rc * rec.is_)
    assert np.isfinite(rec.duration_s)
