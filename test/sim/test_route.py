"""Routes (A*, dense polyline, maneuvers), labels (target point, command/instruction, notices, waypoints)
and the instruction text codec."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flad_sim import scene
from flad_sim.agent import RouteRunner
from flad_sim.expert import ExpertAgent
from flad_sim.instructions import (
    CMD_CHANGE_LEFT,
    CMD_CHANGE_RIGHT,
    CMD_FOLLOW,
    CMD_LEFT,
    CMD_RIGHT,
    CMD_STRAIGHT,
    COMMAND_NAMES,
    NOTICE_TEXTS,
    TEMPLATES,
    instruction_text,
    parse_instruction,
    parse_notice,
)
from flad_sim.labels import WaypointLabeler, future_waypoints, to_ego_frame
from flad_sim.route import NoRouteError, plan_route, seeded_routes
from flad_sim.schema import sample_fields
from flad_sim.towns import DIRS, build_town
from flad_sim.world import World


@pytest.mark.parametrize("name", ["Town01", "Town02", "Town06"])
def test_routes_are_continuous_lane_paths(name: str) -> None:
    town = build_town(name)
    for r in seeded_routes(town, 0, 8, 100.0, 300.0):
        step = np.linalg.norm(np.diff(r.points, axis=0), axis=1)
        assert step.max() < 1.2 and step.min() > 1e-3
        assert np.abs(np.diff(np.unwrap(r.heading))).max() < 0.25        # no kinks
        assert 100.0 <= r.length <= 300.0
        # every point lies on the road surface, and consecutive elements are connected in the lane graph
        cls = town.ground.lookup(r.points[:, 0], r.points[:, 1])
        assert np.all((cls != scene.SURFACE_OFFROAD) & (cls != scene.SURFACE_SIDEWALK))
        el = r.elem[np.concatenate([[True], np.diff(r.elem) != 0])]
        for a, b in itertools.pairwise(el):
            same_link = town.elem_link[a] >= 0 and town.elem_link[a] == town.elem_link[b]   # lane change
            assert b in town.elem_succ[a] or same_link
        # maneuvers are ordered, inside the route, and junction turns carry their node
        s0 = [m.s0 for m in r.maneuvers]
        assert s0 == sorted(s0) and all(0 <= m.s0 <= m.s1 <= r.length + 1e-6 for m in r.maneuvers)
        assert all(m.node >= 0 for m in r.maneuvers if m.command in (CMD_LEFT, CMD_RIGHT, CMD_STRAIGHT))


def test_astar_finds_shortest_route_in_grid() -> None:
    town = build_town("Town01")
    lk = town.links[0]
    start = town.lane_point(lk.id, 0, 5.0)
    # a goal around the corner: A* must not wander around the block
    goal_link = next(town.links[n] for n, t in lk.out if t != 0)
    goal = town.lane_point(goal_link.id, 0, 20.0)
    r = plan_route(town, start, goal, start_heading=math.atan2(DIRS[lk.dir][1], DIRS[lk.dir][0]))
    assert r.links == [lk.id, goal_link.id]
    assert r.length < lk.length + 40.0
    assert np.linalg.norm(r.points[0] - start) < 1e-6 and np.linalg.norm(r.goal - goal) < 1.0
    with pytest.raises(NoRouteError):
        plan_route(town, town.lane_point(lk.id, 0, 50.0), town.lane_point(lk.id, 0, 10.0),
                   start_heading=math.atan2(DIRS[lk.dir][1], DIRS[lk.dir][0]))


def test_lane_changes_precede_turns_that_need_them() -> None:
    town = build_town("Town03")
    seen = set()
    for r in seeded_routes(town, 1, 15, 150.0, 350.0):
        for m in r.maneuvers:
            seen.add(m.command)
            if m.command in (CMD_CHANGE_LEFT, CMD_CHANGE_RIGHT):
                a = int(r.elem[np.searchsorted(r.s, m.s0)])
                b = int(r.elem[min(np.searchsorted(r.s, m.s1), len(r.s) - 1)])
                assert town.elem_link[a] == town.elem_link[b]
                step = town.elem_lane[b] - town.elem_lane[a]
                assert step == (-1 if m.command == CMD_CHANGE_LEFT else 1)
    assert {CMD_LEFT, CMD_RIGHT, CMD_STRAIGHT} <= seen and seen & {CMD_CHANGE_LEFT, CMD_CHANGE_RIGHT}


def test_frame_labels_along_an_expert_drive() -> None:
    w = World("Town02", seed=3, n_vehicles=10, n_pedestrians=20)
    route = seeded_routes(w.town, 2, 1, 150.0, 250.0)[0]
    frames = []
    runner = RouteRunner(w, route, ExpertAgent(w), privileged=True,
                         on_tick=lambda world, ego, obs, c: frames.append(obs))
    rec = runner.run()
    assert rec.status == "completed"
    fields = sample_fields()
    cmds, notices = set(), set()
    for obs in frames:
        lab = obs["labels"]
        for k in ("tl_state", "speed", "target_point", "command", "gnss", "yaw_rate", "town"):
            assert np.asarray(lab[k]).dtype == np.dtype(fields[k].dtype) and np.shape(lab[k]) == fields[k].shape
        cmd, dist = parse_instruction(lab["instruction"])
        assert cmd == lab["command"]
        if cmd in (CMD_LEFT, CMD_RIGHT, CMD_STRAIGHT) and dist is not None:
            assert 0 <= dist <= 40                                # announced within 40 m of the junction
        assert lab["target_point"][0] > -1.0                     # the target lies ahead (or at the goal)
        assert np.linalg.norm(lab["target_point"]) < 60.0
        cmds.add(int(lab["command"]))
        notices.add(parse_notice(lab["notice"]))
    assert {m.command for m in route.maneuvers} <= cmds and CMD_FOLLOW in cmds
    assert len(notices) >= 2
    ego = frames[0]["ego"]
    assert frames[0]["labels"]["speed"] == pytest.approx(ego.speed)


def test_waypoint_labeler_retroactive_fill() -> None:
    # constant speed 4 m/s on a circle of radius 20: waypoints are chords of the circle, known in closed form
    dt, v, radius = 0.05, 4.0, 20.0
    poses = []
    for i in range(200):
        th = v * dt * i / radius
        poses.append((radius * math.sin(th), radius * (1 - math.cos(th)), th))
    wl = WaypointLabeler(dt=dt)
    done = []
    for i, p in enumerate(poses):
        done += wl.push(p, i)
    assert [i for i, _ in done] == list(range(200 - 50))
    for i, wp in done[:5]:
        np.testing.assert_allclose(wp, future_waypoints(np.array(poses), i), atol=1e-5)
        for k in range(5):
            phi = v * 0.5 * (k + 1) / radius
            np.testing.assert_allclose(wp[k], [radius * math.sin(phi), radius * (1 - math.cos(phi))], atol=1e-4)
    assert wl.flush() == []
    wl2 = WaypointLabeler(dt=dt)
    for i, p in enumerate(poses[:30]):
        wl2.push(p, i)
    padded = wl2.flush(pad=True)
    assert len(padded) == 30
    np.testing.assert_allclose(padded[-1][1], 0.0, atol=1e-9)       # last frame: no future, all at the ego
    np.testing.assert_allclose(to_ego_frame(np.array([[1.0, 1.0]]), (1.0, 0.0, math.pi / 2)), [[1.0, 0.0]], atol=1e-12)


@settings(max_examples=300, deadline=None)
@given(cmd=st.sampled_from(sorted(TEMPLATES)), dist=st.one_of(st.none(), st.floats(0.0, 2000.0)),
       variant=st.integers(0, 100))
def test_instruction_text_round_trip(cmd: int, dist: float | None, variant: int) -> None:
    text = instruction_text(cmd, dist, variant)
    assert parse_instruction(text) == (cmd, None if dist is None else round(dist))
    assert parse_instruction("  " + text.upper() + " ") == (cmd, None if dist is None else round(dist))


@given(st.text(max_size=40))
def test_instruction_parser_rejects_garbage(text: str) -> None:
    try:
        cmd, _ = parse_instruction(text)
    except ValueError:
        return
    assert 0 <= cmd < len(COMMAND_NAMES)


def test_notice_texts_round_trip() -> None:
    for i, t in enumerate(NOTICE_TEXTS):
        assert parse_notice(t) == i
    with pytest.raises(ValueError):
        parse_notice("dragons ahead")
    with pytest.raises(ValueError):
        instruction_text(17)
    assert CMD_RIGHT == 1 and CMD_CHANGE_RIGHT == 5          # CARLA RoadOption - 1
