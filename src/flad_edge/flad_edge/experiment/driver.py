"""The experiment's evaluation stages around the federated loop: the encoder on held-out towns, and the driver.

`flad run` trains the vision encoder by federated learning; a number only means something when it is
measured on towns no vehicle trained on. Two stages are wired here from existing parts, nothing is
re-implemented:

* after each round, `evaluate_encoder` scores the global encoder on the held-out vehicles' frames with the
  encoder trainer's own open-loop evaluation (`flad_vehicle.encoder.train.evaluate`: the multi-task
  training loss, traffic-light accuracy, waypoint L1 in metres), so the per-round curve is the same figure
  `flad vehicle train` and `flad bench encoder` report;
* after training, `train_driver` runs CELLAdapt (`flad_edge.celladapt`) on the final encoder's features:
  the cloud trains the general LLM and distils it into the AD-LLM once; every edge then LoRA-fine-tunes its
  own copy on ITS vehicles' features only (raw sensor data never leaves a vehicle; an edge never sees another
  edge's features) and distils it into its ADM. `evaluate_driver` drives every edge's ADM in closed loop
  on seeded routes of the held-out towns, scored by the leaderboard's RC / IS / DS (`flad_sim.metrics`),
  next to the blind `ConstantWaypointAgent` (the training-mean trajectory through the same PID) on the same
  routes in the same seeded worlds, so a report can show whether the learned driver beats a car that
  ignores its sensors.

Two closed-loop modes drive the same routes. `inprocess` (the default): `flad_sim.agent.RouteRunner` with
`flad_vehicle.control.agent.WaypointAgent` (sensors -> encoder -> ADM -> PID), deterministic, no start-up,
and rendering the sensor rig the dataset was collected with (tests and quick runs use a small one).
`nodes`: `flad_edge.eval.closed_loop.run_closed_loop`, the deployment's processes over ZeroMQ (world bridge,
encoder node, the waypoint service holding the ADM, controller node); its world bridge renders only the
default rig, so it needs an encoder trained on default-rig data, and costs a few seconds of start-up a run.

Every artifact (encoder checkpoint, cloud AD-LLM, each edge's LoRA adapter and ADM, JSON summaries) goes
under `out_dir`, and `train_driver`'s result is plain JSON, so the driver can be evaluated again from disk.

`DriverConfig.device` (flad_core.device; `auto`: CUDA when present) is where the feature extraction, every
CELLAdapt phase (in `precision`) and the in-process closed loop run (the node mode passes it to the nodes);
both results record it under `device`.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from flad_core.atomic import atomic_write_text
from flad_core.config import ConfigError, to_dict
from flad_core.device import DeviceError, check_device_spec, check_precision, log_device, resolve_device

log = logging.getLogger(__name__)

#: baselines `evaluate_driver` can run beside the learned driver on the same routes
BASELINES = ("constant", "encoder_head", "expert")


# ================================================================================================ encoder


def encoder_config_for(encoder: Any, data_root: str | Path) -> Any:
    """The encoder config `encoder` (a preset name, override dict or EncoderConfig) with the sensor shapes
    of the dataset at `data_root`. The presets assume the default rig; a fleet collected with smaller
    cameras or fewer LiDAR rays (tests, quick runs) needs the encoder built for what it will be fed."""
    from flad_sim.dataset import FleetDataset
    from flad_vehicle.encoder.config import get_config

    manifest = FleetDataset.open(data_root).manifest
    base = get_config(encoder).to_dict()
    if manifest.get("camera_sizes"):
        base["cameras"] = {k: list(v) for k, v in manifest["camera_sizes"].items()}
    if manifest.get("lidar_rays"):
        base["lidar_rays"] = int(manifest["lidar_rays"])
    return get_config(base)


def build_encoder(state_dict: Mapping[str, torch.Tensor], data_root: str | Path, encoder: Any = "tiny",
                  device: str | torch.device | None = None) -> Any:
    """A VisionEncoder for `data_root`'s sensor shapes holding `state_dict` (strict: a state of another
    config fails here, naming the tensors, rather than evaluating a half-loaded model), in eval mode, on
    `device` (None: the CPU)."""
    from flad_vehicle.encoder.model import VisionEncoder

    model = VisionEncoder(encoder_config_for(encoder, data_root), device=device)
    model.load_state_dict(dict(state_dict), strict=True)
    return model.eval()


def heldout_split(vehicle_ids: Iterable[str], towns: Mapping[str, str], heldout_towns: Iterable[str]
                  ) -> tuple[list[str], list[str]]:
    """(train_ids, heldout_ids): the vehicles driving a held-out town are held out, the rest train.

    Input order is kept. A vehicle without a town, or a held-out town that no vehicle drives, is an error:
    either would silently leave the held-out evaluation empty or let a held-out town into training."""
    ids = list(vehicle_ids)
    hold = list(heldout_towns)
    missing = [v for v in ids if v not in towns]
    if missing:
        raise ValueError(f"no town given for vehicle(s) {missing}")
    driven = {towns[v] for v in ids}
    absent = [t for t in hold if t not in driven]
    if absent:
        raise ValueError(f"held-out town(s) {absent} are driven by no vehicle (towns: {sorted(driven)})")
    heldout = [v for v in ids if towns[v] in hold]
    train = [v for v in ids if towns[v] not in hold]
    if not train:
        raise ValueError(f"every vehicle drives a held-out town {hold}: nothing is left to train on")
    return train, heldout


@torch.no_grad()
def evaluate_encoder(state_dict: Mapping[str, torch.Tensor], data_root: str, vehicles: list[str], encoder: str,
                     batch_size: int = 8, max_batches: int | None = None, device: str | torch.device | None = None
                     ) -> dict[str, Any]:
    """Open-loop scores of an encoder state on `vehicles`' frames (in shard order, no augmentation).

    Returns `loss` (the encoder's weighted multi-task training loss), `tl_acc` (traffic-light state accuracy,
    0..1), `wp_l1` (mean absolute waypoint error, metres), `frames`, plus `wp_ade`, `wp_fde` (metres) and
    `bev_iou` from the same pass. `max_batches` caps the cost per round (the first batches, so every
    round sees the same frames). The encoder runs on `device` (None: the CPU)."""
    from flad_sim.dataset import FleetDataset, iter_batches
    from flad_vehicle.encoder.train import evaluate, needed_fields

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    ds = FleetDataset.open(data_root)
    unknown = sorted(set(vehicles) - set(ds.shards))
    if unknown:
        raise ValueError(f"vehicle(s) {unknown} have no shard in {data_root}")
    shards = ds.select(vehicles=vehicles)
    if not shards or not sum(len(s) for s in shards):
        raise ValueError(f"no frames to evaluate on: vehicles {vehicles} in {data_root}")
    model = build_encoder(state_dict, data_root, encoder, device)
    batches = iter_batches(shards, batch_size, shuffle=False, fields=needed_fields(model))
    if max_batches is not None:
        batches = itertools.islice(batches, max_batches)
    m = evaluate(model, batches)
    return {"loss": float(m.get("loss", 0.0)), "tl_acc": float(m["tl_accuracy"]), "wp_l1": float(m["wp_l1"]),
            "frames": int(m["samples"]), "wp_ade": float(m["wp_ade"]), "wp_fde": float(m["wp_fde"]),
            "bev_iou": float(m["bev_iou"])}


# ================================================================================================ driver


@dataclass
class DriverConfig:
    """The driver stage: CELLAdapt training sizes and the closed-loop evaluation on held-out towns.

    The defaults are the `quick` sizes (about a minute of training and a few short routes on 2 CPU cores):
    enough to run the chain end to end, not to drive well. The full run scales the steps and routes up.
    """

    enabled: bool = True
    general: str = "tiny"              # the cloud's general LLM: tiny | smollm2 | a local transformers checkpoint
    general_steps: int = 40            # general LLM on the fleet's driving features (cloud)
    distill_steps: int = 40            # general LLM -> AD-LLM distillation (cloud, once)
    lora_steps: int = 30               # LoRA fine-tuning of the AD-LLM at each edge, on its own vehicles
    adm_steps: int = 60                # AD-LLM -> ADM distillation at each edge
    batch_size: int = 16
    lr: float = 1e-3
    lora_lr: float = 2e-3
    lora_r: int = 8
    alpha: float = 0.5                 # distillation: weight of L1 to the teacher (1 - alpha: to ground truth)
    eval_towns: list[str] = field(default_factory=lambda: ["Town06"])   # held out: no edge vehicle drives them
    eval_routes: int = 1               # seeded routes per held-out town
    route_length_m: float = 80.0       # routes are drawn between this and 1.25x it (as `flad edge closed-loop`)
    max_route_s: float = 60.0          # simulated seconds per route (0: until the scorer ends it)
    plan_every: int = 10               # world ticks (20 Hz) between plans: 2 Hz, as the nodes run
    closed_loop: Literal["inprocess", "nodes"] = "inprocess"   # nodes: the deployment's processes (default rig)
    eval_edges: list[str] = field(default_factory=list)   # edges whose ADM drives (empty: every edge)
    baselines: list[str] = field(default_factory=lambda: ["constant"])   # of BASELINES, on the same routes
    device: str = "auto"               # features, training and closed loop: auto | cpu | cuda[:N] (flad_core.device)
    precision: str = "fp32"            # CELLAdapt training: fp32 | bf16 | fp16 autocast

    def validate(self) -> None:
        """Raises ConfigError naming the first bad field (`from_dict` calls it and prefixes the section;
        `train_driver` and `evaluate_driver` call it too, so a config built in code is checked before use)."""
        for name in ("general_steps", "distill_steps", "lora_steps", "adm_steps", "batch_size", "lora_r",
                     "eval_routes", "plan_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(name, f"must be an integer >= 1, got {v!r}")
        for name in ("lr", "lora_lr", "route_length_m"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(name, f"must be a finite number > 0, got {v!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise ConfigError("alpha", f"must be in [0, 1], got {self.alpha!r}")
        if self.closed_loop not in ("inprocess", "nodes"):
            raise ConfigError("closed_loop", f"must be 'inprocess' or 'nodes', got {self.closed_loop!r}")
        if not isinstance(self.max_route_s, (int, float)) or not math.isfinite(self.max_route_s) \
                or self.max_route_s < 0:
            raise ConfigError("max_route_s", f"must be >= 0 (0: no limit), got {self.max_route_s!r}")
        if not isinstance(self.general, str) or not self.general:
            raise ConfigError("general", "tiny, smollm2 or a local transformers checkpoint folder")
        for name, check in (("device", check_device_spec), ("precision", check_precision)):
            try:
                check(getattr(self, name))
            except DeviceError as exc:
                raise ConfigError(name, str(exc)) from exc
        self._validate_lists()

    def _validate_lists(self) -> None:
        from flad_sim.towns import TOWNS

        if not isinstance(self.eval_towns, list) or not self.eval_towns:
            raise ConfigError("eval_towns", f"need at least one held-out town, got {self.eval_towns!r}")
        unknown = [t for t in self.eval_towns if t not in TOWNS]
        if unknown:
            raise ConfigError("eval_towns", f"unknown town(s) {unknown}; towns: {', '.join(TOWNS)}")
        if len(set(self.eval_towns)) != len(self.eval_towns):
            raise ConfigError("eval_towns", f"towns repeat: {self.eval_towns}")
        if not isinstance(self.eval_edges, list) or not all(isinstance(e, str) and e for e in self.eval_edges):
            raise ConfigError("eval_edges", f"edge ids (empty: every edge), got {self.eval_edges!r}")
        bad = [b for b in (self.baselines if isinstance(self.baselines, list) else [self.baselines])
               if b not in BASELINES]
        if bad or not isinstance(self.baselines, list):
            raise ConfigError("baselines", f"unknown baseline(s) {bad}; choose from {list(BASELINES)}")


def _fit_config(cfg: DriverConfig, steps: int, lr: float, seed: int) -> Any:
    from flad_edge.celladapt.train import FitConfig

    return FitConfig(steps=steps, batch_size=cfg.batch_size, lr=lr, alpha=cfg.alpha, seed=seed,
                     warmup_steps=min(10, max(1, steps // 5)), log_every=max(1, steps // 4), device=cfg.device,
                     precision=cfg.precision)


def _phase(name: str, model: Any, data: Any, fc: Any, teacher: Any = None) -> dict[str, Any]:
    """One CELLAdapt training phase (`celladapt.train.fit`), logged; its losses and wall time."""
    from flad_edge.celladapt.train import fit

    r = fit(model, data, fc, teacher=teacher)
    log.info("driver %s: %d steps in %.1f s, loss %.3f -> %.3f", name, r["steps"], r["wall_s"],
             r["first_loss"] or float("nan"), r["last_loss_mean10"])
    return r


def _freeze(model: Any) -> Any:
    model.eval()
    for p in model.parameters():
        p.requires_grad = False
    return model


def _rig_fields(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The collect settings that define the sensor rig (so the closed loop renders what the encoder saw)."""
    keys = ("front_size", "side_size", "lidar_channels", "lidar_azimuth_steps", "seed")
    cfg = manifest.get("config") or {}
    return {k: cfg[k] for k in keys if k in cfg}


def _open_loop(models: Mapping[str, Any], feats: Any, constant_wp: torch.Tensor) -> dict[str, Any]:
    """Held-out-town waypoint metrics (`celladapt.train.evaluate`) of each model, the encoder's own head and
    the constant trajectory: the cheap open-loop companion to the closed-loop figures."""
    from flad_edge.celladapt.train import evaluate, waypoint_metrics

    out: dict[str, Any] = {name: evaluate(m, feats) for name, m in models.items()}
    if feats.encoder_waypoints is not None:
        out["encoder_head"] = waypoint_metrics(feats.encoder_waypoints, feats.waypoints)
    out["constant"] = waypoint_metrics(constant_wp.expand_as(feats.waypoints), feats.waypoints)
    for rec in out.values():
        rec.pop("eoi", None)
    return out


def _edge_driver(eid: str, ad_llm: Any, data: Any, cfg: DriverConfig, out: Path, seed: int) -> dict[str, Any]:
    """One edge: LoRA on its own vehicles' features, merge, distil into its ADM; saved under `out`."""
    from flad_edge.celladapt.model import ADLLM, student_config
    from flad_edge.celladapt.train import LoraSettings, apply_lora, evaluate, merge_lora, trainable_fraction

    t0 = time.perf_counter()
    teacher = copy.deepcopy(ad_llm)          # on the AD-LLM's device
    for p in teacher.parameters():
        p.requires_grad = True
    before = evaluate(teacher, data)["wp_l1"]
    apply_lora(teacher, LoraSettings(r=cfg.lora_r, alpha=2 * cfg.lora_r))
    frac = trainable_fraction(teacher)
    phases = {"lora": _phase(f"{eid} LoRA", teacher, data, _fit_config(cfg, cfg.lora_steps, cfg.lora_lr, seed))}
    after = evaluate(teacher, data)["wp_l1"]
    teacher.llm.save_pretrained(out / "lora")     # the adapter only: its base is the cloud AD-LLM, saved once
    merge_lora(teacher)
    _freeze(teacher)
    adm = ADLLM.build(student_config(), device=teacher.device)
    phases["adm_distill"] = _phase(f"{eid} ADM", adm, data, _fit_config(cfg, cfg.adm_steps, cfg.lr, seed), teacher)
    _freeze(adm)
    adm.save_pretrained(out / "adm")
    return {"samples": len(data), "vehicles": sorted(set(data.vehicles)), "towns": sorted(set(data.towns)),
            "lora": str(out / "lora"), "adm": str(out / "adm"),
            # waypoint L1 on the edge's own (training) frames: did LoRA and the distillation fit them at all?
            "lora_trainable_fraction": round(frac, 5), "train_wp_l1_before_lora": before,
            "train_wp_l1_after_lora": after, "train_wp_l1_adm": evaluate(adm, data)["wp_l1"],
            "phases": phases, "wall_s": round(time.perf_counter() - t0, 2), "_adm": adm}


def load_edge_ad_llm(trained: Mapping[str, Any], edge_id: str, device: str | torch.device = "cpu") -> Any:
    """An edge's AD-LLM as it was before merging: the cloud AD-LLM with that edge's LoRA adapter (frozen), on
    `device`."""
    from peft import PeftModel

    from flad_edge.celladapt.model import ADLLM

    model = ADLLM.from_pretrained(trained["cloud"]["ad_llm"])
    model.llm = PeftModel.from_pretrained(model.llm, trained["edges"][edge_id]["lora"], is_trainable=False)
    return model.eval().place(device)


def _cloud_driver(cloud: Any, cfg: DriverConfig, out: Path, seed: int, device: torch.device
                  ) -> tuple[Any, dict[str, Any]]:
    """The cloud, once: the general LLM trained on the fleet's features, distilled into the AD-LLM (saved); both
    built and trained on `device`."""
    from flad_edge.celladapt.model import ADLLM, teacher_config
    from flad_edge.celladapt.pipeline import PipelineConfig, _general

    general = _general(PipelineConfig(general=cfg.general), device)
    phases = {"general_on_driving_data": _phase("general", general, cloud,
                                                _fit_config(cfg, cfg.general_steps, cfg.lr, seed))}
    ad_llm = ADLLM.build(teacher_config(), device=device)
    phases["cloud_distill_general_to_ad_llm"] = _phase(
        "cloud distillation", ad_llm, cloud, _fit_config(cfg, cfg.distill_steps, cfg.lr, seed), teacher=general)
    _freeze(ad_llm)
    ad_llm.save_pretrained(out)
    return ad_llm, phases


def train_driver(encoder_state: Mapping[str, torch.Tensor], data_root: str, edge_vehicles: Mapping[str, list[str]],
                 cfg: DriverConfig, out_dir: Path, seed: int, *, encoder: str = "tiny",
                 heldout_root: str | None = None) -> dict[str, Any]:
    """CELLAdapt on the federated encoder's features: cloud distillation once, then LoRA + ADM per edge.

    `edge_vehicles` maps each edge id to the vehicles whose features it may use (its own); the cloud phases
    use the union of them. Edges without any frames are skipped (logged, listed under `skipped_edges`).
    `encoder` names the encoder config `encoder_state` belongs to. Returns plain JSON (also written to
    `out_dir/driver.json`): artifact paths, per-stage losses and wall times, the constant baseline's
    trajectory, and open-loop waypoint metrics on frames of `cfg.eval_towns` (from `heldout_root`, a fleet
    dataset of held-out vehicles, when given; else from `data_root`'s vehicles outside every edge), None
    when there are none. Deterministic in `seed` (at a fixed torch thread count); the caller's torch RNG
    stream is left alone."""
    from flad_sim.dataset import FleetDataset

    cfg.validate()
    if not cfg.enabled:
        return {"enabled": False}
    ds = FleetDataset.open(data_root)
    train_ids = sorted({v for vs in edge_vehicles.values() for v in vs})
    unknown = [v for v in train_ids if v not in ds.shards]
    if unknown:
        raise ValueError(f"edge vehicle(s) {unknown} have no shard in {data_root}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        result = _train_driver(encoder_state, ds, edge_vehicles, train_ids, cfg, out_dir, seed, encoder,
                               heldout_root)
    atomic_write_text(out_dir / "driver.json", json.dumps(result, indent=2, default=float))
    return result


def _train_driver(encoder_state: Mapping[str, torch.Tensor], ds: Any, edge_vehicles: Mapping[str, list[str]],
                  train_ids: list[str], cfg: DriverConfig, out_dir: Path, seed: int, encoder: str,
                  heldout_root: str | None) -> dict[str, Any]:
    from flad_edge.celladapt.data import extract_features
    from flad_vehicle.encoder.checkpoint import save_checkpoint

    t_start = time.perf_counter()
    dev = resolve_device(cfg.device)
    device = log_device("driver (CELLAdapt)", dev)
    data_root = str(ds.root)
    model = build_encoder(encoder_state, data_root, encoder, dev)
    ckpt = save_checkpoint(out_dir / "encoder.safetensors", model, extra={"stage": "driver", "data": data_root})
    wall: dict[str, float] = {}
    t0 = time.perf_counter()
    feats = extract_features(model, data_root, batch_size=cfg.batch_size)
    wall["features"] = round(time.perf_counter() - t0, 2)
    cloud = feats.select(vehicles=train_ids)
    if not len(cloud):
        raise ValueError(f"the edges' vehicles {train_ids} have no frames in {data_root}")
    seen = sorted(set(cloud.towns) & set(cfg.eval_towns))
    if seen:
        log.warning("driver: held-out town(s) %s are in the edges' training data; closed-loop scores there are "
                    "not held out", seen)
    constant_wp = cloud.waypoints.mean(0)

    t0 = time.perf_counter()
    ad_llm, phases = _cloud_driver(cloud, cfg, out_dir / "cloud" / "ad_llm", seed, dev)
    wall["cloud"] = round(time.perf_counter() - t0, 2)

    edges: dict[str, Any] = {}
    skipped: list[str] = []
    t0 = time.perf_counter()
    for i, eid in enumerate(sorted(edge_vehicles)):
        data = feats.select(vehicles=list(edge_vehicles[eid]))
        if not len(data):
            log.warning("driver: edge %s has no frames (vehicles %s); no ADM for it", eid, edge_vehicles[eid])
            skipped.append(eid)
            continue
        edges[eid] = _edge_driver(eid, ad_llm, data, cfg, out_dir / "edges" / eid, seed + 1 + i)
    wall["edges"] = round(time.perf_counter() - t0, 2)

    if heldout_root is not None:
        held = extract_features(model, heldout_root, batch_size=cfg.batch_size).select(towns=cfg.eval_towns)
    else:
        held = feats.select(towns=cfg.eval_towns, vehicles=[v for v in ds.shards if v not in set(train_ids)])
    open_loop: dict[str, Any] | None = None
    if len(held):
        models = {"cloud_ad_llm": ad_llm, **{f"adm[{e}]": r["_adm"] for e, r in edges.items()}}
        open_loop = _open_loop(models, held, constant_wp)
    for r in edges.values():
        r.pop("_adm")
    wall["total"] = round(time.perf_counter() - t_start, 2)
    return {
        "enabled": True, "seed": seed, "data_root": data_root, "encoder": encoder,
        "encoder_checkpoint": str(ckpt), "rig": _rig_fields(ds.manifest), "config": to_dict(cfg),
        "samples": {"cloud": len(cloud), "held_out": len(held)}, "eval_towns_seen_in_training": seen,
        "heldout_root": heldout_root,
        "cloud": {"ad_llm": str(out_dir / "cloud" / "ad_llm"), "phases": phases}, "edges": edges,
        "skipped_edges": skipped, "constant_waypoints": constant_wp.tolist(),
        "open_loop_held_out": open_loop, "wall_s": wall, "device": device, "precision": cfg.precision,
    }


# ================================================================================================ closed loop


def _routes(cfg: DriverConfig, seed: int) -> list[tuple[str, int, Any]]:
    """(town, world seed, route) per evaluation route. A route is the one the node world bridge draws for its
    world seed (`flad_sim.route.seeded_routes`, `route_length_m` .. 1.25x it), so both closed-loop modes and
    every driver see the same routes in the same seeded traffic. World seeds are tried in order from
    `seed * 1000`; the rejection sampler finds no short route for some seeds, and those are skipped."""
    from flad_sim.route import NoRouteError, seeded_routes
    from flad_sim.towns import build_town

    lo, hi = cfg.route_length_m, 1.25 * cfg.route_length_m
    out = []
    for town in cfg.eval_towns:
        found = 0
        for k in range(20 * cfg.eval_routes):
            s = seed * 1000 + k
            try:
                route = seeded_routes(build_town(town), s, 1, lo, hi)[0]
            except NoRouteError:
                continue
            out.append((town, s, route))
            found += 1
            if found == cfg.eval_routes:
                break
        else:
            raise ConfigError("route_length_m", f"only {found} of {cfg.eval_routes} routes of {lo:g}-{hi:g} m "
                              f"found in {town} (world seeds {seed * 1000}..{seed * 1000 + k}); try another length")
    return out


def _row(name: str, rec: Any, world_seed: int, wall_s: float, agent: Any = None) -> dict[str, Any]:
    """The JSON row of one (driver, route) run."""
    row = {"driver": name, "town": rec.town, "route": rec.route_id, "world_seed": world_seed,
           "route_length_m": round(rec.route_length_m, 1), "rc": round(rec.rc, 2), "is": round(rec.is_, 4),
           "ds": round(rec.ds, 2), "status": rec.status, "duration_s": round(rec.duration_s, 2),
           "infractions": [i.kind for i in rec.infractions], "wall_s": round(wall_s, 2)}
    if getattr(agent, "plan_times", None):
        row["plan_ms_mean"] = round(1000 * float(np.mean(agent.plan_times)), 1)
        row["creeps"] = int(agent.creeps)
    return row


def _run_inprocess(name: str, make_agent: Callable[[Any], Any], privileged: bool, town: str, world_seed: int,
                   route: Any, rig: Any, max_ticks: int | None) -> tuple[Any, dict[str, Any]]:
    """One route in a fresh seeded world (as the leaderboard runs them) by `flad_sim.agent.RouteRunner`."""
    from flad_sim.agent import RouteRunner
    from flad_sim.metrics import STATUS_RUNNING
    from flad_sim.world import World
    from flad_vehicle.control.agent import lazy_sensor_observer

    w = World(town, seed=world_seed)
    agent = make_agent(w)
    t0 = time.perf_counter()
    rec = RouteRunner(w, route, agent, observe=None if privileged else lazy_sensor_observer(rig),
                      privileged=privileged, max_ticks=max_ticks).run()
    if rec.status == STATUS_RUNNING:      # cut by max_route_s: RC is the progress so far (as the nodes' duration_s)
        rec.status = "stopped"
    return rec, _row(name, rec, world_seed, time.perf_counter() - t0, agent)


def _run_nodes(name: str, source: str, model_dir: str, town: str, world_seed: int, cfg: DriverConfig,
               encoder_checkpoint: str, runs_dir: Path) -> tuple[Any, dict[str, Any]]:
    """One route through the deployment's node processes (`flad_edge.eval.closed_loop.run_closed_loop`, ZeroMQ):
    world bridge -> encoder_node -> waypoint_node (the ADM behind the waypoint service) -> controller_node."""
    from flad_edge.eval.closed_loop import ClosedLoopRunConfig, run_closed_loop
    from flad_sim.metrics import Infraction, RouteRecord

    rc = ClosedLoopRunConfig(source=source, town=town, seed=world_seed, route_length_m=cfg.route_length_m,
                             duration_s=cfg.max_route_s, sensors_every=cfg.plan_every,
                             encoder_checkpoint=encoder_checkpoint if source != "expert" else "", model_dir=model_dir,
                             device=cfg.device)
    rc.validate()
    out = run_closed_loop(rc, runs_dir)
    if "error" in out:       # the infrastructure failed: that is no driving score
        raise RuntimeError(f"closed-loop run of {name} on {town} (seed {world_seed}): {out['error']}")
    ego = out["egos"][0]
    rec = RouteRecord(ego["route_id"], ego["town"], ego["route_length_m"], ego["rc"], ego["is"], ego["ds"],
                      ego["status"], ego["duration_s"], ego["outside_lanes_fraction"],
                      [Infraction(**i) for i in ego["infractions"]])
    row = _row(name, rec, world_seed, float(out["wall_s"]))
    row.update(missed_ticks=ego["missed_ticks"], run=out["run"])
    return rec, row


def _check_node_rig(encoder: Any) -> None:
    """The node world bridge renders the default rig: an encoder trained on another cannot be fed by it."""
    from flad_sim.sensors import RigConfig

    rig = RigConfig()
    mine = {k: tuple(v) for k, v in encoder.cfg.cameras.items()}
    if mine != {k: tuple(v) for k, v in rig.camera_sizes.items()} or encoder.cfg.lidar_rays != rig.lidar.rays:
        raise ConfigError("closed_loop", f"'nodes' renders the default sensor rig ({rig.camera_sizes}, "
                          f"{rig.lidar.rays} LiDAR rays) but the driver's encoder takes {mine}, "
                          f"{encoder.cfg.lidar_rays} rays; use 'inprocess'")


def _drivers(trained: Mapping[str, Any], cfg: DriverConfig, encoder: Any) -> list[dict[str, Any]]:
    """What drives: each evaluated edge's ADM (in-process: on the encoder's device), then the baselines; for
    either mode."""
    from flad_edge.celladapt.model import ADLLM
    from flad_sim.expert import ExpertAgent
    from flad_vehicle.control.agent import ConstantWaypointAgent, WaypointAgent

    edges = list(cfg.eval_edges) or sorted(trained["edges"])
    unknown = [e for e in edges if e not in trained["edges"]]
    if unknown:
        raise ConfigError("eval_edges", f"edge(s) {unknown} have no trained ADM (trained: {sorted(trained['edges'])})")
    out: list[dict[str, Any]] = []
    for eid in edges:
        path = trained["edges"][eid]["adm"]
        make = None
        if cfg.closed_loop == "inprocess":
            adm = ADLLM.from_pretrained(path, device=next(encoder.parameters()).device)

            def source(f: torch.Tensor, instruction: str, notice: str, target_point: Any = None, m: Any = adm
                       ) -> np.ndarray:
                tp = None if target_point is None else torch.as_tensor(target_point, dtype=torch.float32)[None]
                return m.predict(f[None], [instruction], [notice], tp)[0].numpy()    # CPU float32

            def make(w: Any, s: Any = source) -> Any:
                return WaypointAgent(encoder, s, plan_every=cfg.plan_every)

        out.append({"name": f"adm[{eid}]", "edge": eid, "source": "edge", "model_dir": path, "make": make,
                    "privileged": False})
    const = np.asarray(trained["constant_waypoints"], np.float64)
    makers: dict[str, tuple[Callable[[Any], Any], bool]] = {
        "constant": (lambda w: ConstantWaypointAgent(const), False),
        "encoder_head": (lambda w: WaypointAgent(encoder, None, plan_every=cfg.plan_every), False),
        "expert": (lambda w: ExpertAgent(w), True),
    }
    for b in cfg.baselines:
        make, privileged = makers[b]
        # the node chain has no constant source: the constant baseline always runs in-process (same world, route)
        nodes = cfg.closed_loop == "nodes" and b != "constant"
        out.append({"name": b, "edge": None, "source": b if nodes else None, "model_dir": "",
                    "make": None if nodes else make, "privileged": privileged})
    return out


def _scores(records: list[Any]) -> dict[str, Any]:
    """Leaderboard means (`flad_sim.metrics.summarize`) under the report's keys."""
    from flad_sim.metrics import summarize

    s = summarize(records)
    return {"RC": round(float(s["rc"]), 2), "IS": round(float(s["is"]), 4), "DS": round(float(s["ds"]), 2),
            "routes": int(s["n_routes"]), "statuses": s.get("statuses", {}), "infractions": s.get("infractions", {})}


def evaluate_driver(trained: Mapping[str, Any], cfg: DriverConfig, out_dir: Path, seed: int) -> dict[str, Any]:
    """Closed-loop RC / IS / DS of the trained driver on `cfg.eval_routes` seeded routes per held-out town.

    Every evaluated edge's ADM drives every route (sensors -> the saved encoder -> ADM -> PID, replanning
    every `plan_every` ticks; `closed_loop` says in-process or through the node processes); `RC`, `IS`,
    `DS` are the means over all of those (ADM, route) runs, `per_edge` splits them, `per_route` lists each
    run. The baselines drive the same routes in the same seeded worlds (`baselines`; `constant_baseline`
    repeats the blind constant trajectory's figures when it ran). Written to `out_dir/closed_loop.json`."""
    from flad_sim.dataset import CollectConfig
    from flad_sim.physics import DT
    from flad_sim.sensors import SensorRig
    from flad_vehicle.encoder.checkpoint import load_checkpoint

    cfg.validate()
    if not cfg.enabled or not trained.get("enabled", False):
        return {"enabled": False}
    t_start = time.perf_counter()
    dev = resolve_device(cfg.device)
    device = log_device("driver closed loop", dev)
    encoder = load_checkpoint(trained["encoder_checkpoint"], device=dev)[0].eval()
    if cfg.closed_loop == "nodes":
        _check_node_rig(encoder)
    drivers = _drivers(trained, cfg, encoder)
    routes = _routes(cfg, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rig = SensorRig(CollectConfig(**trained.get("rig", {})).rig_config())
    max_ticks = round(cfg.max_route_s / DT) if cfg.max_route_s > 0 else None
    records: dict[str, list[Any]] = {}
    rows: dict[str, list[dict[str, Any]]] = {}
    for d in drivers:
        for town, world_seed, route in routes:
            if d["make"] is not None:
                rec, row = _run_inprocess(d["name"], d["make"], d["privileged"], town, world_seed, route, rig,
                                          max_ticks)
            else:
                rec, row = _run_nodes(d["name"], d["source"], d["model_dir"], town, world_seed, cfg,
                                      trained["encoder_checkpoint"], out_dir / "runs")
            records.setdefault(d["name"], []).append(rec)
            rows.setdefault(d["name"], []).append(row)
            log.info("driver %s on %s: %s RC %.1f IS %.3f DS %.1f (%.1f s wall)", d["name"], row["route"],
                     row["status"], row["rc"], row["is"], row["ds"], row["wall_s"])
    adms = [d["name"] for d in drivers if d["edge"] is not None]
    headline = _scores([r for n in adms for r in records[n]])
    result: dict[str, Any] = {
        "enabled": True, "RC": headline["RC"], "IS": headline["IS"], "DS": headline["DS"], "routes": len(routes),
        "runs": headline["routes"], "statuses": headline["statuses"], "infractions": headline["infractions"],
        "per_edge": {d["edge"]: _scores(records[d["name"]]) for d in drivers if d["edge"] is not None},
        "per_route": [row for n in adms for row in rows[n]],
        "baselines": {b: {**_scores(records[b]), "per_route": rows[b]} for b in cfg.baselines},
        "closed_loop": cfg.closed_loop, "eval_towns": list(cfg.eval_towns), "route_length_m": cfg.route_length_m,
        "max_route_s": cfg.max_route_s, "plan_hz": round(1.0 / (DT * cfg.plan_every), 3), "seed": seed,
        "eval_towns_seen_in_training": trained.get("eval_towns_seen_in_training", []), "device": device,
    }
    if "constant" in result["baselines"]:
        c = result["baselines"]["constant"]
        result["constant_baseline"] = {"RC": c["RC"], "IS": c["IS"], "DS": c["DS"]}
    result["wall_s"] = round(time.perf_counter() - t_start, 2)
    atomic_write_text(out_dir / "closed_loop.json", json.dumps(result, indent=2, default=float))
    return result
