"""A small seeded trace generator: vehicles on a Manhattan road grid with a few mobility patterns.

It stands in for `flad_sim`'s `World.trace()` until that exists; both give plain rows `(vehicle_id, t, x, y)`,
which is all SWIFT's availability and mobility code reads. Patterns (ground-truth labels are returned too):
  - `arterial_ew` / `arterial_ns`: fast (11-15 m/s), mostly straight along one axis, rarely turn;
  - `local`: moderate speed (6-9 m/s), turns at most intersections;
  - `loiter`: slow (1.5-3.5 m/s), turns and pauses (delivery, parking search) -- the long dwellers.
A vehicle enters at a random time at a random intersection and leaves when it drives off the map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Row = tuple[str, float, float, float]

HEADINGS = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]])  # E, N, W, S


@dataclass(frozen=True)
class Pattern:
    name: str
    speed: tuple[float, float]
    p_straight: float
    axis: int | None = None  # 0: prefers E/W, 1: prefers N/S
    p_pause: float = 0.0


PATTERNS = (
    Pattern("arterial_ew", (11.0, 15.0), 0.9, axis=0),
    Pattern("arterial_ns", (11.0, 15.0), 0.9, axis=1),
    Pattern("local", (6.0, 9.0), 0.4),
    Pattern("loiter", (1.5, 3.5), 0.3, p_pause=0.3),
)


def generate_traces(n_vehicles: int = 40, duration_s: float = 600.0, dt: float = 1.0, seed: int = 0,
                    block_m: float = 100.0, n_blocks: int = 10,
                    patterns: tuple[Pattern, ...] = PATTERNS) -> tuple[list[Row], dict[str, str]]:
    """Rows `(vehicle_id, t, x, y)` sorted by time, and each vehicle's pattern name."""
    rng = np.random.default_rng(seed)
    size = block_m * n_blocks
    rows: list[Row] = []
    labels: dict[str, str] = {}
    for i in range(n_vehicles):
        vid = f"car{i:03d}"
        pat = patterns[i % len(patterns)]
        labels[vid] = pat.name
        speed = rng.uniform(*pat.speed)
        t = float(np.round(rng.uniform(0, duration_s * 0.5) / dt) * dt)
        node = rng.integers(1, n_blocks, size=2).astype(float)
        heading = int(rng.integers(4)) if pat.axis is None else int(rng.choice([pat.axis, pat.axis + 2]))
        pos = node * block_m
        to_next = block_m
        pause = 0.0
        while t <= duration_s:
            rows.append((vid, round(t, 6), float(pos[0]), float(pos[1])))
            if pause > 0:
                pause -= dt
                t += dt
                continue
            step = speed * dt
            while step > 0:
                move = min(step, to_next)
                pos = pos + HEADINGS[heading] * move
                step -= move
                to_next -= move
                if to_next <= 1e-9:
                    heading = _turn(rng, pat, heading)
                    to_next = block_m
                    if pat.p_pause and rng.random() < pat.p_pause:
                        pause = float(rng.uniform(5, 30))
                        break
            t += dt
            if not (0 <= pos[0] <= size and 0 <= pos[1] <= size):
                break  # left the map: departure
    rows.sort(key=lambda r: (r[1], r[0]))
    return rows, labels


def _turn(rng: np.random.Generator, pat: Pattern, heading: int) -> int:
    options = [heading, (heading + 1) % 4, (heading + 3) % 4]  # straight, left, right (no U-turns)
    w = np.array([pat.p_straight, (1 - pat.p_straight) / 2, (1 - pat.p_straight) / 2])
    if pat.axis is not None:
        w = w * np.array([4.0 if o % 2 == pat.axis else 1.0 for o in options])
    return int(options[int(rng.choice(3, p=w / w.sum()))])


def by_vehicle(rows: list[Row]) -> dict[str, np.ndarray]:
    """Group rows into per-vehicle arrays of (t, x, y), sorted by time."""
    out: dict[str, list[tuple[float, float, float]]] = {}
    for vid, t, x, y in rows:
        out.setdefault(str(vid), []).append((float(t), float(x), float(y)))
    return {k: np.array(sorted(v)) for k, v in out.items()}
