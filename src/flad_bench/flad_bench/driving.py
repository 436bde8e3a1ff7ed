"""Closed-loop driving evaluation for `flad bench llm`: every agent on the same seeded held-out routes, scored as
the CARLA Leaderboard 1.0 does (`flad_sim.metrics`), with bootstrap 95 % intervals and a bag per route.

Routes: `per_town` seeded routes in each held-out town (`flad_vehicle.control.agent.route_spec`, route seed
`ROUTE_SEED`), each driven in a fresh World seeded by its index, the same for every agent. Each route is
recorded as a light rosbag2/MCAP bag (`flad_sim.bag.RunTap` without sensor data: odometry, GNSS, speed,
navigation, the light label, control, the agent's waypoints, infractions, the final DrivingScore; `sensors`
adds cameras and LiDAR at the planning rate). `flad bag info` / `flad bag show` open a route's bag; the world
is deterministic, so the same agent on the same (town, route index, world seed) drives the route again exactly.

Intervals: percentile bootstrap over routes (10,000 resamples, seeded) of the mean DS / RC / IS, via
`scipy.stats.bootstrap`.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

ROUTE_SEED = 7
AGENTS = ("expert", "encoder_head", "ad_llm", "adm_via_service", "constant")
BOOTSTRAP_RESAMPLES = 10_000


def bootstrap_ci(values: list[float] | np.ndarray, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean (scipy); a constant sample gives (value, value)."""
    x = np.asarray(values, np.float64)
    if len(x) == 0:
        return (float("nan"), float("nan"))
    if len(x) == 1 or np.ptp(x) == 0.0:
        return (float(x[0]), float(x[0]))
    from scipy.stats import bootstrap

    res = bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=BOOTSTRAP_RESAMPLES,
                    method="percentile", random_state=np.random.default_rng(seed))
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


def route_jobs(agents: tuple[str, ...], towns: list[str], per_town: int) -> list[tuple[str, str, int]]:
    """(agent, town, route index) for every agent on the same routes."""
    return [(a, t, i) for i in range(per_town) for t in towns for a in agents]


def _record_from_dict(d: dict[str, Any]) -> Any:
    from flad_sim.metrics import Infraction, RouteRecord

    return RouteRecord(d["route_id"], d["town"], d["route_length_m"], d["rc"], d["is"], d["ds"], d["status"],
                       d["duration_s"], d["outside_lanes_fraction"], [Infraction(**i) for i in d["infractions"]])


def summarize_agent(routes: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    """Means, standard deviations and bootstrap 95 % intervals of DS / RC / IS; statuses; infractions by type
    (counts and the leaderboard's per-km rates); one line per route."""
    from flad_sim.metrics import summarize

    rs = sorted(routes, key=lambda r: r["route_id"])
    lb = summarize([_record_from_dict(r) for r in rs])
    out: dict[str, Any] = {"n_routes": len(rs)}
    for key in ("ds", "rc", "is"):
        vals = [float(r[key]) for r in rs]
        lo, hi = bootstrap_ci(vals, seed=seed)
        nd = 3 if key == "is" else 2
        out[key] = round(float(np.mean(vals)), nd) if vals else float("nan")
        # the leaderboard's standard deviation divides by n - 1 (statistics.stdev); undefined for one route
        out[f"{key}_std"] = round(float(np.std(vals, ddof=1)), nd) if len(vals) > 1 else None
        out[f"{key}_ci95"] = [round(lo, nd), round(hi, nd)]
    out["statuses"] = {s: sum(r["status"] == s for r in rs) for s in sorted({r["status"] for r in rs})}
    kinds: dict[str, int] = {}
    for r in rs:
        for i in r["infractions"]:
            kinds[i["kind"]] = kinds.get(i["kind"], 0) + 1
    out["infractions"] = dict(sorted(kinds.items()))
    out["infractions_per_km"] = {k: round(float(v), 3) for k, v in lb.get("infractions_per_km", {}).items()}
    out["route_deviation_share"] = round(out["statuses"].get("route_deviation", 0) / max(1, len(rs)), 3)
    out["per_route"] = [{"route": r["route_id"], "rc": round(r["rc"], 1), "is": round(r["is"], 3),
                         "ds": round(r["ds"], 1), "status": r["status"], "bag": r.get("bag", "")} for r in rs]
    if any("plan_ms_mean" in r for r in rs):
        out["plan_ms_mean"] = round(float(np.mean([r.get("plan_ms_mean", 0) for r in rs])), 1)
    return out


# ---------------------------------------------------------------------------------------------- workers

_W: dict[str, Any] = {}
MakeAgent = Callable[[str, Any], tuple[Any, bool]]


def _light_tap(rec: Any, world: Any, role: str, agent: Any, sensors: bool, plan_every: int) -> Any:
    from flad_sim import bridge
    from flad_sim.bag import RecordConfig, RunTap, flad_topic

    cfg = RecordConfig(town=world.town.name, role=role, sensor_every=max(1, plan_every))
    wp_topic = flad_topic(role, "waypoints")

    def extras(obs: dict[str, Any], t: float, frame: int) -> list[tuple[str, Any]]:
        plan = getattr(agent, "plan", None)
        return [] if plan is None else [(wp_topic, bridge.path_msg(np.asarray(plan), t, f"{role}/base_link"))]

    cams = ["rgb_front", "rgb_left", "rgb_right", "rgb_rear"] if sensors else []
    return RunTap(rec, cfg, world.dt, cams, extras=extras, lidar=sensors)


def run_route(job: tuple, make_agent: MakeAgent, bag_dir: str | None, sensors: bool, plan_every: int,
              lo: float, hi: float, per_town: int) -> dict[str, Any]:
    """One agent on one route (a fresh, seeded World), recorded to `bag_dir/<agent>/<route>` when given."""
    from flad_sim.agent import RouteRunner
    from flad_sim.bag import BagRecorder, cached_sensor_observer
    from flad_sim.sensors import SensorRig
    from flad_sim.world import World
    from flad_vehicle.control.agent import route_spec

    agent_name, town, idx = job
    route = route_spec(town, ROUTE_SEED, per_town, lo, hi)[idx]
    world = World(town, seed=ROUTE_SEED * 1000 + idx)
    agent, privileged = make_agent(agent_name, world)
    observe = None if privileged else cached_sensor_observer(_W.setdefault("rig", SensorRig()))
    t0 = time.perf_counter()
    bag = ""
    if bag_dir:
        bag = str(Path(bag_dir).resolve() / agent_name / re.sub(r"[^A-Za-z0-9_.-]", "_", route.route_id))
        Path(bag).parent.mkdir(parents=True, exist_ok=True)
        with BagRecorder(bag) as rec:
            tap = _light_tap(rec, world, "hero", agent, sensors and not privileged, plan_every)
            runner = RouteRunner(world, route, agent, observe=observe, privileged=privileged, on_tick=tap.on_tick)
            tap.runner = runner
            record = runner.run()
            tap.finish(record, float(world.time_s))
    else:
        record = RouteRunner(world, route, agent, observe=observe, privileged=privileged).run()
    d = record.to_dict()
    d.update({"agent": agent_name, "wall_s": round(time.perf_counter() - t0, 2), "bag": bag,
              "world_seed": ROUTE_SEED * 1000 + idx})
    if getattr(agent, "plan_times", None):
        d["plan_ms_mean"] = round(1000 * float(np.mean(agent.plan_times)), 1)
    return d


def evaluate_agents(worker: Callable[[tuple], dict[str, Any]], agents: tuple[str, ...], towns: list[str],
                    per_town: int, lo: float, hi: float, workers: int, progress: bool = True) -> dict[str, Any]:
    """Runs `worker(job)` for every (agent, town, route) job on a spawn pool; summaries per agent."""
    from tqdm import tqdm

    jobs = route_jobs(agents, towns, per_town)
    t0 = time.perf_counter()
    recs: list[dict[str, Any]] = []
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool, tqdm(total=len(jobs), desc="closed loop", unit="route",
                                          disable=not progress) as bar:
        for r in pool.imap_unordered(worker, jobs, chunksize=1):
            recs.append(r)
            bar.update(1)
    out: dict[str, Any] = {"routes_per_agent": len(jobs) // max(1, len(agents)), "towns": towns,
                           "route_seed": ROUTE_SEED, "route_length_m": [lo, hi],
                           "wall_s": round(time.perf_counter() - t0, 1), "workers": workers,
                           "cpus": os.cpu_count(), "agents": {}}
    for a in agents:
        out["agents"][a] = summarize_agent([r for r in recs if r["agent"] == a])
    return out
