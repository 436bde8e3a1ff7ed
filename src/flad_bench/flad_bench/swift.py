"""`flad bench swift --json`: SWIFT vs greedy, DQN and the exact optimum on the paper's settings (§6.2).

Instances: clusters of 3, 5, 7, 9 vehicles drawn from the Table-1 device mix (4 Nano : 2 NX : 1 AGX), each
with `mem_fraction` of the device memory available for training, and synthetic encoder profiles scaled to
the paper's footprints 5.55 / 11.10 / 14.01 GB -- plus the encoder's real profile (flad_vehicle's profiler,
`paper` config) when it is installed. All methods run side by side on the same instances in one process.

t_path / bottleneck are *modelled* (Eqs. 8-10 on Table-1 figures, emulated devices), not measured on Jetsons;
plan times are measured wall-clock on this host (noisy on a shared machine: the load average is reported).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from flad_core.device import device_info
from flad_edge.swift.cost import CostModel
from flad_edge.swift.model import (
    DEVICE_MIX,
    DEVICES,
    PAPER_FOOTPRINTS_GB,
    Profile,
    load_profile,
    random_cluster,
    synthetic_profile,
)
from flad_edge.swift.planners import exact_for_first, exact_table, greedy, plan

log = logging.getLogger(__name__)

METHODS = ("greedy", "dqn", "exact", "swift")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flad bench swift", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object (the default output anyway)")
    p.add_argument("--sizes", default=None, help="cluster sizes [3,5,7,9; --quick: 3,5]")
    p.add_argument("--footprints", default=None,
                   help=f"model footprints in GB [{','.join(str(f) for f in PAPER_FOOTPRINTS_GB)}; --quick: the first]")
    p.add_argument("--trials", type=int, default=None, help="instances per (size, footprint) [15; --quick: 2]")
    p.add_argument("--n-layers", type=int, default=40, help="layers of the synthetic profiles")
    p.add_argument("--mem-fraction", type=float, default=0.5, help="share of device memory usable for training")
    p.add_argument("--mu", type=float, default=0.5)
    p.add_argument("--nu", type=float, default=1.3)
    p.add_argument("--n-batch", type=int, default=100)
    p.add_argument("--objective", choices=("path", "bottleneck"), default="path")
    p.add_argument("--policy", help="DQN policy file to reuse (default: the default policy path)")
    p.add_argument("--dqn-episodes", type=int, default=None,
                   help="training budget if a policy must be trained [1000; --quick: 30, kept in memory only]")
    p.add_argument("--retrain", action="store_true", help="train a fresh policy even if one exists")
    p.add_argument("--real-profile", default=None,
                   help="encoder config to profile (tiny, paper), a profile JSON path, or 'none' "
                        "[paper; --quick: tiny]")
    p.add_argument("--template-seeds", type=int, default=None,
                   help="n=9 clusters timed for single-departure templates [3; --quick: 1]")
    p.add_argument("--scale-sizes", default=None, help="larger clusters timed for scaling, 3 instances each "
                                                       "[12; --quick: none]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="a smoke run in seconds (small sizes, 2 trials, a 30-episode policy that is not saved): "
                        "numbers are not meaningful")
    return p


FULL = {"sizes": "3,5,7,9", "footprints": ",".join(str(f) for f in PAPER_FOOTPRINTS_GB), "trials": 15,
        "dqn_episodes": 1000, "real_profile": "paper", "template_seeds": 3, "scale_sizes": "12"}
QUICK = {"sizes": "3,5", "footprints": str(PAPER_FOOTPRINTS_GB[0]), "trials": 2, "dqn_episodes": 30,
         "real_profile": "tiny", "template_seeds": 1, "scale_sizes": ""}


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, str | None]:
    """Arguments with the --quick / full defaults filled in, and what is wrong with them (None: nothing)."""
    args = _parser().parse_args([a for a in (sys.argv[1:] if argv is None else argv) if a != "--"])
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        sizes = [int(x) for x in args.sizes.split(",") if x]
        for x in (*args.footprints.split(","), *args.scale_sizes.split(",")):
            if x:
                float(x)
    except ValueError as exc:
        return args, f"--sizes, --footprints and --scale-sizes take comma-separated numbers ({exc})"
    if not sizes or min(sizes) < 2 or args.trials < 1 or args.dqn_episodes < 1:
        return args, "--sizes needs clusters of >= 2 vehicles; --trials and --dqn-episodes must be >= 1"
    if args.policy and Path(args.policy).exists() and not args.retrain:
        from flad_edge.swift.dqn import DQNPolicy

        try:
            DQNPolicy.load(args.policy)
        except Exception as exc:
            return args, (f"--policy {args.policy}: not a usable DQN policy ({type(exc).__name__}: {exc}); "
                          "`flad edge train-policy --out FILE` makes one, --retrain overwrites it")
    rp = args.real_profile
    if rp.endswith(".json") and not Path(rp).is_file():
        return args, (f"--real-profile {rp}: no such profile JSON (make one with `flad vehicle profile --out {rp}`, "
                      "or pass tiny, paper or none)")
    return args, None


def _policy(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    from flad_edge.swift.dqn import DQNPolicy, default_policy_path, train

    if args.quick and not args.policy:   # never a 30-episode policy where the real one is looked for
        t0 = time.perf_counter()
        pol = train(args.dqn_episodes, args.objective, args.seed)
        return pol, {"source": "trained in this run (--quick: not saved)", "path": None,
                     "wall_s": time.perf_counter() - t0, **pol.meta}
    path = Path(args.policy) if args.policy else default_policy_path(args.objective)
    if path.exists() and not args.retrain:
        try:
            pol = DQNPolicy.load(path)
        except Exception as exc:   # the cached default is stale or torn (an explicit --policy was checked)
            log.warning("DQN policy %s is unreadable (%s: %s); training a new one", path, type(exc).__name__, exc)
        else:
            return pol, {"source": "loaded", "path": str(path), **pol.meta}
    log.info("no DQN policy at %s: training one (%d episodes) and saving it there", path, args.dqn_episodes)
    t0 = time.perf_counter()
    pol = train(args.dqn_episodes, args.objective, args.seed)
    pol.save(path)
    return pol, {"source": "trained in this run", "path": str(path), "wall_s": time.perf_counter() - t0, **pol.meta}


def _real_profile(spec: str) -> tuple[Profile | None, dict[str, Any]]:
    if spec == "none":
        return None, {"used": False}
    if spec.endswith(".json"):
        return load_profile(json.loads(Path(spec).read_text())), {"used": True, "source": spec}
    try:
        import torch

        from flad_vehicle.encoder.model import VisionEncoder, batch_to_torch
        from flad_vehicle.encoder.profile import profile_model
        from flad_vehicle.encoder.synthetic import synthetic_batches
    except ImportError as exc:
        return None, {"used": False, "why": f"flad_vehicle profiler not importable: {exc}"}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = VisionEncoder(spec)
    cams = model.cfg.cameras
    batch = batch_to_torch(next(synthetic_batches(1, 4, seed=0, camera_sizes=cams, lidar_rays=model.cfg.lidar_rays)))
    prof = profile_model(model, batch, include_loss=True, measure=False)
    p = load_profile({"layers": prof["layers"], "min_first_stage_end": prof.get("min_first_stage_end", 1)})
    return p, {"used": True, "source": f"flad_vehicle profile_model(config={spec!r}, batch 4, measure=False)",
               "layers": len(p.layers), "footprint_gb": p.m_cap / 1e9,
               "gflops_per_sample": p.m_cmp_per_sample / 1e9, "min_first_stage_end": p.min_first_end,
               "profile_time_s": time.perf_counter() - t0}


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and np.isfinite(x)]
    return float(statistics.median(xs)) if xs else None


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and np.isfinite(x)]
    return float(statistics.fmean(xs)) if xs else None


def _run_instance(cluster: Any, profile: Profile, objective: str, policy: Any) -> dict[str, Any]:
    cm = CostModel(cluster, profile)
    rec: dict[str, Any] = {"n": len(cluster.vehicles)}
    essential: list[dict[str, Any]] = []
    for m in METHODS:
        out = plan(cluster, profile, m, None, objective, policy=policy)
        val = (out.t_path_s if objective == "path" else out.bottleneck_s) if out.feasible else None
        rec[m] = {"feasible": out.feasible, "value": val, "t_path_s": out.t_path_s if out.feasible else None,
                  "plan_time_s": out.plan_time_s}
        if m == "swift":
            rec[m]["phase1_time_s"] = out.extra.get("phase1_time_s")
            essential = out.extra.get("pipelines", [])
    # each essential pipeline (one per first vehicle) against the optimum with that vehicle first
    table = exact_table(cm, objective)
    key = "t_path_s" if objective == "path" else "bottleneck_s"
    gaps, missing = [], 0
    for p in essential:
        best, _ = exact_for_first(cm, table, cluster.index_of(p["first"]), objective)
        if np.isfinite(best) and p.get(key) is not None:
            gaps.append(p[key] / best - 1)
        elif np.isfinite(best):
            missing += 1
    rec["swift"]["essential_gaps"] = gaps
    rec["swift"]["essential_missing"] = missing
    strict, _ = greedy(cm, None, repair=False)
    rec["greedy_strict_feasible"] = strict is not None
    return rec


def _summary(recs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"instances": len(recs),
                           "exact_feasible": sum(r["exact"]["feasible"] for r in recs)}
    ex_ok = [r for r in recs if r["exact"]["feasible"]]
    for m in METHODS:
        d: dict[str, Any] = {
            "plan_time_ms_median": (_median([r[m]["plan_time_s"] for r in recs]) or 0) * 1e3,
            "plan_time_ms_max": max(r[m]["plan_time_s"] for r in recs) * 1e3 if recs else None,
            "feasible_rate": (sum(r[m]["feasible"] for r in recs) / len(recs)) if recs else None,
            "feasible_where_exact_is": (sum(r[m]["feasible"] for r in ex_ok) / len(ex_ok)) if ex_ok else None,
            "value_median_s": _median([r[m]["value"] for r in recs]),
        }
        if m != "exact":
            gaps = [r[m]["value"] / r["exact"]["value"] - 1 for r in ex_ok if r[m]["feasible"]]
            d["gap_to_exact_median_pct"] = _pct(_median(gaps))
            d["gap_to_exact_mean_pct"] = _pct(_mean(gaps))
            d["gap_to_exact_max_pct"] = _pct(max(gaps)) if gaps else None
        if m != "greedy":
            imp = [1 - r[m]["value"] / r["greedy"]["value"] for r in recs
                   if r[m]["feasible"] and r["greedy"]["feasible"]]
            d["improvement_over_greedy_mean_pct"] = _pct(_mean(imp))
            d["improvement_over_greedy_median_pct"] = _pct(_median(imp))
        out[m] = d
    out["greedy"]["stability_order_feasible_rate"] = (
        sum(r["greedy_strict_feasible"] for r in recs) / len(recs) if recs else None)
    p1 = [r["swift"]["phase1_time_s"] for r in recs if r["swift"].get("phase1_time_s") is not None]
    out["swift"]["phase1_time_ms_median"] = _median(p1) * 1e3 if p1 else None
    out["swift"]["phase1_time_ms_max"] = max(p1) * 1e3 if p1 else None
    eg = [g for r in recs for g in r["swift"].get("essential_gaps", [])]
    out["swift"]["essential_pipelines"] = {
        "count": len(eg), "gap_to_exact_same_first_median_pct": _pct(_median(eg)),
        "gap_to_exact_same_first_mean_pct": _pct(_mean(eg)), "gap_to_exact_same_first_max_pct": _pct(max(eg))
        if eg else None, "missing_where_exact_has_one": sum(r["swift"].get("essential_missing", 0) for r in recs)}
    return out


def _pct(x: float | None) -> float | None:
    return None if x is None else round(100 * x, 3)


def _templates(policy: Any, args: argparse.Namespace) -> dict[str, Any]:
    from flad_edge.swift.templates import PreventiveTemplates

    out: dict[str, Any] = {"n": 9, "f": 1, "footprint_gb": 11.10,
                           "note": "swift: warm-started from the running essential set (the swift plan); "
                                   "swift_cold also builds that essential set first; exact: one DP per subset"}
    for method in ("swift", "swift_cold", "exact"):
        times, counts, feas, gaps = [], [], [], []
        for s in range(args.template_seeds):
            cl = random_cluster(9, seed=90_000 + s, mem_fraction=args.mem_fraction, mu=args.mu, nu=args.nu,
                                n_batch=args.n_batch)
            pr = synthetic_profile(11.10, n_layers=args.n_layers, seed=s)
            running = None
            if method == "swift":
                running = PreventiveTemplates.running_from_plan(plan(cl, pr, "swift", None, args.objective,
                                                                     policy=policy))
            pt = PreventiveTemplates(cl, pr, f=1, method="exact" if method == "exact" else "swift",
                                     objective=args.objective, policy=policy, running=running)
            t0 = time.perf_counter()
            pt.start().wait()
            times.append(time.perf_counter() - t0)
            counts.append(len(pt.templates))
            feas.append(sum(t.feasible for t in pt.templates.values()))
            if method != "exact":
                ex = PreventiveTemplates(cl, pr, f=1, method="exact", objective=args.objective)
                ex.generate()
                for k, t in ex.templates.items():
                    if t.feasible and pt.templates[k].feasible:
                        key = "t_path_s" if args.objective == "path" else "bottleneck_s"
                        gaps.append(getattr(pt.templates[k].best, key) / getattr(t.best, key) - 1)
        out[method] = {"all_single_departure_s_median": _median(times), "all_single_departure_s_max": max(times),
                       "templates_per_cluster": counts[0] if counts else 0, "clusters": len(times),
                       "feasible_templates": feas, "pipelines_per_template": 8}
        if gaps:
            out[method]["best_gap_to_exact_max_pct"] = _pct(max(gaps))
    return out


def main(argv: list[str] | None = None) -> int:
    args, error = _parse(argv)   # `flad bench swift -- ...`: the `--` is dropped
    if error:
        print(f"flad bench swift: {error}", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    sizes = [int(x) for x in args.sizes.split(",") if x]
    fps = [float(x) for x in args.footprints.split(",") if x]
    policy, pinfo = _policy(args)
    warm = CostModel(random_cluster(5, seed=1), synthetic_profile(5.55, n_layers=args.n_layers))
    policy.rollout(warm)  # first-call costs (torch kernels, thread pools) are not planning time
    rng_seed = args.seed
    by_cell: dict[str, list[dict[str, Any]]] = {}
    all_recs: list[dict[str, Any]] = []
    for n in sizes:
        for fp in fps:
            recs = []
            for t in range(args.trials):
                seed = rng_seed * 1_000_003 + n * 10_007 + int(fp * 100) * 101 + t
                cl = random_cluster(n, seed=seed, mem_fraction=args.mem_fraction, mu=args.mu, nu=args.nu,
                                    n_batch=args.n_batch)
                pr = synthetic_profile(fp, n_layers=args.n_layers, seed=seed % 100_000)
                recs.append(_run_instance(cl, pr, args.objective, policy))
            by_cell[f"n{n}_{fp}GB"] = recs
            all_recs.extend(recs)
    per_size = {str(n): _summary([r for r in all_recs if r["n"] == n]) for n in sizes}
    per_cell = {k: _summary(v) for k, v in by_cell.items()}
    overall = _summary(all_recs)

    real_prof, rinfo = _real_profile(args.real_profile)
    real: dict[str, Any] = {"profile": rinfo}
    if real_prof is not None:
        recs = []
        for n in sizes:
            for t in range(args.trials):
                cl = random_cluster(n, seed=77_000 + n * 100 + t, mem_fraction=args.mem_fraction, mu=args.mu,
                                    nu=args.nu, n_batch=args.n_batch)
                recs.append(_run_instance(cl, real_prof, args.objective, policy))
        real["overall"] = _summary(recs)
        real["per_size"] = {str(n): _summary([r for r in recs if r["n"] == n]) for n in sizes}

    scaling: dict[str, Any] = {}
    for n in [int(x) for x in args.scale_sizes.split(",") if x]:
        recs = []
        for t in range(3):
            cl = random_cluster(n, seed=55_000 + n * 10 + t, mem_fraction=args.mem_fraction, mu=args.mu, nu=args.nu,
                                n_batch=args.n_batch)
            recs.append(_run_instance(cl, synthetic_profile(11.10, n_layers=args.n_layers, seed=t), args.objective,
                                      policy))
        scaling[str(n)] = _summary(recs)

    templates = _templates(policy, args)
    sw = overall["swift"]
    goals = {
        "swift_gap_to_exact_median_pct<=2_for_n<=9": all(
            (per_size[str(n)]["swift"]["gap_to_exact_median_pct"] or 0) <= 2 for n in sizes if n <= 9),
        "swift_feasible_wherever_exact_is": sw["feasible_where_exact_is"] == 1.0,
        "swift_improvement_over_greedy_mean_pct>=10": (sw["improvement_over_greedy_mean_pct"] or 0) >= 10,
        "phase1_ms<10": (sw["phase1_time_ms_max"] or 0) < 10,
        "single_departure_templates_n9_s<1": (templates["swift"]["all_single_departure_s_max"] or 9) < 1,
        "single_departure_templates_n9_s<1_incl_essential_set": (
            templates["swift_cold"]["all_single_departure_s_max"] or 9) < 1,
    }
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    import torch

    result: dict[str, Any] = {
        "bench": "swift",
        "objective": args.objective,
        "goals_met": goals,
        "overall": overall,
        "per_size": per_size,
        "per_size_and_footprint": per_cell,
        "real_profile": real,
        "scaling_11.10GB": scaling,
        "templates_n9_single_departure": templates,
        "dqn_policy": pinfo,
        "conditions": {
            "host": platform.node(), "platform": platform.platform(), "python": sys.version.split()[0],
            "cpus": os.cpu_count(), "loadavg_1_5_15": load, "torch": torch.__version__, "numpy": np.__version__,
            "torch_threads_for_dqn": 1, "device": device_info("cpu"),
            "devices": DEVICES, "device_mix": DEVICE_MIX, "mem_fraction": args.mem_fraction,
            "mu": args.mu, "nu": args.nu, "n_batch": args.n_batch, "sizes": sizes, "footprints_gb": fps,
            "trials_per_cell": args.trials, "synthetic_layers": args.n_layers, "seed": args.seed,
            "t_path": "modelled with Eqs. 8-10 on Table-1 device figures (emulated devices), not measured",
            "plan_time": "measured wall-clock on this host, single process",
            "no_first_vehicle": "plans choose the first vehicle freely; swift returns the best essential pipeline",
        },
        "wall_s": time.perf_counter() - t_start,
    }
    if args.quick:
        result["quick"] = "smoke run: numbers are not meaningful"
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
