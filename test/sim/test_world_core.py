"""The embedded world's core: towns, determinism, scene views, lights, GNSS, traces."""

from __future__ import annotations

import numpy as np
import pytest

from flad_sim import scene
from flad_sim.agent import RouteRunner
from flad_sim.expert import ExpertAgent
from flad_sim.physics import Control
from flad_sim.route import seeded_routes
from flad_sim.towns import CONTROL_LIGHT, CONTROL_STOP, TOWN_NAMES, TOWNS, build_town, town_config
from flad_sim.world import EARTH_RADIUS_M, World


def test_six_distinct_towns() -> None:
    assert len(TOWNS) >= 6
    cfgs = [TOWNS[n] for n in TOWN_NAMES]
    assert len({c.index for c in cfgs}) == len(cfgs)
    # non-IID: layouts, densities and weather all differ between towns
    assert len({(c.nx, c.ny, c.block_m, c.lanes) for c in cfgs}) == len(cfgs)
    assert len({c.n_vehicles for c in cfgs}) > 3 and len({c.n_pedestrians for c in cfgs}) > 3
    assert len({c.weather.name for c in cfgs}) == len(cfgs)
    assert town_config(2).name == town_config("Town03").name
    with pytest.raises(KeyError):
        town_config("Atlantis")


@pytest.mark.parametrize("name", ["Town01", "Town04"])
def test_town_contents(name: str) -> None:
    t = build_town(name)
    classes = set(np.unique(t.ground.classes).tolist())
    for c in (scene.SURFACE_OFFROAD, scene.SURFACE_SIDEWALK, scene.SURFACE_ROAD, scene.SURFACE_LANE_MARKING,
              scene.SURFACE_CENTER_LINE, scene.SURFACE_CROSSWALK, scene.SURFACE_STOP_LINE):
        assert c in classes, scene.SURFACE_NAMES[c]
    assert t.ground.resolution_m <= 0.5
    kinds = set(t.static_boxes.kind.tolist())
    assert {scene.BOX_BUILDING, scene.BOX_POLE, scene.BOX_TRAFFIC_LIGHT, scene.BOX_STOP_SIGN} <= kinds
    assert min(lk.n_lanes for lk in t.links) >= 2
    assert {CONTROL_LIGHT, CONTROL_STOP} <= set(t.node_control.tolist())
    # every lane element can be left (no dead ends) and lane centres lie on road
    assert all(t.elem_succ[e] for e in range(t.n_elements))
    lanes = np.concatenate([t.elem_points(lk.lanes[k]) for lk in t.links for k in range(lk.n_lanes)])
    on = t.ground.lookup(lanes[:, 0], lanes[:, 1])
    assert np.all(on != scene.SURFACE_OFFROAD) and np.all(on != scene.SURFACE_SIDEWALK)


def test_lights_cycle_through_all_states() -> None:
    t = build_town("Town02")
    states = np.stack([t.signal_states(ts) for ts in np.arange(0.0, 120.0, 0.5)])
    for k in range(t.n_signals):
        assert {scene.TL_RED, scene.TL_YELLOW, scene.TL_GREEN} == set(states[:, k].tolist())
    # split phasing: at most one approach of a junction is not red at a time
    for n in np.unique(t.sig_node):
        sig = np.flatnonzero(t.sig_node == n)
        assert np.all((states[:, sig] != scene.TL_RED).sum(1) <= 1)


def _run(seed: int, ticks: int = 120) -> tuple[list[np.ndarray], list[dict]]:
    w = World("Town02", seed=seed, n_vehicles=12, n_pedestrians=12)
    route = seeded_routes(w.town, 3, 1, 100.0, 200.0)[0]
    runner = RouteRunner(w, route, ExpertAgent(w), privileged=True, max_ticks=ticks)
    ego = runner.ego_id
    states, labels = [], []

    def on_tick(world: World, ego_id: int, obs: dict, control: Control) -> None:
        veh, ped = world.vehicles(), world.pedestrians()
        e = world.ego_state(ego_id)
        states.append(np.concatenate([veh["xy"].ravel(), veh["speed"], ped["xy"].ravel(),
                                      [e.x, e.y, e.yaw, e.speed, control.throttle, control.steer, control.brake]]))
        labels.append(obs["labels"])

    runner.on_tick = on_tick
    runner.run()
    assert ego in w.egos
    return states, labels


def test_determinism_same_seed_identical_states_and_labels() -> None:
    s1, l1 = _run(5)
    s2, l2 = _run(5)
    assert len(s1) == len(s2) == 120
    for a, b in zip(s1, s2, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(l1, l2, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    s3, _ = _run(6)
    assert not np.array_equal(s1[-1], s3[-1])


def test_scene_view_excludes_ego_and_colours_lights() -> None:
    w = World("Town02", seed=0, n_vehicles=5, n_pedestrians=5)
    ego = w.spawn_ego((w.town.lane_point(0, 0, 5.0)[0], w.town.lane_point(0, 0, 5.0)[1], 0.0))
    other = w.spawn_ego((w.town.lane_point(3, 0, 5.0)[0], w.town.lane_point(3, 0, 5.0)[1], 0.0))
    for _ in range(3):
        w.step()
    sv = w.scene_view(ego)
    assert isinstance(sv, scene.SceneView)
    assert ego not in sv.boxes.actor_id.tolist() and other in sv.boxes.actor_id.tolist()
    assert sv.ego_actor_id == ego and sv.time_s == pytest.approx(0.15)
    heads = sv.boxes.kind == scene.BOX_TRAFFIC_LIGHT
    assert heads.sum() == w.town.n_signals
    from flad_sim.towns import TL_COLORS
    expect = np.array([TL_COLORS[s] for s in w.signal_states[w.town.light_head_signal_arr]], np.uint8)
    np.testing.assert_array_equal(sv.boxes.color[heads], expect)
    assert (sv.boxes.kind == scene.BOX_VEHICLE).sum() == 5 + 1
    assert (sv.boxes.kind == scene.BOX_PEDESTRIAN).sum() == 5
    assert sv.boxes.center.dtype == np.float32 and sv.boxes.actor_id.dtype == np.int32


def test_traffic_light_state_for_ego_and_gnss() -> None:
    w = World("Town02", seed=1, n_vehicles=0, n_pedestrians=0)
    t = w.town
    sl = next(s for s in t.stop_lines if s.control == CONTROL_LIGHT)
    lk = t.links[sl.link]
    p = t.lane_point(lk.id, 0, lk.length - 15.0)
    yaw = float(np.arctan2(sl.heading[1], sl.heading[0]))
    ego = w.spawn_ego((p[0], p[1], yaw))
    seen = set()
    for _ in range(800):
        w.step({ego: Control(brake=1.0)})
        st = w.traffic_light_state_for(ego)
        assert st == w.signal_states[sl.signal]
        seen.add(st)
    assert seen == {scene.TL_RED, scene.TL_YELLOW, scene.TL_GREEN}
    # facing away from the junction: no light governs the ego
    w2 = World("Town02", seed=1, n_vehicles=0, n_pedestrians=0)
    e2 = w2.spawn_ego((p[0], p[1], yaw + np.pi))
    assert w2.traffic_light_state_for(e2) == scene.TL_NONE
    st = w.ego_state(ego)
    assert st.lat == pytest.approx(np.degrees(st.y / EARTH_RADIUS_M))
    assert st.lon == pytest.approx(np.degrees(st.x / EARTH_RADIUS_M))


def test_trace_records_all_vehicles() -> None:
    w = World("Town01", seed=2, n_vehicles=6, n_pedestrians=0, trace_every=10)
    ego = w.spawn_ego((w.town.lane_point(0, 0, 5.0)[0], w.town.lane_point(0, 0, 5.0)[1], 0.0))
    for _ in range(100):
        w.step({ego: Control(throttle=0.3)})
    tr = w.trace()
    assert tr.shape[1] == 4
    times = np.unique(tr[:, 0])
    assert len(times) == 11 and times[-1] == pytest.approx(5.0)
    last = tr[tr[:, 0] == times[-1]]
    assert set(last[:, 1].astype(int)) == set(w.vehicles()["actor_id"].tolist())
    from flad_sim.world import trace_tracks

    tracks = trace_tracks(tr)
    assert set(tracks) == set(w.vehicles()["actor_id"].tolist())
    assert all(np.all(np.diff(v[:, 0]) > 0) for v in tracks.values())
    assert tracks[ego].shape == (10, 3)                      # spawned after the t = 0 sample
    assert all(v.shape == (11, 3) for a, v in tracks.items() if a != ego)
    with pytest.raises(KeyError):
        w.step({12345: Control()})
    # NPCs actually move along lanes
    first = tr[tr[:, 0] == times[1]]
    moved = np.linalg.norm(last[:6, 2:] - first[:6, 2:], axis=1)
    assert (moved > 1.0).sum() >= 3


def test_npcs_flow_and_pedestrians_stay_on_walkways() -> None:
    w = World("Town03", seed=4, n_vehicles=25, n_pedestrians=25)
    dist = np.zeros(w.npcs.n)
    crossed = set()
    for _ in range(600):
        xy = w.npcs.xy.copy()
        w.step()
        dist += np.linalg.norm(w.npcs.xy - xy, axis=1)
        walk = w.peds.mode == 0
        cls = w.town.ground.lookup(w.peds.xy[walk, 0], w.peds.xy[walk, 1])
        assert np.all((cls == scene.SURFACE_SIDEWALK) | (cls == scene.SURFACE_CROSSWALK))
        crossed |= set(np.flatnonzero(w.peds.mode == 2).tolist())
    assert np.median(dist) > 60.0          # 30 s: most NPCs are not stuck
    assert len(crossed) >= 3               # people do cross streets


def test_world_config_from_dict() -> None:
    from flad_core.config import ConfigError, from_dict
    from flad_sim.world import WorldConfig

    cfg = from_dict(WorldConfig, {"town": "Town04", "seed": 3, "n_vehicles": 4, "n_pedestrians": 2})
    w = World.from_config(cfg)
    assert w.town.name == "Town04" and w.npcs.n == 4 and w.peds.n == 2
    with pytest.raises(ConfigError, match="town"):
        from_dict(WorldConfig, {"town": "Atlantis"})
    with pytest.raises(ConfigError, match="n_vehicles"):
        from_dict(WorldConfig, {"n_vehicles": -1})


def test_two_experts_share_a_world() -> None:
    from flad_sim.agent import RouteInfo

    w = World("Town01", seed=9, n_vehicles=8, n_pedestrians=8)
    routes = seeded_routes(w.town, 9, 2, 100.0, 200.0)
    egos, experts = [], []
    for r in routes:
        e = w.spawn_ego(r)
        x = ExpertAgent(w)
        x.reset(RouteInfo(r, w.town.name, e, r.route_id, w))
        egos.append(e)
        experts.append(x)
    collisions = []
    for _ in range(400):
        w.step({e: x.run_step({}) for e, x in zip(egos, experts, strict=True)})
        collisions += [ev for e in egos for ev in w.events(e) if ev["type"] == "collision"]
    assert collisions == []
    assert all(x.s > 40.0 for x in experts)
