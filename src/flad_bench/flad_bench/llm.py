"""`flad bench llm --json`: CELLAdapt end to end on the embedded world, side by side in one run.

Open loop on held-out towns (teacher AD-LLM vs student ADM vs general LLM vs the encoder's own head vs a
constant trajectory), parameter counts, LoRA trainable fraction, latency p50/p99 at batch 1 (in-process and
through the waypoint service over loopback ZeroMQ), service throughput with 8 concurrent vehicles with and
without dynamic batching, and closed-loop RC/IS/DS on held-out embedded-world routes for the expert, the
encoder head, the AD-LLM, the ADM (through the waypoint service) and the constant baseline.
Models run on `--device` (flad_core.device; `auto`: CUDA when present), 1 torch thread per process; timings
depend on host load, which is reported. `conditions.device` says which device ran; `service` always has
`service_p50_ms_batch1`, and on CUDA also `service_samples_per_s_batch32` (32 vehicles, batches of up to 32)
and `conditions.peak_memory_bytes` (this process's peak CUDA memory: training, open loop, service).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flad_bench.driving import AGENTS
from flad_core.device import (
    DeviceError,
    add_device_argument,
    add_precision_argument,
    device_info,
    peak_memory_bytes,
    reset_peak_memory,
    resolve_device,
    to_device,
)

log = logging.getLogger(__name__)



def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1000.0, q)) if xs else float("nan")


def _latency(model: Any, data: Any, n: int) -> dict[str, float]:
    times = []
    for i in range(n):
        j = i % len(data)
        f = data.features[j:j + 1]
        t0 = time.perf_counter()
        model.predict(f, [data.instructions[j]], [data.notices[j]])
        times.append(time.perf_counter() - t0)
    return {"p50_ms": round(_pct(times, 50), 3), "p99_ms": round(_pct(times, 99), 3), "n": n}


# ---------------------------------------------------------------------------------------------- service load


def _client_process(addr: str, n_clients: int, seconds: float, feats: np.ndarray, instr: list[str],
                    out: Any) -> None:
    """n_clients vehicles, each with one request in flight at a time (closed-loop load), for `seconds`.

    One thread polls one DEALER socket per vehicle, speaking the bus's request frames. Threads (one per
    vehicle, the first version) made the load generator itself the bottleneck on a 2-core host: 8 threads
    contending for the GIL cannot keep 8 requests in flight, which understated what batching buys.
    """
    import zmq

    from flad_core import codec
    from flad_edge.celladapt.service import REQUEST_TYPE, RESPONSE_TYPE, SERVICE, make_request, path_to_waypoints

    ctx = zmq.Context()
    socks = []
    for i in range(n_clients):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IDENTITY, f"bench-v{i}".encode())
        s.connect(addr)
        socks.append(s)
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    index = {s: i for i, s in enumerate(socks)}
    sent_at = [0.0] * n_clients
    k = [0] * n_clients
    lat: list[float] = []
    errors = 0

    def send(i: int) -> None:
        j = (i * 7 + k[i]) % len(feats)
        req = make_request(feats[j], instr[(i + k[i]) % len(instr)], vehicle_id=f"v{i}", timeout_s=5.0)
        k[i] += 1
        sent_at[i] = time.perf_counter()
        socks[i].send_multipart([b"", str(k[i]).encode(), SERVICE.encode(), REQUEST_TYPE.encode(),
                                 codec.encode(req, REQUEST_TYPE)])

    t0 = time.perf_counter()
    t_end = t0 + seconds
    for i in range(n_clients):
        send(i)
    in_flight = n_clients
    while in_flight:
        for sock, _ in poller.poll(1000):
            i = index[sock]
            _, _, status, _rtype, payload = sock.recv_multipart()
            now = time.perf_counter()
            if status == b"ok":
                path_to_waypoints(codec.decode(payload, RESPONSE_TYPE))
                lat.append(now - sent_at[i])
            else:
                errors += 1
            if now < t_end:
                send(i)
            else:
                in_flight -= 1
        if time.perf_counter() > t_end + 10:
            break
    wall = time.perf_counter() - t0
    for s in socks:
        s.close(0)
    ctx.term()
    out.put({"requests": len(lat), "errors": errors, "wall_s": wall, "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99),
             "load_generator": "one thread, one DEALER socket per vehicle, one request in flight each"})


def _service_block(model: Any, data: Any, seconds: float, repeats: int = 3, device: str = "cpu",
                   dtype: str = "auto") -> dict[str, Any]:
    """Batch-1 latency with one client, and 8 concurrent vehicles with and without dynamic batching; on CUDA
    also 32 vehicles batched up to 32 (the GPU's default batch). The service runs on `device` in `dtype`.

    The two 8-vehicle modes alternate `repeats` times (seconds / repeats each) and the speedup is the median
    of the per-pair ratios, so a burst of load from elsewhere on a shared host hits both sides of a pair.
    """
    place = {"device": device, "dtype": dtype}
    one = _service_load(model, data, 1, seconds / 2, 16, 2.0, **place)
    pairs = []
    for _ in range(repeats):
        nobatch = _service_load(model, data, 8, seconds / repeats, 1, 0.0, **place)
        batched = _service_load(model, data, 8, seconds / repeats, 16, 2.0, **place)
        pairs.append((nobatch, batched))
    ratios = [b["throughput_rps"] / max(n["throughput_rps"], 1e-9) for n, b in pairs]
    mid = sorted(range(repeats), key=lambda i: ratios[i])[repeats // 2]
    out: dict[str, Any] = {
        "adm_batch1_one_client": one, "adm_8_clients_no_batching": pairs[mid][0],
        "adm_8_clients_dynamic_batching": pairs[mid][1],
        "batching_speedup": round(ratios[mid], 2), "batching_speedup_per_pair": [round(r, 2) for r in ratios],
        "note": "the two 8-client rows are the median pair of alternating runs",
        "service_p50_ms_batch1": one["p50_ms"], "service_samples_per_s_batch32": None,
        "device": one["service"]["device"], "dtype": one["service"]["dtype"]}
    if resolve_device(device).type == "cuda":
        b32 = _service_load(model, data, 32, seconds / 2, 32, 2.0, **place)
        out["adm_32_clients_batch32"] = b32
        out["service_samples_per_s_batch32"] = b32["throughput_rps"]
    return out


class _SyntheticRequests:
    """Features of the model's shape (values do not change a forward pass's cost) and real instruction texts."""

    def __init__(self, model: Any, n: int = 64, seed: int = 0) -> None:
        from flad_sim.instructions import N_COMMANDS, instruction_text

        g = torch.Generator().manual_seed(seed)
        a = model.cfg.adapter
        self.features = torch.randn(n, a.n_feature_tokens, a.d_feature, generator=g)
        self.instructions = [instruction_text(i % N_COMMANDS, 10.0 + 5 * (i % 7), variant=i % 3) for i in range(n)]


def _service_only(args: argparse.Namespace) -> int:
    from flad_edge.celladapt.model import ADLLM

    dev = resolve_device(args.device)
    reset_peak_memory(dev)
    model = ADLLM.from_pretrained(args.service_only, device=dev, dtype=args.dtype).eval()
    load0 = os.getloadavg()
    service = _service_block(model, _SyntheticRequests(model), args.load_seconds, repeats=args.service_repeats,
                             device=str(dev), dtype=args.dtype)
    result = {"bench": "llm", "mode": "service-only", "model_dir": args.service_only, "service": service,
              "goals": {"service_p50_le_30ms_batch1": service["adm_batch1_one_client"]["p50_ms"] <= 30.0,
                        "batching_ge_3x_throughput_8_clients": service["batching_speedup"] >= 3.0},
              "conditions": {"cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": 1,
                             "loadavg_start": [round(x, 2) for x in load0],
                             "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                             "features": "synthetic, the model's shape", "device": device_info(dev),
                             "peak_memory_bytes": peak_memory_bytes(dev)}}
    print(json.dumps(result, default=float))
    return 0


def _service_load(model: Any, data: Any, n_clients: int, seconds: float, max_batch: int, wait_ms: float,
                  device: str = "cpu", dtype: str = "auto") -> dict[str, Any]:
    from flad_edge.celladapt.service import ServiceConfig, WaypointService, free_tcp_address

    addr = free_tcp_address()
    feats = data.features[:64].numpy()
    instr = data.instructions[:64]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with WaypointService.for_model(model, ServiceConfig(address=addr, max_batch=max_batch, max_wait_ms=wait_ms,
                                                        default_timeout_s=5.0, device=device, dtype=dtype)) as svc:
        p = ctx.Process(target=_client_process, args=(addr, n_clients, seconds, feats, instr, q))
        p.start()
        r = q.get(timeout=seconds + 120)
        p.join(30)
        stats = svc.stats.to_dict()
    r["throughput_rps"] = round(r["requests"] / r["wall_s"], 1)
    r["p50_ms"], r["p99_ms"] = round(r["p50_ms"], 3), round(r["p99_ms"], 3)
    r["service"] = {k: stats[k] for k in ("ok", "errors", "timeouts", "batches", "mean_batch", "device", "dtype")}
    r.update({"clients": n_clients, "max_batch": max_batch, "max_wait_ms": wait_ms, "seconds": seconds})
    return r


# ---------------------------------------------------------------------------------------------- closed loop

_W: dict[str, Any] = {}


def _worker_init(encoder_ckpt: str, model_dir: str, constant_wp: list, device: str = "cpu", dtype: str = "auto"
                 ) -> None:
    """A closed-loop worker's models, on `device` (the ADM behind its service in the serving `dtype`)."""
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    from flad_edge.celladapt.model import ADLLM
    from flad_vehicle.control.learners import shared_encoder

    _W["device"], _W["dtype"] = device, dtype
    _W["encoder"] = shared_encoder(encoder_ckpt, device)
    _W["ad_llm"] = ADLLM.from_pretrained(Path(model_dir) / "ad_llm", device=device)
    _W["adm"] = ADLLM.from_pretrained(Path(model_dir) / "adm", device=device)
    _W["constant"] = np.asarray(constant_wp, np.float64)


def _adm_service_source() -> Any:
    if "adm_client" not in _W:
        from flad_core.bus import BusConfig, ZmqBus
        from flad_edge.celladapt.service import ServiceConfig, WaypointClient, WaypointService, free_tcp_address

        addr = free_tcp_address()
        _W["adm_service"] = WaypointService.for_model(_W["adm"], ServiceConfig(
            address=addr, max_wait_ms=0.5, default_timeout_s=5.0, device=_W["device"], dtype=_W["dtype"])).start()
        _W["bus"] = ZmqBus(f"bench-{os.getpid()}", BusConfig())
        _W["adm_client"] = WaypointClient(_W["bus"], addr, timeout_s=5.0)
    client = _W["adm_client"]
    return lambda f, ins, notice, tp: client.waypoints(f, ins, notice, vehicle_id=f"ego{os.getpid()}",
                                                       target_point=tp)


def _make_agent(name: str, world: Any, plan_every: int) -> tuple[Any, bool]:
    """(agent, privileged) for one route."""
    from flad_edge.celladapt.agents import model_source
    from flad_sim.expert import ExpertAgent
    from flad_vehicle.control.agent import ConstantWaypointAgent, WaypointAgent

    if name == "expert":
        return ExpertAgent(world), True
    if name == "constant":
        return ConstantWaypointAgent(_W["constant"]), False
    if name == "encoder_head":
        return WaypointAgent(_W["encoder"], None, plan_every=plan_every), False
    if name == "ad_llm":
        return WaypointAgent(_W["encoder"], model_source(_W["ad_llm"]), plan_every=plan_every), False
    if name == "adm_via_service":
        return WaypointAgent(_W["encoder"], _adm_service_source(), plan_every=plan_every), False
    raise ValueError(f"unknown agent {name!r}; agents: {AGENTS}")


def _route_worker(job: tuple, init: tuple, bag_dir: str, sensors: bool, plan_every: int, lo: float, hi: float,
                  per_town: int) -> dict[str, Any]:
    if not _W:      # loaded here, not in a Pool initializer: a failing initializer makes Pool respawn forever
        _worker_init(*init)
    from flad_bench.driving import run_route

    return run_route(job, lambda a, w: _make_agent(a, w, plan_every), bag_dir, sensors, plan_every, lo, hi,
                     per_town)


def _closed_loop(encoder_ckpt: str, model_dir: Path, constant_wp: np.ndarray, towns: list[str], per_town: int,
                 lo: float, hi: float, plan_every: int, workers: int, agents: tuple[str, ...], bag_dir: str,
                 sensors: bool, device: str = "cpu", dtype: str = "auto") -> dict[str, Any]:
    from functools import partial

    from flad_bench.driving import evaluate_agents

    init = (encoder_ckpt, str(model_dir), constant_wp.tolist(), device, dtype)
    worker = partial(_route_worker, init=init, bag_dir=bag_dir, sensors=sensors, plan_every=plan_every, lo=lo,
                     hi=hi, per_town=per_town)
    out = evaluate_agents(worker, agents, towns, per_town, lo, hi, workers, progress=sys.stderr.isatty())
    out["plan_hz"] = 20.0 / plan_every
    out["bags"] = bag_dir
    return out


# ---------------------------------------------------------------------------------------------- main


DEFAULT_DATA = "data/fleet"
#: --quick: everything small (numbers meaningless); values left unset on the command line come from here.
QUICK = {"encoder_minutes": 0.05, "steps_scale": 0.01, "train_batch": 8, "routes_per_town": 1, "route_min_m": 30.0,
         "route_max_m": 60.0, "load_seconds": 1.0, "service_repeats": 1, "latency_n": 20, "closed_loop_towns": 1,
         "tl_eval_samples": 32, "ablation_steps": 2, "ablation_routes_per_town": 1, "onpolicy_frames": 8,
         "collect_vehicles": 6, "collect_frames": 12}
FULL = {"encoder_minutes": 5.0, "steps_scale": 1.0, "routes_per_town": 15, "route_min_m": 80.0, "route_max_m": 130.0,
        "tl_eval_samples": 1024, "ablation_steps": 1500, "ablation_routes_per_town": 8, "onpolicy_frames": 3000,
        "load_seconds": 8.0, "service_repeats": 3, "latency_n": 200, "closed_loop_towns": None, "train_batch": None}


def _encoder(args: argparse.Namespace, run_path: Path) -> tuple[Any, str, dict[str, Any]]:
    """The encoder of `--encoder`, or one trained here for `--encoder-minutes`, on `--device`."""
    from flad_vehicle.encoder.checkpoint import load_checkpoint

    if args.encoder:
        enc, meta = load_checkpoint(args.encoder, device=args.device)
        tcfg = (meta.get("extra") or meta).get("train") or {}
        step = meta.get("step")
        return enc.eval(), args.encoder, {"checkpoint": args.encoder, "steps": step,
                                          "batch_size": tcfg.get("batch_size"), "minutes": tcfg.get("minutes"),
                                          "data": tcfg.get("data"),
                                          "frames_seen": step * tcfg["batch_size"] if step and tcfg.get("batch_size")
                                          else None}
    from flad_vehicle.encoder.train import TrainConfig, train

    ckpt = run_path / "encoder.safetensors"
    tc = TrainConfig(data=args.data, holdout_towns=args.holdout_towns, steps=10**6, minutes=args.encoder_minutes,
                     progress=False, device=args.device, precision=args.precision)
    r = train(tc, checkpoint=ckpt)
    return r["model"].eval(), str(ckpt), {"checkpoint": str(ckpt), "minutes": args.encoder_minutes,
                                          "steps": r["steps"], "batch_size": tc.batch_size, "data": args.data,
                                          "frames_seen": r["samples"], "train_frames": r["data"].get("train_samples")}


def _encoder_held_out(encoder: Any, root: str, towns: list[str], max_samples: int) -> dict[str, Any]:
    """Open-loop figures of the encoder on held-out-town frames (traffic-light accuracy among them)."""
    from flad_sim.dataset import FleetDataset, iter_batches
    from flad_vehicle.encoder import batch_to_torch
    from flad_vehicle.encoder.train import Metrics, needed_fields

    names = tuple(needed_fields(encoder))
    shards = FleetDataset.open(root).select(towns=towns)
    dev = next(encoder.parameters()).device
    m, n, counts = Metrics(), 0, {}
    with torch.no_grad():
        for b in iter_batches(shards, 32, shuffle=True, seed=0, fields=list(names)):
            tb = batch_to_torch(b, names)
            out = {k: v.float().cpu() for k, v in encoder.forward_train(to_device(tb, dev)).items()}
            m.add(out["pred.tl"].argmax(-1), out["pred.waypoints"], out["pred.bev"] > 0, tb)
            for v in tb["tl_state"].reshape(-1).tolist():
                counts[v] = counts.get(v, 0) + 1
            n += len(tb["speed"])
            if n >= max_samples:
                break
    r = m.result()
    return {"towns": towns, "samples": r["samples"], "tl_accuracy": round(r["tl_accuracy"], 4),
            "tl_majority_share": round(max(counts.values()) / max(1, n), 4) if counts else None,
            "wp_l1": round(r["wp_l1"], 4), "bev_iou": round(r["bev_iou"], 4)}


def _parser() -> argparse.ArgumentParser:
    from flad_edge.celladapt.model import SERVE_DTYPES

    ap = argparse.ArgumentParser(prog="flad bench llm", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object (always on; kept for symmetry)")
    ap.add_argument("--data", default=None,
                    help=f"fleet dataset [{DEFAULT_DATA}: collected on demand if missing; --quick: a small one "
                         "collected into the run folder]")
    ap.add_argument("--encoder", default="", help="encoder checkpoint (default: train one for --encoder-minutes)")
    ap.add_argument("--encoder-minutes", type=float, default=None, help=f"[{FULL['encoder_minutes']}]")
    ap.add_argument("--holdout-towns", nargs="+", default=["Town05", "Town06"])
    ap.add_argument("--general", default="tiny", help="general LLM: tiny | smollm2 | local checkpoint path")
    ap.add_argument("--steps-scale", type=float, default=None, help="multiplies every training phase's steps [1.0]")
    ap.add_argument("--routes-per-town", type=int, default=None, help=f"[{FULL['routes_per_town']}]")
    ap.add_argument("--route-min-m", type=float, default=None, help=f"[{FULL['route_min_m']}]")
    ap.add_argument("--route-max-m", type=float, default=None, help=f"[{FULL['route_max_m']}]")
    ap.add_argument("--plan-every", type=int, default=10, help="world ticks (20 Hz) between waypoint requests")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--load-seconds", type=float, default=None, help=f"[{FULL['load_seconds']}]")
    ap.add_argument("--no-closed-loop", action="store_true")
    ap.add_argument("--agents", nargs="+", default=list(AGENTS), choices=AGENTS,
                    help="closed-loop agents (default: all; every agent drives the same routes)")
    ap.add_argument("--no-bags", action="store_true", help="do not record a bag per closed-loop route")
    ap.add_argument("--bag-sensors", action="store_true",
                    help="route bags also carry cameras and LiDAR at the planning rate (~60 MB per route)")
    ap.add_argument("--extra-data", nargs="+", default=[], metavar="DIR",
                    help="more fleet datasets for the LLMs, e.g. DAgger / noise-injection frames "
                         "(`flad sim collect --noise` / `--dagger-learner`); held-out towns are dropped")
    ap.add_argument("--ablation", action="store_true",
                    help="also train and drive the AD-LLM variants of flad_bench.driver_ablation (target point / "
                         "instructions / noise injection / DAgger) and print their table")
    ap.add_argument("--ablation-steps", type=int, default=None, help="--ablation: training steps per variant [1500]")
    ap.add_argument("--ablation-batch", type=int, default=32, help="--ablation: batch size [32]")
    ap.add_argument("--ablation-model", choices=("student", "teacher"), default="student",
                    help="--ablation: the architecture of the variants: the ADM's (student, ~20x cheaper to train "
                         "on a CPU) or the AD-LLM's (teacher) [student]")
    ap.add_argument("--ablation-routes-per-town", type=int, default=None,
                    help="--ablation: held-out routes per town per variant [8]")
    ap.add_argument("--onpolicy-frames", type=int, default=None,
                    help="--ablation: noise-injection and DAgger frames collected each [3000]")
    ap.add_argument("--ablation-data", default="",
                    help="--ablation: reuse the noise-injection dataset under DIR/noise (default: collect one)")
    ap.add_argument("--tl-eval-samples", type=int, default=None,
                    help=f"held-out frames for the encoder's traffic-light accuracy [{1024}]")
    ap.add_argument("--service-only", default="", metavar="MODEL_DIR",
                    help="only the waypoint-service load test, on a saved ADM (`save_pretrained` dir)")
    ap.add_argument("--runs-dir", default=None)
    ap.add_argument("--cache-dir", default=None,
                    help="feature cache [~/.cache/flad/celladapt; --quick: the run folder]")
    add_device_argument(ap, what="every model (training, open loop, service, closed-loop workers)")
    add_precision_argument(ap)
    ap.add_argument("--dtype", default="auto", choices=SERVE_DTYPES,
                    help="the waypoint service's model dtype (default auto: fp16 on CUDA, fp32 on the CPU)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run in well under a minute (tiny data, seconds of training, one short route per "
                         "agent): every figure is there, none is meaningful")
    return ap


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, str | None]:
    """Arguments with the --quick / full defaults filled in, and what is wrong with them (None: nothing)."""
    args = _parser().parse_args([a for a in (sys.argv[1:] if argv is None else argv) if a != "--"])
    sizes = QUICK if args.quick else FULL
    for key, value in sizes.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.cache_dir is None and not args.quick:
        args.cache_dir = str(Path.home() / ".cache" / "flad" / "celladapt")
    try:
        args.device = str(resolve_device(args.device))
    except DeviceError as exc:
        return args, f"--device: {exc}"
    if args.service_only and not (Path(args.service_only) / "celladapt.json").is_file():
        return args, (f"--service-only {args.service_only}: not a saved AD-LLM/ADM (no celladapt.json); "
                      "`flad llm train` writes them to runs/<id>/models/adm")
    if args.encoder and not Path(args.encoder).is_file():
        return args, (f"--encoder {args.encoder}: no such checkpoint (make one with `flad vehicle train`, or leave "
                      "out --encoder to train one here)")
    if args.data is not None and args.data != DEFAULT_DATA:
        from flad_bench.fleetdata import collect_command
        from flad_sim.dataset import is_fleet_dataset

        if not is_fleet_dataset(args.data):
            return args, f"no fleet dataset at {args.data} (make one with `{collect_command(args.data)}`)"
    from flad_sim.dataset import is_fleet_dataset

    bad = [d for d in args.extra_data if not is_fleet_dataset(d)]
    if bad:
        return args, f"--extra-data: no fleet dataset at {', '.join(bad)}"
    if min(args.routes_per_town, args.workers, args.plan_every) < 1 or args.load_seconds <= 0:
        return args, "--routes-per-town, --workers and --plan-every must be >= 1 and --load-seconds > 0"
    return args, None


def _dataset(args: argparse.Namespace, run_path: Path) -> dict[str, Any] | None:
    """Point args.data at a fleet dataset, collecting one if needed; what was collected (None: nothing)."""
    from flad_bench.fleetdata import ensure_fleet

    if args.data is None and args.quick:
        args.data = str(run_path / "data")
        return ensure_fleet(args.data, "flad bench llm --quick", vehicles=args.collect_vehicles,
                            frames=args.collect_frames)
    if args.data is None:
        args.data = DEFAULT_DATA
    return ensure_fleet(args.data, "flad bench llm")


def main(argv: list[str] | None = None) -> int:
    args, error = _parse(argv)
    if error:
        print(f"flad bench llm: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    from flad_core.runs import RunDir, seed_everything

    seed_everything(0)
    if args.service_only:
        return _service_only(args)
    t_start = time.perf_counter()
    run = RunDir.create("bench-llm", vars(args), root=Path(args.runs_dir) if args.runs_dir else None, log=False)
    collected = _dataset(args, run.path)
    if args.cache_dir is None:
        args.cache_dir = str(run.path / "cache")
    towns = _fleet_towns(args.data)
    missing = [t for t in args.holdout_towns if t not in towns]
    if missing or len(towns) - len(set(args.holdout_towns)) < 1:
        print(f"flad bench llm: the dataset at {args.data} has towns {towns}; it needs the held-out towns "
              f"{args.holdout_towns} and at least one more (collect one over every town with "
              f"`flad sim collect --out {args.data}`, or pass --holdout-towns)", file=sys.stderr)
        return 2
    result = _run(args, run, collected)
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    result["run_dir"] = str(run.path)
    run.write_json("result.json", result)
    print(json.dumps(result, default=float))
    return 0


def _fleet_manifest(root: str) -> dict[str, Any]:
    return json.loads((Path(root) / "manifest.json").read_text(encoding="utf-8"))


def _fleet_towns(root: str) -> list[str]:
    manifest = _fleet_manifest(root)
    return sorted(manifest.get("town_counts") or manifest.get("towns") or [])


def _budgets(enc_info: dict[str, Any], res: dict[str, Any], pcfg: Any, data_info: dict[str, Any]
             ) -> dict[str, Any]:
    """What each agent was trained with: frames, steps, minutes (the LLMs also on their teachers' phases)."""
    ph = res["phases"]

    def phase(name: str) -> dict[str, Any]:
        r = ph.get(name, {})
        return {"steps": r.get("steps"), "minutes": round(r.get("wall_s", 0.0) / 60, 2),
                "samples_seen": (r.get("steps") or 0) * pcfg.batch_size}

    enc = {"frames_seen": enc_info.get("frames_seen"), "steps": enc_info.get("steps"),
           "minutes": enc_info.get("minutes"), "train_frames": enc_info.get("train_frames")}
    frames = {"cloud": data_info.get("cloud"), "edge": data_info.get("edge"),
              "extra_on_policy": sum(e["frames"] for e in data_info.get("extra", []))}
    cloud_phases = ("general_on_driving_data", "cloud_distill_general_to_ad_llm")
    teacher = {p: phase(p) for p in ph if p in cloud_phases or "lora" in p}
    return {"encoder_head": {"encoder": enc},
            "ad_llm": {"encoder": enc, "frames": frames, "phases": teacher},
            "adm_via_service": {"encoder": enc, "frames": frames,
                                "phases": {**teacher, **{p: phase(p) for p in ph if p not in teacher}}}}


def _driving_goals(cl: dict[str, Any]) -> dict[str, Any]:
    """The closed-loop goals of the CELLAdapt issue, from the per-agent summaries (None: agent not run)."""
    if not cl:
        return {}

    def ds(a: str) -> float | None:
        return cl[a]["ds"] if a in cl else None

    def above_constant(a: str) -> bool | None:
        if a not in cl or "constant" not in cl:
            return None
        return cl[a]["ds_ci95"][0] > cl["constant"]["ds_ci95"][1]

    learned = [a for a in ("encoder_head", "ad_llm", "adm_via_service") if a in cl]
    return {
        "routes_ge_30_per_agent": all(v["n_routes"] >= 30 for v in cl.values()),
        "expert_ds_ge_95": None if ds("expert") is None else ds("expert") >= 95.0,
        "encoder_head_ds_ge_80": None if ds("encoder_head") is None else ds("encoder_head") >= 80.0,
        "ad_llm_ds_ge_70": None if ds("ad_llm") is None else ds("ad_llm") >= 70.0,
        "adm_ds_ge_0.9x_ad_llm": (None if ds("adm_via_service") is None or ds("ad_llm") is None
                                  else ds("adm_via_service") >= 0.9 * ds("ad_llm")),
        "llm_agents_ci_above_constant_ci": {a: above_constant(a) for a in ("ad_llm", "adm_via_service") if a in cl},
        "route_deviations_le_10pct": {a: cl[a]["route_deviation_share"] <= 0.10 for a in learned},
    }


def _run(args: argparse.Namespace, run: Any, collected: dict[str, Any] | None) -> dict[str, Any]:
    """Train (encoder, general LLM, AD-LLM, LoRA, ADM), then every figure of the JSON but wall_s and run_dir."""
    from flad_edge.celladapt.data import cached_features, concat_feature_sets
    from flad_edge.celladapt.pipeline import PipelineConfig, run_pipeline
    from flad_edge.celladapt.train import evaluate, waypoint_metrics

    load0 = os.getloadavg()
    dev = torch.device(args.device)
    reset_peak_memory(dev)
    encoder, ckpt, enc_info = _encoder(args, run.path)
    data = cached_features(encoder, args.data, ckpt, args.cache_dir)
    expert_data = data                    # the ablation trains on expert frames only, whatever --extra-data adds
    extra_info = []
    for root in args.extra_data:          # on-policy frames (DAgger / noise injection): training towns only
        extra = cached_features(encoder, root, ckpt, args.cache_dir).select(exclude_towns=args.holdout_towns)
        extra_info.append({"root": root, "frames": len(extra), "source": _fleet_manifest(root).get("onpolicy")})
        data = concat_feature_sets([data, extra])
    s = args.steps_scale
    pcfg = PipelineConfig(holdout_towns=args.holdout_towns, general=args.general,
                          general_steps=max(1, int(300 * s)), distill_steps=max(1, int(300 * s)),
                          lora_steps=max(1, int(150 * s)), adm_steps=max(1, int(600 * s)), device=args.device,
                          precision=args.precision)
    if args.train_batch:
        pcfg.batch_size = args.train_batch
    towns = sorted(set(data.towns))
    train_towns = [t for t in towns if t not in pcfg.holdout_towns]
    if len(train_towns) >= 2:
        pcfg.edge_towns, pcfg.cloud_towns = train_towns[-1:], train_towns[:-1]
    res = run_pipeline(data, pcfg, out_dir=run.path / "models", on_log=run.log_metrics)
    models = res.pop("models")
    held = data.select(towns=pcfg.holdout_towns)
    train_set = data.select(exclude_towns=pcfg.holdout_towns)
    const_wp = train_set.waypoints.mean(0)

    open_loop: dict[str, Any] = {name: evaluate(m, held) for name, m in models.items()}
    open_loop["constant"] = waypoint_metrics(const_wp.expand_as(held.waypoints), held.waypoints)
    if held.encoder_waypoints is not None:
        open_loop["encoder_head"] = waypoint_metrics(held.encoder_waypoints, held.waypoints)
    params = {name: m.parameter_counts() for name, m in models.items()}
    for p in params.values():
        p.pop("trainable", None)
    lat = {name: _latency(models[name], held, args.latency_n) for name in ("ad_llm", "adm")}
    lat["general"] = _latency(models["general"], held, max(1, args.latency_n // 4))
    service = _service_block(models["adm"], held, args.load_seconds, repeats=args.service_repeats,
                             device=args.device, dtype=args.dtype)
    one = service["adm_batch1_one_client"]
    tl, sl = open_loop["ad_llm"]["wp_l1"], open_loop["adm"]["wp_l1"]
    data_info: dict[str, Any] = {"root": args.data, "towns": towns, "held_out_towns": pcfg.holdout_towns,
                                 "cloud_towns": pcfg.cloud_towns, "edge_towns": pcfg.edge_towns, **res["samples"]}
    if collected:
        data_info["collected"] = collected
    if extra_info:
        data_info["extra"] = extra_info
    enc_info["held_out"] = _encoder_held_out(encoder, args.data, pcfg.holdout_towns, args.tl_eval_samples)
    result: dict[str, Any] = {
        "bench": "llm",
        "conditions": {
            "host": socket.gethostname(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": 1, "loadavg_start": [round(x, 2) for x in load0],
            "device": device_info(dev), "precision": args.precision, "serve_dtype": service["dtype"],
            "emulated": False, "data": data_info,
            "encoder": enc_info, "general_llm": args.general, "steps_scale": s,
        },
        "open_loop_held_out": open_loop,
        "teacher_vs_student": {
            "teacher": "ad_llm (LoRA merged)", "student": "adm",
            "l1_ratio_student_over_teacher": round(sl / tl, 3),
            "latency_ratio_teacher_over_student_p50": round(lat["ad_llm"]["p50_ms"] / lat["adm"]["p50_ms"], 2),
        },
        "params": params,
        "lora": {"trainable_fraction": round(res["lora_trainable_fraction"], 4),
                 "trainable_params": res["lora_trainable_params"],
                 "edge_l1_before": round(res["ad_llm_before_lora_edge_l1"], 4),
                 "edge_l1_after": round(res["ad_llm_after_lora_edge_l1"], 4),
                 "held_out_l1_before_lora": round(res["ad_llm_before_lora_held_out"]["wp_l1"], 4)},
        "latency_batch1_inprocess": lat,
        "service": service,
        "phases": res["phases"],
        "training_budget": _budgets(enc_info, res, pcfg, data_info),
    }
    if args.quick:
        result["quick"] = "smoke run: numbers are not meaningful"
    if not args.no_closed_loop:
        cl_towns = pcfg.holdout_towns[:args.closed_loop_towns] if args.closed_loop_towns else pcfg.holdout_towns
        bags = "" if args.no_bags else str(run.path / "routes")
        result["closed_loop"] = _closed_loop(ckpt, run.path / "models", const_wp.numpy(), cl_towns,
                                             args.routes_per_town, args.route_min_m, args.route_max_m,
                                             args.plan_every, args.workers, tuple(args.agents), bags,
                                             args.bag_sensors, args.device, args.dtype)
        for a in result["closed_loop"]["agents"]:     # the encoder whose features/head each agent drives with
            if a not in ("expert", "constant"):
                result["closed_loop"]["agents"][a]["encoder_tl_accuracy_held_out"] = enc_info["held_out"][
                    "tl_accuracy"]
    if args.ablation:
        from flad_bench.driver_ablation import run_ablation

        cl_towns = pcfg.holdout_towns[:args.closed_loop_towns] if args.closed_loop_towns else pcfg.holdout_towns
        result["ablation"] = run_ablation(args, run.path, ckpt, expert_data, train_towns, pcfg.holdout_towns,
                                          cl_towns, args.cache_dir)
    result["goals"] = {
        "student_l1_le_1.15x_teacher": sl <= 1.15 * tl,
        "student_3x_lower_latency": result["teacher_vs_student"]["latency_ratio_teacher_over_student_p50"] >= 3.0,
        "service_p50_le_30ms_batch1": one["p50_ms"] <= 30.0,
        "batching_ge_3x_throughput_8_clients": result["service"]["batching_speedup"] >= 3.0,
        **_driving_goals(result.get("closed_loop", {}).get("agents", {})),
    }
    result["conditions"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["conditions"]["peak_memory_bytes"] = peak_memory_bytes(dev)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
