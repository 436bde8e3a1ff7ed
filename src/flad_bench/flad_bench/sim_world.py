"""Physics-only benchmark of the world (no sensors): ticks/s with 50 background actors and one ego.

Called by `flad bench sim` (flad_bench.sim); also runnable alone: `python -m flad_bench.sim_world`.
"""

from __future__ import annotations

import json
import platform
import time
from typing import Any

import numpy as np

from flad_sim.physics import Control
from flad_sim.route import seeded_routes
from flad_sim.world import World


def bench_physics(seconds: float = 3.0, town: str = "Town03", n_vehicles: int = 30, n_pedestrians: int = 20,
                  seed: int = 0) -> dict[str, Any]:
    """Step a world with n_vehicles NPCs + n_pedestrians (+ 1 ego cruising on a route) for ~`seconds`."""
    w = World(town, seed=seed, n_vehicles=n_vehicles, n_pedestrians=n_pedestrians)
    route = seeded_routes(w.town, seed, 1, 150.0, 300.0)[0]
    ego = w.spawn_ego(route)
    control = {ego: Control(throttle=0.25)}
    for _ in range(20):      # warm up caches
        w.step(control)
    ticks = 0
    c0 = time.process_time()
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        for _ in range(50):
            w.step(control)
        ticks += 50
        now = time.perf_counter()
        if now >= deadline:
            break
    elapsed = now - t0
    cpu = time.process_time() - c0
    moving = float(np.mean(w.npcs.v > 0.1)) if w.npcs.n else 0.0
    return {
        "ticks_per_s": ticks / elapsed,
        "ticks_per_cpu_s": ticks / max(cpu, 1e-9),     # robust to other processes sharing the core
        "sim_seconds_per_s": ticks * w.dt / elapsed,
        "ticks": ticks,
        "wall_s": elapsed,
        "cpu_s": cpu,
        "town": w.town.name,
        "n_vehicles": int(w.npcs.n),
        "n_pedestrians": int(w.peds.n),
        "n_egos": 1,
        "actors": int(w.npcs.n + w.peds.n),
        "dt_s": w.dt,
        "npc_moving_fraction": moving,
        "threads": "1 (numpy, single process)",
        "host": platform.node(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


if __name__ == "__main__":
    print(json.dumps(bench_physics()))
