"""The vehicle processes of `flad bench pipeline`: persistent stage workers that run one configuration at a time.

Each worker is a real OS process (spawned, one torch thread) that emulates one device profile. For every
configuration the coordinator sends, a worker that is a member of the pipeline rebuilds the tiny encoder from
the same seed (so every configuration starts from identical weights), takes its stage, binds its inbox, links
to its neighbours over loopback ZeroMQ (token-bucket shaped at its profile's link rate) and runs the FHDP
`StageRunner` for the requested steps with its profile's compute dilation. Keeping the processes alive
across configurations avoids paying the torch import for each of them on a 2-core host.
"""

from __future__ import annotations

import logging
import time
from multiprocessing.connection import Connection
from typing import Any

log = logging.getLogger(__name__)


def _batches(data: str, owner: str, batch_size: int, seed: int):
    from flad_vehicle.fhdp.data import vehicle_batches

    return vehicle_batches(data, owner, batch_size, seed=seed)


def _run_steps(runner, batches, n_steps: int) -> list[dict[str, Any]]:
    """Run `n_steps` steps (a data owner feeds its batches); one timing record per step."""
    steps = []
    for step in range(n_steps):
        batch = None
        if batches is not None:
            full = next(batches)
            batch = {n: full[n] for n in runner.batch_inputs}
        t0 = time.monotonic()
        res = runner.run_step(step, batch)
        t1 = time.monotonic()
        steps.append({"t0": t0, "t1": t1, "loss": res.loss, "compute_s": res.compute_s,
                      "emulated_compute_s": res.emulated_compute_s, "wait_s": res.wait_s,
                      "bytes_sent": res.bytes_sent, "dropped": res.dropped})
    return steps


def run_stage(cmd: dict[str, Any], vehicle: str, tflops: float, link_mbps: float, ctx) -> dict[str, Any]:
    """Run this vehicle's stage of `cmd["pipeline"]` for warmup + steps steps; return per-step figures."""
    import torch

    from flad_core.emulation import ComputeDilation, Radio, TokenBucket
    from flad_vehicle.encoder.config import get_config
    from flad_vehicle.encoder.model import LABEL_INPUTS, VisionEncoder
    from flad_vehicle.encoder.partition import Partitioner
    from flad_vehicle.fhdp.links import Inbox, OutLink
    from flad_vehicle.fhdp.optim import stage_adamw
    from flad_vehicle.fhdp.runner import StageRunner
    from flad_vehicle.fhdp.ushape import u_stages

    pipeline = [tuple(p) for p in cmd["pipeline"]]
    members = [v for v, _, _ in pipeline]
    if vehicle not in members:
        return {"idle": True}
    index = members.index(vehicle)
    k = len(pipeline)
    torch.manual_seed(cmd["seed"])
    model = VisionEncoder(get_config(cmd["encoder"]))
    u = bool(cmd.get("u_shaped")) and k > 1
    head = None
    if u:   # the ranges cut the trunk; stage 0 also holds the heads and the loss
        trunk, head = u_stages(Partitioner(model), [(s, e) for _, s, e in pipeline])
        stage = trunk[index]
        head = head if index == 0 else None
    else:
        stage = Partitioner(model).stage((pipeline[index][1], pipeline[index][2]))
    trained = torch.nn.ModuleList([stage, head.stage]) if head is not None else stage
    optimizer = stage_adamw(trained, model) if any(True for _ in trained.parameters()) else None
    ts = cmd["time_scale"]
    codec, feedback = link_codec(cmd["codec"])
    link_mbps = cmd.get("link_mbps", {}).get(vehicle, link_mbps)
    radio = Radio(link_mbps, ts) if cmd.get("radio", "device") == "device" else None
    inbox = Inbox(ctx, cmd["addresses"][index], bucket=radio.recv_bucket if radio else None)
    links = []

    def link(peer: int) -> OutLink:
        # one radio per device: every link (and the inbox) shares it; "link": each link its own full rate
        bucket = radio.send_bucket if radio else TokenBucket.from_mbps(link_mbps, ts)
        out = OutLink(ctx, members[peer], cmd["addresses"][peer], index, codec=codec, bucket=bucket,
                      error_feedback=feedback)
        links.append(out)
        return out

    prev = link(index - 1) if index > 0 else None
    nxt = link(index + 1) if index < k - 1 else None
    turn = link(k - 1 if index == 0 else 0) if u and index in (0, k - 1) else None
    runner = StageRunner(stage, index, k, inbox=inbox, prev=prev, next=nxt, optimizer=optimizer,
                         u_shaped=u, head=head, turn=turn,
                         schedule=cmd["schedule"], n_micro=cmd["n_micro"], grad_clip=5.0, label_names=LABEL_INPUTS,
                         dilation=ComputeDilation(tflops, ts, host_tflops_ref=cmd["host_tflops"]), timeout_s=300.0,
                         device=cmd.get("device", "cpu"))
    batches = _batches(cmd["data"], cmd["data_owner"], cmd["batch_size"], cmd["seed"]) if index == 0 else None
    try:
        steps = _run_steps(runner, batches, cmd["warmup"] + cmd["steps"])
    finally:
        for x in (*links, inbox):
            x.close()
    n = max(1, len(steps))
    link_bytes = {"prev": prev.stats.bytes / n if prev else 0.0, "next": nxt.stats.bytes / n if nxt else 0.0,
                  "turn": turn.stats.bytes / n if turn else 0.0,
                  "turn_to": (k - 1 if index == 0 else 0) if turn else None}
    return {"idle": False, "vehicle": vehicle, "index": index, "range": [pipeline[index][1], pipeline[index][2]],
            "steps": steps, "link_bytes_per_step": link_bytes, "device": str(runner.device)}


def run_fanin(cmd: dict[str, Any], vehicle: str, tflops: float, link_mbps: float, ctx) -> dict[str, Any]:
    """This vehicle's roles in the fan-in step of `cmd["fanin"]` (every member's data at once,
    `flad_vehicle.fhdp.fanin`): a source trains its replica of the raw-input layers on its own data shard, a trunk
    member its trunk stage; one radio per device carries all of its links."""
    import torch

    from flad_core.emulation import ComputeDilation, Radio
    from flad_vehicle.encoder.config import get_config
    from flad_vehicle.encoder.model import LABEL_INPUTS, VisionEncoder
    from flad_vehicle.encoder.partition import Partitioner
    from flad_vehicle.fhdp.fanin import FanInPlan, FanInRunner
    from flad_vehicle.fhdp.links import Inbox, OutLink
    from flad_vehicle.fhdp.optim import stage_adamw

    plan = FanInPlan.of(cmd["fanin"]["sources"], cmd["fanin"]["trunk"])
    members = plan.members
    if vehicle not in members:
        return {"idle": True}
    torch.manual_seed(cmd["seed"])
    model = VisionEncoder(get_config(cmd["encoder"]))
    part = Partitioner(model)
    plan.check_model(len(part.graph), part.graph.min_first_end)
    replica = part.stage((0, plan.cut)) if vehicle in plan.sources else None
    trunk_stage = None
    if vehicle in plan.trunk.members:
        st = plan.trunk[plan.trunk.stage_of(vehicle)]
        trunk_stage = part.stage((st.start, st.end))
    trained = torch.nn.ModuleList([m for m in (replica, trunk_stage) if m is not None])
    optimizer = stage_adamw(trained, model) if any(True for _ in trained.parameters()) else None
    ts = cmd["time_scale"]
    radio = Radio(cmd.get("link_mbps", {}).get(vehicle, link_mbps), ts)
    addresses = cmd["addresses"]
    index = members.index(vehicle)
    inbox = Inbox(ctx, addresses[vehicle], bucket=radio.recv_bucket)
    codec, feedback = link_codec(cmd["codec"])
    links = {p: OutLink(ctx, p, addresses[p], index, codec=codec, bucket=radio.send_bucket, error_feedback=feedback)
             for p in members if p != vehicle}
    runner = FanInRunner(vehicle, plan, inbox=inbox, links=links, replica=replica, trunk_stage=trunk_stage,
                         optimizer=optimizer, batch_size=cmd["batch_size"], schedule=cmd["schedule"],
                         n_micro=cmd["n_micro"], grad_clip=5.0, label_names=LABEL_INPUTS,
                         dilation=ComputeDilation(tflops, ts, host_tflops_ref=cmd["host_tflops"]), timeout_s=300.0,
                         sync_codec=codec, device=cmd.get("device", "cpu"))
    batches = _batches(cmd["data"], cmd["source_data"][vehicle], cmd["batch_size"], cmd["seed"]) \
        if replica is not None else None
    try:
        steps = _run_steps(runner, batches, cmd["warmup"] + cmd["steps"])
    finally:
        for x in (*links.values(), inbox):
            x.close()
    n = max(1, len(steps))
    roles = []
    if replica is not None:
        roles.append(f"source [0,{plan.cut})")
    if trunk_stage is not None:
        roles.append(f"trunk [{trunk_stage.start},{trunk_stage.end})")
    return {"idle": False, "vehicle": vehicle, "index": index, "range": [" + ".join(roles)], "steps": steps,
            "device": str(runner.device),
            "link_bytes_per_step": {"peers": {p: ln.stats.bytes / n for p, ln in links.items()}},
            "radio_wait_s_per_step": (radio.send_bucket.waited_s
                                      + (radio.recv_bucket.waited_s if radio.duplex == "full" else 0.0)) / n}


def link_codec(codec: str) -> tuple[str, bool]:
    """(tensorcodec codec, error feedback) of a bench codec name (`flad_bench.pipeline.BENCH_CODECS`)."""
    return ("int4", True) if codec == "int4ef" else (codec, False)


def worker_main(vehicle: str, tflops: float, link_mbps: float, conn: Connection) -> None:
    """Process entry: serve configurations from `conn` until told to stop."""
    import torch
    import zmq

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    ctx = zmq.Context()
    conn.send({"ready": vehicle})
    try:
        while True:
            cmd = conn.recv()
            if cmd.get("op") == "stop":
                break
            try:
                run = run_fanin if cmd.get("fanin") else run_stage
                conn.send(run(cmd, vehicle, tflops, link_mbps, ctx))
            except Exception as exc:  # reported to the coordinator, which fails the configuration
                log.exception("%s failed a configuration", vehicle)
                conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        ctx.term()
