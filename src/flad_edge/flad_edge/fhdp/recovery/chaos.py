"""`flad chaos`: hurt random vehicles during an FHDP training run and check that training goes on.

One cluster of vehicle processes trains the encoder with quick recovery (`RecoveringFhdpEdge`, in this
process). Every round one chaos event hits a random member of a random pipeline at a random step:
  kill     SIGKILL (a vehicle that vanishes; detected by its dropped connection),
  stop     SIGSTOP until the round ends (a frozen vehicle; detected by missing heartbeats),
  cutoff   SIGSTOP for a while, then SIGCONT (a temporary link outage: its TCP connection stays up
           but nothing gets through; detected by missing heartbeats; it comes back on its own),
  planned  the mobility model predicts that it leaves shortly: the edge hands over its layers at a
           step boundary, then the vehicle is killed (no step may be lost).
Between rounds everything hurt comes back (restarted, or continued) and is re-admitted. The run passes
when every round completes with its client's update counted exactly once, every unplanned recovery lost
at most `backup_every` steps (plus the steps completed while the last backup was in flight) and every
planned departure lost none. No root needed: a cut-off is emulated by stopping the process (no netns).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from flad_edge.fhdp.config import FhdpConfig
from flad_edge.fhdp.recovery.records import RecoveryConfig

log = logging.getLogger(__name__)

KINDS = ("kill", "stop", "cutoff", "planned")


def run_chaos(args: argparse.Namespace) -> dict[str, Any]:
    from flad_edge.fhdp.recovery.live import LiveFleet

    rng = random.Random(args.seed)
    ids = [f"v{i}" for i in range(args.vehicles)]
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="flad-chaos-"))
    cfg = FhdpConfig(local_steps=args.steps, batch_size=4, n_micro=2, time_scale=0.02, planner="exact",
                     round_deadline_s=300, seed=args.seed)
    rcfg = RecoveryConfig(backup_every=args.backup_every, link_timeout_s=30.0, templates_f=min(2, len(ids) - 1))
    kinds = [k for k in args.events.split(",") if k]
    bad = set(kinds) - set(KINDS)
    if bad:
        raise ValueError(f"unknown chaos events {sorted(bad)} (known: {', '.join(KINDS)})")
    t0 = time.time()
    live = LiveFleet(workdir, ids, cfg, rcfg, heartbeat_timeout_s=args.heartbeat_timeout)
    events: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []
    try:
        client = live.edge.cluster_client(ids, "cluster1")
        for rnd in range(args.rounds):
            _bring_back(live, ids)
            kind = kinds[rnd % len(kinds)] if args.cycle else rng.choice(kinds)
            pipe = rng.choice(client.pipelines)
            first = pipe[0][0]
            victim = rng.choice([v for v, _, _ in pipe])
            at_step = rng.randint(1, max(1, args.steps - 2))
            ev: dict[str, Any] = {"round": rnd, "kind": kind, "vehicle": victim, "pipeline_first": first,
                                  "at_step": at_step}
            events.append(ev)
            trigger = _arm(live, rnd, kind, victim, first, at_step, ev)
            summary = live.edge.run_round(rnd, [client])
            if trigger is not None:
                trigger.join(10)
            if kind == "planned" and live.alive(victim):
                ev["killed_after_handover_at"] = live.kill(victim)
            rounds.append(summary)
            log.info("round %d (%s on %s): accepted %d, loss %.4f, recoveries %d, handovers %d", rnd, kind, victim,
                     summary["accepted"], summary["train_loss"], len(summary["recoveries"]), len(summary["handovers"]))
    finally:
        live.close()
    return _verdict(args, rounds, events, live, time.time() - t0)


def _arm(live, rnd: int, kind: str, victim: str, first: str, at_step: int, ev: dict) -> threading.Thread | None:
    prefix = f"r{rnd}-cluster1-{first}-"
    if kind == "kill":
        return live.when(prefix, at_step, lambda: ev.__setitem__("t", live.kill(victim)))
    if kind == "stop":
        return live.when(prefix, at_step, lambda: ev.__setitem__("t", live.kill(victim, signal.SIGSTOP)))
    if kind == "cutoff":
        outage = live.fleet.heartbeat.timeout_s * 2

        def cut() -> None:
            ev["t"] = live.kill(victim, signal.SIGSTOP)
            time.sleep(outage)
            live.kill(victim, signal.SIGCONT)
            ev["outage_s"] = outage

        return live.when(prefix, at_step, cut)
    # planned: the prediction lands before the pipeline starts; the hand-over happens at a step boundary
    step_s = live.edge.step_time or 0.3
    ev["t"] = time.time()
    live.edge.predict_departure(victim, time.time() + live.edge.rcfg.handover_margin_s + at_step * step_s)
    return None


def _bring_back(live, ids: list[str]) -> None:
    """Everything hurt in the last round returns (restarted or continued) and is re-admitted next round."""
    for v in ids:
        if v in live.stopped and live.alive(v):
            live.kill(v, signal.SIGCONT)
    time.sleep(live.fleet.heartbeat.interval_s * 3)
    for v in ids:
        if not live.alive(v):
            live.restart(v)
    live.edge.predicted_departures.clear()


def _verdict(args, rounds: list[dict], events: list[dict], live, seconds: float) -> dict[str, Any]:
    e = args.backup_every
    problems = []
    for r in rounds:
        if r["accepted"] != 1 or r["missing"] or r["errors"]:
            problems.append(f"round {r['round']}: accepted {r['accepted']}, errors {r['errors']}")
    recoveries = [rec for r in rounds for rec in r["recoveries"]]
    handovers = [h for r in rounds for h in r["handovers"]]
    for rec in recoveries:
        # a backup is taken every e steps and sent off the critical path: at most e steps, plus one if the
        # departure came while the last backup was still on the wire
        if rec["steps_lost"] > e + 1:
            problems.append(f"round {rec['round']}: {rec['steps_lost']} steps lost > backup interval {e} (+1)")
    for h in handovers:
        if h["steps_lost"]:
            problems.append(f"planned departure lost {h['steps_lost']} steps")
    planned = [ev for ev in events if ev["kind"] == "planned"]
    if planned and not handovers:
        problems.append("planned departures were predicted but no hand-over happened")
    lost = [rec["steps_lost"] for rec in recoveries]
    return {
        "ok": not problems, "problems": problems, "seconds": round(seconds, 1),
        "conditions": {"vehicles": args.vehicles, "rounds": args.rounds, "steps_per_pipeline": args.steps,
                       "backup_every": e, "heartbeat_timeout_s": args.heartbeat_timeout, "seed": args.seed,
                       "device_figures": "emulated (time_scale 0.02)",
                       "cutoff": "emulated by SIGSTOP/SIGCONT (no network namespace)"},
        "events": events,
        "rounds": [{"round": r["round"], "accepted": r["accepted"], "samples": r["samples"],
                    "train_loss": r["train_loss"], "recoveries": len(r["recoveries"]),
                    "handovers": len(r["handovers"]), "errors": r["errors"]} for r in rounds],
        "recoveries": [{k: rec[k] for k in ("round", "departed", "reason", "completed_before", "steps_lost",
                                            "moved_bytes", "departed_share_bytes", "recovery_s")}
                       for rec in recoveries],
        "handovers": [{k: h.get(k) for k in ("round", "leaving", "steps_lost", "planned_moved_bytes")}
                      for h in handovers],
        "steps_lost": {"unplanned_max": max(lost, default=0), "unplanned_total": sum(lost),
                       "planned_total": sum(h["steps_lost"] for h in handovers)},
        "readmitted": len(live.edge.readmitted),
    }


def main(args: argparse.Namespace) -> int:
    try:
        out = run_chaos(args)
    except (ValueError, RuntimeError, TimeoutError) as exc:
        print(f"flad chaos: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out, default=str))
    else:
        for ev, r in zip(out["events"], out["rounds"], strict=False):
            print(f"round {r['round']}: {ev['kind']:8s} {ev['vehicle']} (pipeline of {ev['pipeline_first']}, "
                  f"step {ev['at_step']}) -> accepted {r['accepted']}, loss {r['train_loss']:.4f}, "
                  f"recoveries {r['recoveries']}, hand-overs {r['handovers']}")
        print(f"steps lost: {out['steps_lost']}; re-admitted {out['readmitted']}; {out['seconds']} s")
        print("PASS" if out["ok"] else "FAIL: " + "; ".join(out["problems"]))
    return 0 if out["ok"] else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("chaos", help="kill, stop and cut off random vehicles during FHDP training",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vehicles", type=int, default=3, help="cluster size (default 3)")
    p.add_argument("--rounds", type=int, default=4, help="FL rounds, one chaos event each (default 4)")
    p.add_argument("--steps", type=int, default=6, help="training steps per pipeline per round (default 6)")
    p.add_argument("--backup-every", type=int, default=2, help="edge backup interval e in steps (default 2)")
    p.add_argument("--events", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    p.add_argument("--cycle", action="store_true", help="take the events in order instead of at random")
    p.add_argument("--heartbeat-timeout", type=float, default=1.0, help="detection timeout in seconds (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="folder for the fleet file and vehicle logs (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=main)


if __name__ == "__main__":   # `python -m flad_edge.fhdp.recovery.chaos ...` also works without the `flad` script
    from flad_core.runs import setup_logging

    _parser = argparse.ArgumentParser(prog="flad")
    register(_parser.add_subparsers(dest="command"))
    _args = _parser.parse_args(["chaos", *sys.argv[1:]])
    setup_logging(logging.INFO)
    sys.exit(_args.func(_args))
