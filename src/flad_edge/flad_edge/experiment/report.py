"""The report of one `flad run` experiment: `runs/<id>/report.md` and its plots under `runs/<id>/plots/`.

A run leaves only machine-readable records (metrics.jsonl, events.jsonl, fleet/round_NNN.json, summary.json);
this module turns them into something a person can check at a glance: does the loss fall, where were the
vehicles and which of them trained together, when did vehicles come and go, what did a round cost in bytes and
wall time, how did the final driver score, and how all that compares with the figures of the FLAD paper.

It reads the records after the fact (never the live runner), so it can be rerun at any time:

    python -m flad_edge.experiment.report runs/<id>

Everything but the run folder itself is optional: a run without a driver, without held-out evaluation, without
events or fleet snapshots, or with a single round still gets a report that says "not run" / "not recorded"
where something is missing. A resumed run may hold several records of a round that was redone; the last one
wins, as it is the one the rest of the run continued from.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import statistics
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flad_core.atomic import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

WALL_PARTS = ("planning_s", "training_s", "aggregation_s", "overhead_s")
NOT_RUN = "not run"
NOT_RECORDED = "not recorded"
DASH = "–"
MB = 1e6


# ------------------------------------------------------------------------------------------------ the paper


@dataclass(frozen=True)
class PaperFigure:
    """One figure the FLAD paper reports, with where it is and why ours is not the same experiment."""

    key: str        # which of our measurements it is compared with (see _ours)
    metric: str
    paper: str      # the paper's value, as the paper states it
    where: str      # section / figure / table of arXiv 2511.09025
    differs: str    # what differs between the paper's setting and this run


# The comparable figures of the FLAD paper (arXiv 2511.09025), §6 "Evaluation" unless noted. They are constants
# (not parsed) so the report states exactly what it compares against; the `where` field cites the place.
PAPER_VEHICLES = 50                  # §6.1: data distributed across 50 virtual vehicles, non-IID by CARLA town
PAPER_CLIENTS_PER_ROUND = 5          # §6.1: "5 active clients per round", 5 local epochs, batch size 4
PAPER_DRIVER = {"RC": 30.8, "IS": 0.38, "DS": 30.0}   # §6.4, Fig. 10: FLAD with LLaMA-7B (best LLM configuration)
# NB the paper's DS (30) is not its RC x IS (30.8 x 0.38 = 11.7); both are quoted as printed.
PAPER_TL_ACC = (79.9, 92.66)         # §6.4, Fig. 8(a): traffic-light accuracy, centrally trained -> after FLAD (%)
PAPER_RECOVERY_S = {"FLAD": 5.0, "Elastic TorchRun": 30.0, "relaunch": 50.0}   # §6.3, Fig. 5(b)
PAPER_THROUGHPUT_VS_STANDALONE = 0.75  # §6.3, Fig. 7(b): FHDP reaches 75 % of the standalone node's throughput
PAPER_THROUGHPUT_VS_CENTRAL = 0.70     # abstract and §1: "70% throughput of centralized training"
PAPER_MEMORY_GB = {"FHDP": 3.1, "random": 3.3}        # §6.3, Fig. 7(a): average memory footprint per device

PAPER_FIGURES: tuple[PaperFigure, ...] = (
    PaperFigure("vehicles", "vehicles in the fleet", f"{PAPER_VEHICLES} virtual vehicles", "§6.1",
                "paper: static non-IID data split over 50 vehicles; ours: vehicles that drive, enter and leave "
                "edge coverage (flad_sim)"),
    PaperFigure("clients", "clients trained per round", f"{PAPER_CLIENTS_PER_ROUND} active clients",
                "§6.1", "ours: the clients each edge samples per round from its clusters and solo vehicles (varies "
                        "with coverage); a cluster is one client"),
    PaperFigure("tl_acc", "traffic-light accuracy (held-out global encoder)",
                f"{PAPER_TL_ACC[0]} % → {PAPER_TL_ACC[1]} %", "§6.4, Fig. 8(a)",
                "paper: LMDrive-sized encoder pre-trained centrally, then FLAD on CARLA data; ours: tiny encoder "
                "trained from scratch on synthetic flad_sim frames, first → last round"),
    PaperFigure("RC", "route completion RC (%)", f"{PAPER_DRIVER['RC']}", "§6.4, Fig. 10 (LLaMA-7B)",
                "paper: CARLA closed loop with a LLaMA-7B AD-LLM; ours: embedded 2-D world, tiny CELLAdapt "
                "driver on CPU, few short routes"),
    PaperFigure("IS", "infraction score IS", f"{PAPER_DRIVER['IS']}", "§6.4, Fig. 10 (LLaMA-7B)",
                "same as RC; our penalties follow CARLA Leaderboard 1.0 (flad_sim.metrics)"),
    PaperFigure("DS", "driving score DS", f"{PAPER_DRIVER['DS']:g}", "§6.4, Fig. 10 (LLaMA-7B)",
                "same as RC; the paper's DS is not its RC × IS (11.7), ours is"),
    PaperFigure("recovery", "recovery time after a departure",
                f"{PAPER_RECOVERY_S['FLAD']:g} s (Elastic TorchRun {PAPER_RECOVERY_S['Elastic TorchRun']:g} s, "
                f"relaunch {PAPER_RECOVERY_S['relaunch']:g} s)", "§6.3, Fig. 5(b)",
                "paper: Jetson testbed, real links; ours: CPU processes with emulated devices and links, "
                "tiny encoder (less state to restore)"),
    PaperFigure("throughput", "FHDP training throughput",
                f"{PAPER_THROUGHPUT_VS_STANDALONE:.0%} of standalone (Fig. 7(b)); "
                f"{PAPER_THROUGHPUT_VS_CENTRAL:.0%} of centralised (abstract)", "§6.3, Fig. 7(b); §1",
                "the run has no standalone baseline: ours is samples per second of training wall time on CPU "
                "emulation (`flad bench pipeline` measures the ratio)"),
    PaperFigure("memory", "memory per device", f"{PAPER_MEMORY_GB['FHDP']} GB (random partition "
                f"{PAPER_MEMORY_GB['random']} GB)", "§6.3, Fig. 7(a)",
                "paper: Jetson unified memory with an LMDrive-sized encoder; ours: one CPU host emulating every "
                "vehicle, tiny encoder"),
)


# ------------------------------------------------------------------------------------------------ reading


@dataclass
class RunData:
    """What a run folder holds, read leniently: a torn last line or a missing file is not an error."""

    run_dir: Path
    rounds: list[dict[str, Any]] = field(default_factory=list)      # last record of each round, by round
    events: list[dict[str, Any]] = field(default_factory=list)
    has_events_file: bool = False
    fleet: dict[int, Path] = field(default_factory=dict)            # round -> fleet/round_NNN.json
    summary: dict[str, Any] = field(default_factory=dict)
    config_name: str | None = None
    config_text: str | None = None
    bad_lines: int = 0


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The JSON objects of a .jsonl file and how many lines were not one (a crash can tear the last line)."""
    if not path.is_file():
        return [], 0
    out: list[dict[str, Any]] = []
    bad = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(obj, dict):
            out.append(obj)
        else:
            bad += 1
    return out, bad


def latest_rounds(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Round records, one per round, sorted; of several records of one round (a redone round) the last wins."""
    by_round: dict[int, dict[str, Any]] = {}
    for rec in records:
        if rec.get("event") != "round":
            continue
        r = rec.get("round")
        if isinstance(r, bool) or not isinstance(r, int | float):
            continue
        by_round[int(r)] = rec
    return [by_round[r] for r in sorted(by_round)]


def _fleet_snapshots(fleet_dir: Path) -> dict[int, Path]:
    out: dict[int, Path] = {}
    if fleet_dir.is_dir():
        for p in fleet_dir.glob("round_*.json"):
            try:
                out[int(p.stem.split("_", 1)[1])] = p
            except ValueError:
                continue
    return dict(sorted(out.items()))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        log.warning("%s is not valid JSON (%s); ignored", path, e)
        return {}
    return obj if isinstance(obj, dict) else {}


def load_run(run_dir: Path) -> RunData:
    """Read every record of a run folder that the report uses."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run folder {run_dir}")
    metrics, bad_m = read_jsonl(run_dir / "metrics.jsonl")
    events, bad_e = read_jsonl(run_dir / "events.jsonl")
    data = RunData(run_dir=run_dir, rounds=latest_rounds(metrics), events=events,
                   has_events_file=(run_dir / "events.jsonl").is_file(),
                   fleet=_fleet_snapshots(run_dir / "fleet"), summary=_read_json(run_dir / "summary.json"),
                   bad_lines=bad_m + bad_e)
    for name in ("config.yaml", "config.yml", "config.json"):
        if (run_dir / name).is_file():
            data.config_name, data.config_text = name, (run_dir / name).read_text(encoding="utf-8", errors="replace")
            break
    if data.bad_lines:
        log.warning("%s: %d unreadable JSONL lines skipped", run_dir, data.bad_lines)
    return data


# ------------------------------------------------------------------------------------------------ values


def _num(v: Any) -> float | None:
    """A finite number, or None (missing, null, NaN, a bool or a string are all 'no value')."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def _edge_label(eid: Any) -> str:
    """'edge 3' for an id like 3, the id itself when it already says edge ('edge-0')."""
    return str(eid) if "edge" in str(eid).lower() else f"edge {eid}"


def _d(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _edges(rec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {str(k): _d(v) for k, v in _d(rec.get("edges")).items()}


def _global(rec: dict[str, Any], key: str) -> float | None:
    return _num(_d(rec.get("global")).get(key))


def _pct(v: float | None) -> float | None:
    """Accuracy as a percentage (the records hold a fraction; a value above 1 already is one)."""
    return None if v is None else v * 100.0 if v <= 1.0 else v


def _clients(rec: dict[str, Any]) -> int | None:
    edges = _edges(rec)
    if edges:
        return sum(len(e.get("clients") or []) for e in edges.values())
    c = rec.get("clients")
    return len(c) if isinstance(c, list) else int(c) if _num(c) is not None else None


def _moved_mb(rec: dict[str, Any]) -> float | None:
    b = _num(rec.get("moved_bytes"))
    if b is None:
        parts = [_num(e.get("moved_bytes")) for e in _edges(rec).values()]
        b = sum(p for p in parts if p is not None) if any(p is not None for p in parts) else None
    return None if b is None else b / MB


def _wall(rec: dict[str, Any], key: str) -> float | None:
    return _num(_d(rec.get("wall")).get(key))


def _sim_time(rec: dict[str, Any]) -> float | None:
    return _num(rec.get("sim_time_s"))


def _edge_ids(rounds: Sequence[dict[str, Any]], events: Sequence[dict[str, Any]] = ()) -> list[str]:
    ids = {eid for rec in rounds for eid in _edges(rec)}
    ids.update(str(ev["edge"]) for ev in events if ev.get("edge") is not None)
    return sorted(ids)


def _recovery_seconds(events: Sequence[dict[str, Any]]) -> list[float]:
    """Recovery durations the runner put into the recovery events' detail (RecoveryRecord.phases' recovery_s)."""
    out = []
    for ev in events:
        if ev.get("kind") == "recovery":
            s = _num(_d(ev.get("detail")).get("recovery_s"))
            if s is not None:
                out.append(s)
    return out


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return DASH
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


# ------------------------------------------------------------------------------------------------ plots


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure on the Agg canvas, without pyplot: no global state, no display, safe in threads."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())


def _integer_x(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _series(rounds: Sequence[dict[str, Any]], get: Any) -> list[float]:
    return [math.nan if (v := get(r)) is None else v for r in rounds]


def plot_learning(rounds: Sequence[dict[str, Any]], path: Path) -> None:
    """Train loss and held-out loss per round; traffic-light accuracy and waypoint L1 below."""
    fig = _figure(7.5, 6.0)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    x = [int(r["round"]) for r in rounds]
    ax1.plot(x, _series(rounds, lambda r: _num(r.get("train_loss"))), "o-", label="train loss (clients' mean)")
    held_out = _series(rounds, lambda r: _global(r, "loss"))
    if not all(math.isnan(v) for v in held_out):
        ax1.plot(x, held_out, "s-", label="held-out loss (global encoder)")
    ax1.set_ylabel("loss")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax1.set_title("learning per round")
    acc = _series(rounds, lambda r: _pct(_global(r, "tl_acc")))
    wp = _series(rounds, lambda r: _global(r, "wp_l1"))
    if all(math.isnan(v) for v in acc + wp):
        ax2.text(0.5, 0.5, f"held-out evaluation {NOT_RUN}", ha="center", va="center", transform=ax2.transAxes)
        ax2.set_yticks([])
    else:
        l1 = ax2.plot(x, acc, "o-", color="tab:green", label="traffic-light accuracy (%)")
        ax2.set_ylabel("TL accuracy (%)", color="tab:green")
        ax3 = ax2.twinx()
        l2 = ax3.plot(x, wp, "^-", color="tab:purple", label="waypoint L1 (m)")
        ax3.set_ylabel("waypoint L1 (m)", color="tab:purple")
        ax2.legend(l1 + l2, [ln.get_label() for ln in l1 + l2], fontsize=8, loc="best")
    ax2.grid(alpha=0.3)
    ax2.set_xlabel("round")
    if len(set(x)) == 1:                     # one round: keep the axis about it, not a span of 0.1
        ax2.set_xlim(x[0] - 1, x[0] + 1)
    _integer_x(ax2)
    fig.tight_layout()
    _save(fig, path)


_ROLE_STYLE = {   # role -> (marker, size, legend label); cluster / solo take their client's colour
    "cluster": ("o", 36, "in a cluster (colour = client)"),
    "solo": ("*", 130, "solo client"),
    "idle": ("o", 22, "idle (in coverage, not sampled)"),
    "ineligible": ("x", 26, "ineligible"),
    "outside": (".", 30, "outside coverage"),
}
_GREY = {"idle": "0.55", "ineligible": "0.4", "outside": "0.7"}


def _draw_map(ax: Any, snap: dict[str, Any]) -> None:
    from matplotlib.patches import Circle, Rectangle

    for t in snap.get("tiles") or []:
        x0, y0, x1, y1 = (_num(t.get(k)) for k in ("x0", "y0", "x1", "y1"))
        if None in (x0, y0, x1, y1):
            continue
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, facecolor="#f2efe6", edgecolor="0.75", lw=0.8, zorder=0))
        ax.text(x0 + 0.02 * (x1 - x0), y1 - 0.02 * (y1 - y0), str(t.get("name", "")), fontsize=8, color="0.45",
                ha="left", va="top", zorder=1)
    for e in snap.get("edges") or []:
        x, y, r = _num(e.get("x")), _num(e.get("y")), _num(e.get("radius_m"))
        if x is None or y is None:
            continue
        if r is not None:
            ax.add_patch(Circle((x, y), r, facecolor="tab:blue", alpha=0.07, zorder=1))
            ax.add_patch(Circle((x, y), r, fill=False, edgecolor="tab:blue", lw=1.0, ls="--", zorder=1))
        ax.plot([x], [y], "P", color="tab:blue", ms=10, mec="white", zorder=4)
        ax.annotate(_edge_label(e.get("id")), (x, y), xytext=(6, 6), textcoords="offset points", fontsize=9,
                    color="tab:blue", weight="bold", zorder=5)


def _client_colours(vehicles: Sequence[dict[str, Any]]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    clients = sorted({str(v["client"]) for v in vehicles
                      if v.get("client") is not None and v.get("role") in ("cluster", "solo")})
    return {c: cmap(i % cmap.N) for i, c in enumerate(clients)}


def plot_fleet(snap: dict[str, Any], path: Path) -> None:
    """Town tiles, edge coverage discs and the vehicles of one round, coloured by the client they trained in."""
    fig = _figure(10.0, 7.0)
    ax = fig.subplots()
    _draw_map(ax, snap)
    vehicles = [v for v in snap.get("vehicles") or [] if _num(v.get("x")) is not None and _num(v.get("y")) is not None]
    colours = _client_colours(vehicles)
    labelled: set[str] = set()
    for v in vehicles:
        role = v.get("role") if v.get("role") in _ROLE_STYLE else "idle"
        marker, size, _ = _ROLE_STYLE[role]
        client = None if v.get("client") is None else str(v["client"])
        colour = colours.get(client, "0.6") if role in ("cluster", "solo") else _GREY[role]
        kw = {"edgecolors": "black", "linewidths": 0.5} if role in ("cluster", "solo") else {}
        ax.scatter([v["x"]], [v["y"]], marker=marker, s=size, c=[colour], zorder=3, **kw)
        if client is not None and role in ("cluster", "solo") and client not in labelled:
            labelled.add(client)
            ax.annotate(client, (v["x"], v["y"]), xytext=(4, -9), textcoords="offset points", fontsize=6,
                        color="0.2", zorder=5)
    for role, (marker, size, label) in _ROLE_STYLE.items():
        colour = "tab:orange" if role in ("cluster", "solo") else _GREY[role]
        ax.scatter([], [], marker=marker, s=size, c=[colour], label=label,
                   **({"edgecolors": "black", "linewidths": 0.5} if role in ("cluster", "solo") else {}))
    roles = Counter(v.get("role") for v in vehicles)
    t = _num(snap.get("sim_time_s"))
    ax.set_title(f"fleet, round {snap.get('round')}" + (f", t = {t:.0f} s" if t is not None else "")
                 + f": {len(colours)} clients, {roles['cluster']} vehicles in clusters, {roles['solo']} solo",
                 fontsize=10)
    ax.set_aspect("equal", adjustable="datalim")
    ax.autoscale_view()
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    _save(fig, path)


_EVENT_STYLE = {   # kind -> (marker, colour, size, y offset within the edge's row)
    "enter": ("|", "tab:green", 60, 0.18),
    "leave": ("|", "tab:red", 60, -0.18),
    "handover": ("D", "tab:blue", 40, 0.0),
    "departure_unpredicted": ("X", "black", 50, -0.07),   # usually followed at once by a recovery: kept apart
    "recovery": ("*", "tab:orange", 160, 0.07),
    "resume": ("^", "tab:purple", 60, 0.0),
}


def plot_timeline(events: Sequence[dict[str, Any]], rounds: Sequence[dict[str, Any]], path: Path) -> None:
    """Events over simulated time, one row per edge: who entered and left, handovers, recoveries."""
    time_of_round = {int(r["round"]): t for r in rounds if (t := _sim_time(r)) is not None}
    rows = _edge_ids(rounds, events)
    if any(ev.get("edge") is None for ev in events) or not rows:
        rows.append("(none)")
    y_of = {e: i for i, e in enumerate(rows)}
    points: dict[str, tuple[list[float], list[float]]] = {}
    for ev in events:
        t = _num(ev.get("sim_time_s"))
        if t is None and _num(ev.get("round")) is not None:
            t = time_of_round.get(int(ev["round"]))
        if t is None:
            continue
        kind = str(ev.get("kind", "other"))
        dy = _EVENT_STYLE.get(kind, (None, None, None, 0.0))[3]
        xs, ys = points.setdefault(kind, ([], []))
        xs.append(t)
        ys.append(y_of["(none)" if ev.get("edge") is None else str(ev["edge"])] + dy)
    fig = _figure(9.0, 1.6 + 0.7 * len(rows))
    ax = fig.subplots()
    for t in time_of_round.values():
        ax.axvline(t, color="0.85", lw=0.8, zorder=0)
    for kind, (xs, ys) in sorted(points.items(), key=lambda kv: list(_EVENT_STYLE).index(kv[0])
                                 if kv[0] in _EVENT_STYLE else 99):
        marker, colour, size, _ = _EVENT_STYLE.get(kind, ("o", "0.5", 20, 0.0))
        ax.scatter(xs, ys, marker=marker, c=colour, s=size, label=f"{kind} ({len(xs)})", zorder=3)
    ax.set_yticks(range(len(rows)), [r if r == "(none)" else _edge_label(r) for r in rows])
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xlabel("simulated time (s); grey lines: round records")
    ax.set_title("fleet events")
    ax.grid(axis="x", alpha=0.2)
    if points:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    else:
        ax.text(0.5, 0.5, "no events", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    _save(fig, path)


def _stacked_bars(ax: Any, x: Sequence[int], layers: Sequence[tuple[str, list[float]]]) -> None:
    bottom = [0.0] * len(x)
    for label, vals in layers:
        ax.bar(x, vals, bottom=bottom, label=label, width=0.8)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]


def plot_bytes(rounds: Sequence[dict[str, Any]], path: Path) -> None:
    """Bytes moved per round (model downloads, uploads, stage traffic), stacked by edge; the rest is cloud/other."""
    x = [int(r["round"]) for r in rounds]
    layers: list[tuple[str, list[float]]] = []
    for eid in _edge_ids(rounds):
        mb = [(_num(_edges(r).get(eid, {}).get("moved_bytes")) or 0.0) / MB for r in rounds]
        layers.append((_edge_label(eid), mb))
    per_edge = [sum(vals[i] for _, vals in layers) for i in range(len(rounds))]
    rest = [max((_moved_mb(r) or 0.0) - pe, 0.0) if _num(r.get("moved_bytes")) is not None else 0.0
            for r, pe in zip(rounds, per_edge, strict=True)]
    if any(v > 1e-9 for v in rest) or not layers:
        layers.append(("cloud / not per edge" if layers else "total", rest))
    fig = _figure(9.0, 4.0)
    ax = fig.subplots()
    _stacked_bars(ax, x, layers)
    ax.set_xlabel("round")
    ax.set_ylabel("MB moved")
    ax.set_title("bytes moved per round")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _integer_x(ax)
    fig.tight_layout()
    _save(fig, path)


def plot_wall(rounds: Sequence[dict[str, Any]], path: Path) -> None:
    """Wall-clock seconds of each round split into planning / training / aggregation / overhead."""
    x = [int(r["round"]) for r in rounds]
    layers = [(k.removesuffix("_s"), [_wall(r, k) or 0.0 for r in rounds]) for k in WALL_PARTS]
    evals = [_wall(r, "eval_s") or 0.0 for r in rounds]
    if any(evals):     # measurement, not FLAD: shown on top, outside the overhead share
        layers.append(("held-out eval (measurement)", evals))
    fig = _figure(9.0, 4.0)
    ax = fig.subplots()
    _stacked_bars(ax, x, layers)
    totals = [(xi, t) for xi, r in zip(x, rounds, strict=True) if (t := _wall(r, "total_s")) is not None]
    if totals:
        ax.plot([p[0] for p in totals], [p[1] for p in totals], "k_", ms=12, mew=2, ls="none", label="total_s")
    ax.set_xlabel("round")
    ax.set_ylabel("wall seconds")
    ax.set_title("wall time per round")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _integer_x(ax)
    fig.tight_layout()
    _save(fig, path)


def fleet_rounds_to_plot(available: Sequence[int], n: int = 3) -> list[int]:
    """First, middle and last of the rounds with a fleet snapshot (fewer if fewer exist)."""
    if not available:
        return []
    idx = sorted({int(i * (len(available) - 1) / max(n - 1, 1) + 0.5) for i in range(n)})   # half up
    return [available[i] for i in idx]


# ------------------------------------------------------------------------------------------------ markdown


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return out


def _run_section(data: RunData) -> list[str]:
    s = data.summary
    rows: list[tuple[str, Any]] = [("run folder", f"`{data.run_dir.name}`")]
    for k, v in s.items():
        if k != "driver" and (isinstance(v, str | int | float | bool) or v is None):
            rows.append((k, _fmt(v, 2)))
    engine = _d(s.get("engine"))
    if engine.get("engine") == "ray":     # where the actors ran (engine.json has every placement)
        restarts = engine.get("restarts") or []
        rows.append(("engine", f"ray, {len(engine.get('nodes_used') or [])} node(s) used, {len(restarts)} restart(s) "
                               "after lost actors (engine.json)"))
    elif engine:
        rows.append(("engine", _fmt(engine.get("engine"), 2)))
    rows.append(("round records", f"{len(data.rounds)}"
                 + (f" (rounds {data.rounds[0]['round']}–{data.rounds[-1]['round']})" if data.rounds else "")))
    times = [t for r in data.rounds if (t := _sim_time(r)) is not None]
    if times:
        rows.append(("simulated time", f"{min(times):.0f}–{max(times):.0f} s"))
    if data.bad_lines:
        rows.append(("unreadable JSONL lines skipped", data.bad_lines))
    if not s:
        rows.append(("summary.json", NOT_RECORDED))
    return ["## Run", "", *_table(("", "value"), rows), ""]


def _driver_section(driver: dict[str, Any] | None) -> list[str]:
    out = ["## Driver (closed loop)", ""]
    if not driver:
        return [*out, f"Closed-loop evaluation of the final driver: **{NOT_RUN}**.", ""]
    rows = [(k, _fmt(_num(driver.get(k)), 2) if _num(driver.get(k)) is not None else NOT_RUN)
            for k in ("RC", "IS", "DS")]
    routes = driver.get("routes")
    if routes is not None:
        rows.append(("routes", len(routes) if isinstance(routes, list) else routes))
    rows += [(k, _fmt(v, 3)) for k, v in driver.items()
             if k not in ("RC", "IS", "DS", "routes") and isinstance(v, str | int | float | bool)]
    out += _table(("metric", "value"), rows)
    out += _driver_comparison(driver)
    return [*out, "", "RC: route completion (%), IS: infraction score (product of penalties), DS = RC × IS.", ""]


def _driver_comparison(driver: dict[str, Any]) -> list[str]:
    """The driver beside the baselines that drove the same routes in the same seeded worlds, and per edge."""
    rows: list[tuple[Any, ...]] = [("FLAD driver (mean over edges' ADMs)", *(_fmt(_num(driver.get(k)), 2)
                                                                             for k in ("RC", "IS", "DS")))]
    for name, b in sorted(_d(driver.get("baselines")).items()):
        rows.append((f"baseline: {name}", *(_fmt(_num(_d(b).get(k)), 2) for k in ("RC", "IS", "DS"))))
    for edge, e in sorted(_d(driver.get("per_edge")).items()):
        rows.append((f"{edge}'s ADM", *(_fmt(_num(_d(e).get(k)), 2) for k in ("RC", "IS", "DS"))))
    if len(rows) == 1:
        return []
    return ["", "Same routes, same seeded worlds:", "", *_table(("driver", "RC", "IS", "DS"), rows)]


def _ours(data: RunData) -> dict[str, str]:
    """Our figure for each PaperFigure.key, as text ("not run" / "not recorded" where the run has none)."""
    s, rounds = data.summary, data.rounds
    driver = _d(s.get("driver"))
    ours: dict[str, str] = {}
    fleet_n = None
    if data.fleet:
        last = _read_json(data.fleet[max(data.fleet)])
        fleet_n = len(last.get("vehicles") or []) or None
    n = _num(s.get("vehicles")) if not isinstance(s.get("vehicles"), list) else len(s["vehicles"])
    n = int(n) if n is not None else fleet_n
    ours["vehicles"] = NOT_RECORDED if n is None else str(n)
    clients = [c for r in rounds if (c := _clients(r)) is not None]
    ours["clients"] = (f"{statistics.fmean(clients):.1f} on average (min {min(clients)}, max {max(clients)})"
                       if clients else NOT_RECORDED)
    acc = [(int(r["round"]), a) for r in rounds if (a := _pct(_global(r, "tl_acc"))) is not None]
    ours["tl_acc"] = (f"{acc[0][1]:.1f} % (round {acc[0][0]}) → {acc[-1][1]:.1f} % (round {acc[-1][0]})"
                      if acc else NOT_RUN)
    for k in ("RC", "IS", "DS"):
        v = _num(driver.get(k))
        ours[k] = NOT_RUN if v is None else f"{v:.2f}"
    rec_s = _recovery_seconds(data.events)
    n_rec = sum(1 for ev in data.events if ev.get("kind") == "recovery")
    n_rec = n_rec or int(sum(_num(e.get("recoveries")) or 0 for r in rounds for e in _edges(r).values()))
    if rec_s:
        ours["recovery"] = (f"{statistics.median(rec_s):.2f} s median, {max(rec_s):.2f} s max "
                            f"({len(rec_s)} recover{'y' if len(rec_s) == 1 else 'ies'})")
    else:
        ours["recovery"] = f"{n_rec} recoveries, durations {NOT_RECORDED}" if n_rec else "no recovery in this run"
    samples = sum(_num(r.get("samples")) or 0 for r in rounds)
    train_s = sum(_wall(r, "training_s") or 0 for r in rounds)
    ratio = _num(s.get("throughput_vs_standalone"))
    ours["throughput"] = (f"{ratio:.0%} of standalone" if ratio is not None else
                          f"{samples / train_s:.1f} samples/s of training wall" if train_s > 0 and samples else
                          NOT_RECORDED)
    mem = _num(s.get("peak_rss_mb"))
    ours["memory"] = f"{mem / 1000:.2f} GB peak RSS (whole emulation)" if mem is not None else NOT_RECORDED
    return ours


def _paper_section(data: RunData) -> list[str]:
    ours = _ours(data)
    rows = [(f.metric, f.paper, ours.get(f.key, NOT_RECORDED), f.where, f.differs) for f in PAPER_FIGURES]
    return ["## This run vs the paper", "",
            "Figures of the FLAD paper (arXiv 2511.09025) that this run measures too. The settings differ, so "
            "the comparison is of orders and trends, not a reproduction of the numbers.", "",
            *_table(("metric", "paper", "this run", "paper source", "what differs"), rows), ""]


def _round_rows(rounds: Sequence[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in rounds:
        rows.append([str(r["round"]), _fmt(_sim_time(r), 0), _fmt(_clients(r)), _fmt(r.get("accepted")),
                     _fmt(r.get("samples")), _fmt(_num(r.get("train_loss")), 4), _fmt(_global(r, "loss"), 4),
                     _fmt(_pct(_global(r, "tl_acc")), 1), _fmt(_global(r, "wp_l1"), 3), _fmt(_moved_mb(r), 2),
                     *(_fmt(_wall(r, k), 2) for k in (*WALL_PARTS, "total_s"))])
    return rows


def _rounds_section(rounds: Sequence[dict[str, Any]]) -> list[str]:
    out = ["## Per round", ""]
    if not rounds:
        return [*out, f"No round records: training {NOT_RUN}.", ""]
    header = ("round", "sim t (s)", "clients", "accepted", "samples", "train loss", "global loss", "TL acc (%)",
              "WP L1 (m)", "MB moved", "planning s", "training s", "aggregation s", "overhead s", "total s")
    out += _table(header, _round_rows(rounds))
    return [*out, "", f"{DASH}: not in the record (e.g. held-out evaluation {NOT_RUN} that round).", ""]


def _edges_section(rounds: Sequence[dict[str, Any]]) -> list[str]:
    ids = _edge_ids(rounds)
    if not ids:
        return []
    rows = []
    for eid in ids:
        es = [_edges(r)[eid] for r in rounds if eid in _edges(r)]

        def total(key: str, es: list[dict[str, Any]] = es) -> float:
            return sum(_num(e.get(key)) or 0.0 for e in es)

        cov = [c for e in es if (c := _num(e.get("in_coverage"))) is not None]
        rows.append((eid, len(es), _fmt(statistics.fmean(cov), 1) if cov else DASH,
                     sum(len(e.get("clients") or []) for e in es), int(total("accepted")), int(total("samples")),
                     f"{total('moved_bytes') / MB:.2f}", int(total("recoveries")), int(total("handovers"))))
    header = ("edge", "rounds", "mean in coverage", "clients sampled", "accepted", "samples", "MB moved",
              "recoveries", "handovers")
    return ["## Per edge (all rounds)", "", *_table(header, rows), ""]


def _events_section(data: RunData, timeline: str | None) -> list[str]:
    out = ["## Events", ""]
    if not data.has_events_file:
        return [*out, f"events.jsonl {NOT_RECORDED}.", ""]
    counts = Counter(str(ev.get("kind", "other")) for ev in data.events)
    if counts:
        out += [*_table(("kind", "count"), sorted(counts.items())), ""]
    else:
        out += ["No events.", ""]
    if timeline:
        out += [f"![events over simulated time]({timeline})", ""]
    return out


def _config_section(data: RunData) -> list[str]:
    out = ["## Config", ""]
    if data.config_text is None:
        return [*out, f"config.yaml / config.json {NOT_RECORDED} in the run folder.", ""]
    lang = "json" if data.config_name and data.config_name.endswith(".json") else "yaml"
    return [*out, f"`{data.config_name}`:", "", f"```{lang}", data.config_text.rstrip("\n"), "```", ""]


def _markdown(data: RunData, plots: dict[str, str], fleet_plots: list[tuple[int, str]]) -> str:
    out = [f"# FLAD experiment report: {data.run_dir.name}", "",
           f"Regenerate with `python -m flad_edge.experiment.report {data.run_dir}`.", ""]
    out += _run_section(data)
    out += _driver_section(_d(data.summary.get("driver")) or None)
    out += _paper_section(data)
    out += ["## Learning", ""]
    out += [f"![learning curves]({plots['learning']})", ""] if "learning" in plots else [f"Training {NOT_RUN}.", ""]
    out += _rounds_section(data.rounds)
    out += _edges_section(data.rounds)
    out += ["## Fleet", ""]
    if fleet_plots:
        out += ["Tiles: towns; dashed discs: edge coverage; vehicles coloured by the client they trained in "
                "(a cluster shares one colour, stars are solo clients, grey ones did not train).", ""]
        out += [f"![fleet in round {r}]({p})" for r, p in fleet_plots] + [""]
    else:
        out += [f"Fleet snapshots {NOT_RECORDED}.", ""]
    out += _events_section(data, plots.get("timeline"))
    out += ["## Bytes moved", ""]
    out += [f"![bytes per round]({plots['bytes']})", ""] if "bytes" in plots else [f"{NOT_RECORDED}.", ""]
    out += ["## Wall time", ""]
    out += [f"![wall time per round]({plots['wall']})", ""] if "wall" in plots else [f"{NOT_RECORDED}.", ""]
    out += _config_section(data)
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ entry points


def write_plots(data: RunData) -> tuple[dict[str, str], list[tuple[int, str]]]:
    """Write the PNGs that the run's records allow; returns their paths relative to the run folder."""
    plot_dir = data.run_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    if data.rounds:
        for name, fn in (("learning", plot_learning), ("bytes", plot_bytes), ("wall", plot_wall)):
            fn(data.rounds, plot_dir / f"{name}.png")
            plots[name] = f"plots/{name}.png"
    if data.has_events_file:
        plot_timeline(data.events, data.rounds, plot_dir / "timeline.png")
        plots["timeline"] = "plots/timeline.png"
    fleet_plots: list[tuple[int, str]] = []
    for r in fleet_rounds_to_plot(list(data.fleet)):
        snap = _read_json(data.fleet[r])
        if not snap:
            continue
        snap.setdefault("round", r)
        plot_fleet(snap, plot_dir / f"fleet_r{r:03d}.png")
        fleet_plots.append((r, f"plots/fleet_r{r:03d}.png"))
    return plots, fleet_plots


def write_report(run_dir: Path) -> Path:
    """Write runs/<id>/report.md and runs/<id>/plots/*.png from the run's records; returns report.md's path."""
    data = load_run(Path(run_dir))
    plots, fleet_plots = write_plots(data)
    path = data.run_dir / "report.md"
    atomic_write_text(path, _markdown(data, plots, fleet_plots))
    log.info("wrote %s (%d rounds, %d plots)", path, len(data.rounds), len(plots) + len(fleet_plots))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m flad_edge.experiment.report runs/<id>`: regenerate a run's report."""
    parser = argparse.ArgumentParser(
        prog="python -m flad_edge.experiment.report",
        description="Regenerate runs/<id>/report.md and runs/<id>/plots/*.png from a `flad run` folder "
                    "(metrics.jsonl, events.jsonl, fleet/round_NNN.json, summary.json).")
    parser.add_argument("run_dir", type=Path, help="the run folder, runs/<id>")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.run_dir.is_dir():
        parser.error(f"no run folder {args.run_dir}")
    print(write_report(args.run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
