"""`flad vehicle ...`: encoder training, evaluation and profiling (more vehicle commands register here too).

`register(subparsers)` adds the `vehicle` group; each command module adds its subcommands through its own
`register_*(sub)` function, so other vehicle commands can be added with one line below.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("vehicle", help="vehicle layer: vision encoder training, evaluation, profiling",
                                   description="Vehicle-layer commands.")
    sub = parser.add_subparsers(dest="vehicle_command", metavar="SUBCOMMAND")
    register_encoder_commands(sub)

    def _help(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 0

    parser.set_defaults(func=_help)


def register_encoder_commands(sub: argparse._SubParsersAction) -> None:
    """`train`, `eval` and `profile` for the vision encoder."""
    from flad_core.device import add_device_argument, add_precision_argument
    from flad_vehicle.encoder.train import DEFAULT_DATA, TrainConfig

    d = TrainConfig()
    t = sub.add_parser("train", help="standalone multi-task training of the vision encoder",
                       description="Train the encoder on embedded-world shards (default data/fleet, split by town) "
                                   "or on synthetic data; writes runs/<id>/ with config, metrics.jsonl, log.txt "
                                   "and encoder.safetensors.")
    t.add_argument("--config", default=d.encoder, help="encoder preset (tiny, paper) [%(default)s]")
    t.add_argument("--data", default=DEFAULT_DATA, help="fleet dataset root [%(default)s]")
    t.add_argument("--synthetic", action="store_true", help="train on synthetic schema-shaped data")
    t.add_argument("--holdout-towns", nargs="*", default=[], help="towns kept for evaluation (default: the last)")
    t.add_argument("--steps", type=int, default=d.steps, help="training steps [%(default)s]")
    t.add_argument("--minutes", type=float, default=0.0, help="time budget in minutes (0: steps only)")
    t.add_argument("--batch-size", type=int, default=d.batch_size)
    t.add_argument("--lr", type=float, default=d.lr, help="general learning rate [%(default)s]")
    t.add_argument("--backbone-lr", type=float, default=d.backbone_lr, help="backbone learning rate [%(default)s]")
    t.add_argument("--threads", type=int, default=d.threads, help="torch.set_num_threads [%(default)s]")
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--ckpt-every", type=int, default=0)
    t.add_argument("--resume", default="", help="checkpoint to continue from")
    t.add_argument("--out", default="", help="checkpoint path (default runs/<id>/encoder.safetensors)")
    t.add_argument("--runs-dir", default=None, help="runs root (default $FLAD_RUNS_DIR or runs)")
    t.add_argument("--no-eval", action="store_true", help="skip held-out evaluation at the end")
    t.add_argument("--no-augment", action="store_true", help="no photometric camera augmentation")
    t.add_argument("--no-progress", action="store_true")
    add_device_argument(t, what="training")
    add_precision_argument(t)
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="open-loop evaluation of an encoder checkpoint",
                       description="Traffic-light accuracy, waypoint L1/ADE/FDE and BEV IoU on held-out towns, "
                                   "beside a majority-class / constant-waypoint baseline. Prints JSON.")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", default=DEFAULT_DATA)
    e.add_argument("--synthetic", action="store_true")
    e.add_argument("--holdout-towns", nargs="*", default=[])
    e.add_argument("--max-batches", type=int, default=0)
    e.add_argument("--threads", type=int, default=1)
    add_device_argument(e, what="the encoder")
    e.set_defaults(func=_eval)

    p = sub.add_parser("profile", help="per-layer profile JSON (the model profile SWIFT reads)",
                       description="Counts forward FLOPs per sample per layer (FlopCounterMode), parameter bytes, "
                                   "bytes across a cut after each layer, a training-memory estimate and measured "
                                   "peaks; writes {\"layers\": [...], ...}.")
    p.add_argument("--config", default="tiny", help="encoder preset (tiny, paper) or a checkpoint .safetensors")
    p.add_argument("--out", default="profile.json")
    p.add_argument("--batch-size", type=int, default=4, help="micro-batch for memory figures [%(default)s]")
    p.add_argument("--no-measure", action="store_true", help="skip measured peaks (faster)")
    p.add_argument("--no-loss", action="store_true", help="profile the inference sequence (no loss layer)")
    p.add_argument("--threads", type=int, default=1)
    add_device_argument(p, what="the profiled forward/backward passes")
    p.set_defaults(func=_profile)


def _train(args: argparse.Namespace) -> int:
    from flad_core.config import ConfigError
    from flad_core.device import resolve_device
    from flad_core.runs import RunDir
    from flad_sim.dataset import ShardError
    from flad_vehicle.encoder.checkpoint import CheckpointError
    from flad_vehicle.encoder.train import DataSource, TrainConfig, baseline_metrics, evaluate, needed_fields, train

    try:
        cfg = TrainConfig(encoder=args.config, data=args.data, synthetic=args.synthetic,
                          holdout_towns=list(args.holdout_towns), batch_size=args.batch_size, steps=args.steps,
                          minutes=args.minutes, lr=args.lr, backbone_lr=args.backbone_lr, threads=args.threads,
                          seed=args.seed, ckpt_every=args.ckpt_every, resume=args.resume,
                          progress=not args.no_progress, augment=not args.no_augment, device=args.device,
                          precision=args.precision)
        cfg.validate()
        resolve_device(cfg.device)
        from flad_vehicle.encoder.model import VisionEncoder

        source = DataSource(cfg, needed_fields(VisionEncoder(cfg.encoder)))
    except (ConfigError, ShardError, ValueError) as exc:    # DeviceError is a ValueError
        print(f"flad vehicle train: {exc}", file=sys.stderr)
        return 2
    run = RunDir.create("train", cfg, root=Path(args.runs_dir) if args.runs_dir else None)
    log.info("run %s", run.path)
    try:
        res = train(cfg, run=run, checkpoint=args.out or None, source=source)
    except CheckpointError as exc:
        print(f"flad vehicle train: {exc}", file=sys.stderr)
        return 2
    model = res.pop("model")
    if not args.no_eval and (cfg.synthetic or source.eval_shards):
        res["eval"] = evaluate(model, source.eval_batches())
        res["baseline"] = baseline_metrics(source.train_epoch(), source.eval_batches())
    run.write_json("result.json", res)
    print(json.dumps(res, indent=2, default=str))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from flad_core.device import device_info, resolve_device
    from flad_sim.dataset import ShardError
    from flad_vehicle.encoder.checkpoint import CheckpointError, load_checkpoint
    from flad_vehicle.encoder.train import DataSource, TrainConfig, baseline_metrics, evaluate, needed_fields

    torch.set_num_threads(args.threads)
    try:
        model, meta = load_checkpoint(args.checkpoint, device=resolve_device(args.device))
        cfg = TrainConfig(data=args.data, synthetic=args.synthetic, holdout_towns=list(args.holdout_towns))
        source = DataSource(cfg, needed_fields(model))
    except (CheckpointError, ShardError, ValueError) as exc:
        print(f"flad vehicle eval: {exc}", file=sys.stderr)
        return 2
    res = {"checkpoint": args.checkpoint, "step": meta["step"], "data": source.describe(),
           "device": device_info(model.device),
           "eval": evaluate(model, source.eval_batches(args.max_batches)),
           "baseline": baseline_metrics(source.train_epoch(), source.eval_batches(args.max_batches))}
    print(json.dumps(res, indent=2, default=str))
    return 0


def _profile(args: argparse.Namespace) -> int:
    import torch

    from flad_core.atomic import atomic_write_json
    from flad_core.config import ConfigError
    from flad_core.device import DeviceError, resolve_device
    from flad_vehicle.encoder.checkpoint import CheckpointError, load_checkpoint
    from flad_vehicle.encoder.model import VisionEncoder, batch_to_torch
    from flad_vehicle.encoder.profile import profile_model
    from flad_vehicle.encoder.synthetic import synthetic_batches

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        dev = resolve_device(args.device)
        if args.config.endswith(".safetensors"):
            model, _ = load_checkpoint(args.config, device=dev)
        else:
            model = VisionEncoder(args.config, device=dev)
    except (ConfigError, CheckpointError, DeviceError) as exc:
        print(f"flad vehicle profile: {exc}", file=sys.stderr)
        return 2
    cams = model.cfg.cameras
    batch = batch_to_torch(next(synthetic_batches(1, args.batch_size, seed=0, camera_sizes=cams,
                                                  lidar_rays=model.cfg.lidar_rays)))
    prof = profile_model(model, batch, include_loss=not args.no_loss, measure=not args.no_measure)
    atomic_write_json(args.out, prof)
    t = prof["totals"]
    print(f"{args.out}: {len(prof['layers'])} layers on {prof['device']['device']}, {t['params']:,} parameters, "
          f"{t['flops'] / 1e9:.3f} GFLOPs/sample forward, training memory ≈ {t['mem_bytes'] / 2**20:.1f} MiB "
          f"at batch {prof['batch_size']}")
    return 0
