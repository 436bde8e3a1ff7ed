"""FleetMotion: a cheap physics-only fleet driving in its towns, positions as mobility traces."""

from __future__ import annotations

import itertools
import math
import pickle
import time

import numpy as np
import pytest

from flad_sim import scene
from flad_sim.fleet_motion import FleetMotion, TownTile, tile_towns
from flad_sim.towns import CONTROL_LIGHT, TOWN_NAMES, build_town

ON_ROAD = {scene.SURFACE_ROAD, scene.SURFACE_LANE_MARKING, scene.SURFACE_CENTER_LINE, scene.SURFACE_CROSSWALK,
           scene.SURFACE_STOP_LINE}


def _fleet_towns(n: int, towns: tuple[str, ...] = TOWN_NAMES) -> dict[str, str]:
    return {f"car{k:04d}": towns[k % len(towns)] for k in range(n)}


def _shift(tile: TownTile) -> np.ndarray:
    """Global minus town-local coordinates of a tile."""
    b = build_town(tile.name).bounds
    return np.array([tile.x0 - b[0], tile.y0 - b[1]])


@pytest.fixture(scope="module")
def driven() -> tuple[FleetMotion, int]:
    """60 vehicles in all six towns (+ background traffic) driven 150 s, and how often (vehicle-seconds) one was
    seen standing at a red light."""
    fm = FleetMotion(_fleet_towns(60), seed=7, background_per_town=10)
    red_stops = 0
    for t in range(1, 151):
        fm.advance(float(t))
        red_stops += _standing_at_red(fm)
    return fm, red_stops


def _standing_at_red(fm: FleetMotion) -> int:
    """Vehicles standing within 10 m before a stop line whose light is red now (public data only)."""
    pos, speed, yaw = fm.positions(), fm.speeds(), fm.headings()
    count = 0
    for tile in fm.tiles:
        town = build_town(tile.name)
        sig = town.signal_states(fm.time_s)
        lines = [sl for sl in town.stop_lines if sl.control == CONTROL_LIGHT and sig[sl.signal] == scene.TL_RED]
        for vid, (x, y) in pos.items():
            if fm.town_of(vid) != tile.name or speed[vid] > 0.1:
                continue
            p = np.array([x, y]) - _shift(tile)
            for sl in lines:
                ahead = float((sl.p0 - p) @ sl.heading)
                side = (p - sl.p0) @ (sl.p1 - sl.p0) / float((sl.p1 - sl.p0) @ (sl.p1 - sl.p0))
                facing = math.cos(yaw[vid] - math.atan2(sl.heading[1], sl.heading[0])) > 0.9
                if 0.0 < ahead < 10.0 and 0.0 <= side <= 1.0 and facing:
                    count += 1
    return count


# ------------------------------------------------------------------------------------------------ tiles
def test_tile_towns_non_overlapping_and_deterministic() -> None:
    for gap in (0.0, 25.0):
        tiles = tile_towns(list(TOWN_NAMES), gap_m=gap)
        assert [t.name for t in tiles] == list(TOWN_NAMES)
        assert tiles == tile_towns(list(TOWN_NAMES), gap_m=gap)
        for t in tiles:
            b = build_town(t.name).bounds
            assert t.width == pytest.approx(b[2] - b[0]) and t.height == pytest.approx(b[3] - b[1])
        for a, b in itertools.combinations(tiles, 2):
            overlap_x = min(a.x1, b.x1) - max(a.x0, b.x0)
            overlap_y = min(a.y1, b.y1) - max(a.y0, b.y0)
            assert overlap_x <= -gap + 1e-9 or overlap_y <= -gap + 1e-9, (a, b)
    # near-square grid: 6 towns -> 3 columns x 2 rows
    tiles = tile_towns(list(TOWN_NAMES))
    assert len({t.x0 for t in tiles}) == 3 and len({t.y0 for t in tiles}) == 2
    (alone,) = tile_towns(["Town03"])
    assert (alone.name, alone.x0, alone.y0) == ("Town03", 0.0, 0.0)
    assert (alone.width, alone.height) == pytest.approx((tiles[2].width, tiles[2].height))
    assert tile_towns([]) == []


@pytest.mark.parametrize(("towns", "gap", "needle"), [
    (["Town01", "Atlantis"], 0.0, "Atlantis"),
    (["Town01", "Town01"], 0.0, "Town01"),
    (["Town01"], -1.0, "gap_m"),
    (["Town01"], float("nan"), "gap_m"),
])
def test_tile_towns_bad_input(towns: list[str], gap: float, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        tile_towns(towns, gap_m=gap)


# ----------------------------------------------------------------------------------------------- motion
def test_vehicles_move_on_roads_and_stay_on_their_tile(driven: tuple[FleetMotion, int]) -> None:
    fm, _ = driven
    assert fm.time_s == 150.0
    assert [t.name for t in fm.tiles] == list(TOWN_NAMES)
    ids, times, xy = fm.trace_arrays()
    assert ids == sorted(ids) and len(ids) == 60 and len(times) == 151
    travelled = np.linalg.norm(np.diff(xy, axis=0), axis=2).sum(0)
    assert travelled.min() > 50.0, dict(zip(ids, travelled.round(1), strict=True))
    assert 2.0 < travelled.mean() / 150.0 < 12.0                  # urban speeds, m/s
    for k, vid in enumerate(ids):
        tile = fm.tile_of(fm.town_of(vid))
        assert tile.name == fm.town_of(vid)
        assert np.all((xy[:, k, 0] >= tile.x0) & (xy[:, k, 0] <= tile.x1)), vid
        assert np.all((xy[:, k, 1] >= tile.y0) & (xy[:, k, 1] <= tile.y1)), vid
        local = xy[:, k].astype(np.float64) - _shift(tile)
        surface = build_town(tile.name).ground.lookup(local[:, 0], local[:, 1])
        assert set(np.unique(surface).tolist()) <= ON_ROAD, vid
    speeds = np.array(list(fm.speeds().values()))
    assert np.all(speeds >= 0.0) and np.all(speeds < 12.0)
    assert set(fm.positions()) == set(ids)


def test_vehicles_turn_and_stop_at_red_lights(driven: tuple[FleetMotion, int]) -> None:
    fm, red_stops = driven
    _, _, xy = fm.trace_arrays()
    d = np.diff(xy.astype(np.float64), axis=0)
    heading = np.arctan2(d[..., 1], d[..., 0])
    moving = np.linalg.norm(d, axis=2) > 2.0
    turned = 0
    for k in range(xy.shape[1]):
        h = heading[moving[:, k], k]
        if len(h) > 1 and np.max(np.abs(np.angle(np.exp(1j * (h - h[0]))))) > math.radians(60):
            turned += 1
    assert turned > 20                          # most vehicles turn within 150 s
    assert red_stops > 0
    assert fm.red_exits == 0                    # nobody left a lane into a junction on red
    assert fm.transitions > 200


def test_dense_town_keeps_moving_with_layers() -> None:
    """120 vehicles in the smallest town at 4x the default density: nobody stays stuck (layers + breaker)."""
    fm = FleetMotion(_fleet_towns(120, ("Town05",)), seed=1, lane_m_per_vehicle=25.0)
    assert fm.town_layers == {"Town05": 1}
    fm.advance(900.0)
    _, _, xy = fm.trace_arrays(since_s=600.0)
    travelled = np.linalg.norm(np.diff(xy, axis=0), axis=2).sum(0)
    assert travelled.min() > 10.0
    assert fm.ghosts > 0            # at this density the deadlock breaker is needed (and works)


# ----------------------------------------------------------------------------------------------- traces
def test_traces_sorted_spaced_and_filtered() -> None:
    fm = FleetMotion(_fleet_towns(12), seed=3, trace_every_s=2.0)
    fm.advance(21.0)
    rows = fm.traces()
    assert rows == sorted(rows, key=lambda r: (r[1], r[0]))
    assert len(rows) == 12 * 11                                   # t = 0, 2, ..., 20
    by_vehicle: dict[str, list[float]] = {}
    for vid, t, x, y in rows:
        assert isinstance(x, float) and isinstance(y, float)
        by_vehicle.setdefault(vid, []).append(t)
    assert set(by_vehicle) == set(fm.ids)
    for ts in by_vehicle.values():
        assert np.allclose(np.diff(ts), 2.0)
    last = {vid: (x, y) for vid, t, x, y in rows if t == 20.0}
    fm.advance(22.0)
    assert fm.traces(since_s=22.0) == [(vid, 22.0, *map(float, np.float32(p))) for vid, p in fm.positions().items()]
    sub = fm.traces(since_s=10.0, vehicles=["car0005", "car0001"])
    assert {r[0] for r in sub} == {"car0001", "car0005"} and min(r[1] for r in sub) == 10.0
    assert [r[0] for r in sub[:2]] == ["car0001", "car0005"]
    assert all(r in rows or r[1] == 22.0 for r in sub)
    assert len(last) == 12
    assert fm.traces(vehicles=[]) == []
    # trace period finer than (and not a multiple of) the physics step: interpolated samples
    fine = FleetMotion(_fleet_towns(4), seed=3, trace_every_s=0.3)
    fine.advance(3.0)
    ts = sorted({r[1] for r in fine.traces()})
    assert np.allclose(np.diff(ts), 0.3) and ts[0] == 0.0 and ts[-1] == pytest.approx(3.0)


def test_trace_memory_is_bounded() -> None:
    fm = FleetMotion(_fleet_towns(30), seed=2, keep_trace_s=30.0)
    fm.advance(40.0)
    mem = fm.memory_bytes()
    fm.advance(200.0)
    assert fm.memory_bytes() == mem
    _, times, xy = fm.trace_arrays()
    assert len(times) == 31 and times[0] == 170.0 and times[-1] == 200.0
    assert xy.dtype == np.float32
    assert mem / 30 < 5e6


# ------------------------------------------------------------------------------------ determinism, state
def test_deterministic_and_chunk_independent() -> None:
    towns = _fleet_towns(40)
    a = FleetMotion(towns, seed=11, background_per_town=5)
    b = FleetMotion(dict(reversed(list(towns.items()))), seed=11, background_per_town=5)
    a.advance(45.0)
    for t in (0.7, 3.0, 3.0, 17.25, 45.0):
        b.advance(t)
    assert a.traces() == b.traces()
    assert a.positions() == b.positions() and a.speeds() == b.speeds()
    c = FleetMotion(towns, seed=12, background_per_town=5)
    c.advance(45.0)
    assert c.positions() != a.positions()


def test_state_round_trip_continues_bit_for_bit() -> None:
    towns = _fleet_towns(30)
    fm = FleetMotion(towns, seed=5, background_per_town=8, keep_trace_s=20.0)
    fm.advance(25.0)
    state = pickle.loads(pickle.dumps(fm.state_dict()))
    restored = FleetMotion(towns, seed=5, background_per_town=8, keep_trace_s=20.0)
    restored.load_state_dict(state)
    assert restored.time_s == 25.0 and restored.traces() == fm.traces()
    again = FleetMotion.from_state_dict(state)
    for f in (fm, restored, again):
        f.advance(70.0)
    assert restored.positions() == fm.positions() == again.positions()
    assert restored.speeds() == fm.speeds()
    assert restored.traces() == fm.traces() == again.traces()
    assert state["time_s"] == 25.0                                # the saved state is a copy
    with pytest.raises(ValueError, match="seed"):
        FleetMotion(towns, seed=6, background_per_town=8, keep_trace_s=20.0).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        restored.load_state_dict({"config": state["config"]})


# ------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"vehicle_towns": {}}, "vehicle_towns"),
    ({"vehicle_towns": {"car1": "Atlantis"}}, "Atlantis"),
    ({"vehicle_towns": {7: "Town01"}}, "vehicle ids"),
    ({"dt": 0.0}, "dt"),
    ({"dt": -0.5}, "dt"),
    ({"dt": float("inf")}, "dt"),
    ({"seed": -1}, "seed"),
    ({"background_per_town": -1}, "background_per_town"),
    ({"trace_every_s": 0}, "trace_every_s"),
    ({"keep_trace_s": -5.0}, "keep_trace_s"),
    ({"lane_m_per_vehicle": 0.0}, "lane_m_per_vehicle"),
])
def test_bad_constructor_input(kwargs: dict, needle: str) -> None:
    args = {"vehicle_towns": {"car1": "Town01"}, **kwargs}
    with pytest.raises(ValueError, match=needle):
        FleetMotion(**args)


def test_bad_call_input() -> None:
    fm = FleetMotion({"car1": "Town01", "car2": "Town02"})
    fm.advance(5.0)
    fm.advance(5.0)                                               # not moving the clock is fine
    with pytest.raises(ValueError, match=r"until_s .*past"):
        fm.advance(4.0)
    with pytest.raises(ValueError, match="until_s"):
        fm.advance(float("nan"))
    with pytest.raises(ValueError, match="nobody"):
        fm.town_of("nobody")
    with pytest.raises(ValueError, match="ghost"):
        fm.traces(vehicles=["car1", "ghost"])
    with pytest.raises(ValueError, match="since_s"):
        fm.traces(since_s=float("nan"))
    with pytest.raises(ValueError, match="Town03"):
        fm.tile_of("Town03")


# -------------------------------------------------------------------------------------------- benchmark
def test_speed_and_memory_report(capsys: pytest.CaptureFixture[str]) -> None:
    """Prints (does not assert) wall time for 60 simulated seconds and bytes per vehicle; goal: 1,000 vehicles
    over 6 towns well under 1 s, memory <= 5 MB per vehicle with 1 h of traces at 1 s."""
    lines = []
    for n in (50, 200, 1000):
        fm = FleetMotion(_fleet_towns(n), seed=0)
        t0 = time.perf_counter()
        fm.advance(60.0)
        wall = time.perf_counter() - t0
        full_trace = (int(fm.keep_trace_s / fm.trace_every_s) + 1) * (8 + 8 * n)    # float64 t + float32 xy
        now_trace = 61 * (8 + 8 * n)
        per_vehicle = (fm.memory_bytes() - now_trace + full_trace) / n
        lines.append(f"fleet_motion: {n:5d} vehicles, 6 towns, 60 s simulated in {wall * 1000:6.1f} ms wall; "
                     f"{per_vehicle / 1024:6.1f} KiB/vehicle with 1 h of traces at 1 s")
        assert per_vehicle < 5e6
    with capsys.disabled():
        print("\n" + "\n".join(lines))
