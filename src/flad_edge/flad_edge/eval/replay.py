"""`flad eval replay BAG`: open-loop evaluation of an encoder (+ ADM) on the frames of a recorded bag.

Each sensor frame of the bag (the cameras and LiDAR of one timestamp, as `flad bag record` or a carla-ros-bridge
recording holds them) is decoded back into the encoder's input layout (uint8 HWC RGB per camera, LiDAR
[rays, 4] with no-return rays padded as intensity -1), with speed from the speedometer and the target point
from the navigation topic. The encoder runs with its own waypoint head; with `--adm DIR` a CELLAdapt
AD-LLM/ADM (`save_pretrained` folder) predicts waypoints from the encoder features, the instruction and the
notice. Predictions are scored against the recorded expert waypoints (ADE/FDE, metres) and the recorded
traffic-light state (accuracy of the encoder's traffic-light head); decode, encoder and ADM latencies are
reported as p50/p99. Results: JSON (stdout with --json, always runs/<id>/replay.json) and a short markdown
report with plots in the run folder. The encoder and the ADM run on `--device` (flad_core.device; `auto`: CUDA
when present), in fp32 so the scores compare across devices; the JSON says which device ran (`device`).

It lives in flad_edge because it needs both the vehicle's encoder and the edge's ADM.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2
TL_NAMES = ("none", "red", "yellow", "green")


class ReplayError(Exception):
    """Input the user must fix (bag, checkpoint, model folder); the text names the file and the problem."""


@dataclass
class ReplayConfig:
    bag: str = ""
    checkpoint: str = ""
    adm: str = ""
    role: str = "hero"
    max_frames: int = 0          # 0: every frame
    threads: int = 1
    plot_frames: int = 6
    device: str = "auto"         # where the encoder and the ADM run: auto | cpu | cuda[:N] (flad_core.device)

    def validate(self) -> None:
        from flad_core.config import ConfigError
        from flad_core.device import DeviceError, check_device_spec

        try:
            check_device_spec(self.device)
        except DeviceError as exc:
            raise ConfigError("device", str(exc)) from exc
        if not self.bag:
            raise ConfigError("bag", "a bag path is required")
        if not self.checkpoint:
            raise ConfigError("checkpoint", "an encoder checkpoint is required")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.role):
            raise ConfigError("role", f"{self.role!r} is not a valid ROS name")
        if self.max_frames < 0 or self.threads < 1 or self.plot_frames < 0:
            raise ConfigError("max_frames", "max_frames >= 0, threads >= 1 and plot_frames >= 0 are required")


# ------------------------------------------------------------------------------------------------ metrics


def ade_fde(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame average and final displacement errors (metres) of waypoints [N, K, 2] (or one [K, 2])."""
    p = np.asarray(pred, np.float64)
    g = np.asarray(gt, np.float64)
    if p.shape != g.shape or p.shape[-1] != 2 or p.ndim not in (2, 3) or p.shape[-2] < 1:
        raise ValueError(f"waypoints must both be [N, K, 2] or [K, 2] with K >= 1; got {p.shape} and {g.shape}")
    if p.ndim == 2:
        p, g = p[None], g[None]
    d = np.linalg.norm(p - g, axis=-1)
    return d.mean(axis=-1), d[:, -1]


def latency_summary(seconds: list[float]) -> dict[str, float] | None:
    """p50/p99/mean in milliseconds (None when nothing was timed)."""
    if not seconds:
        return None
    ms = np.asarray(seconds, np.float64) * 1e3
    return {"p50": round(float(np.percentile(ms, 50)), 3), "p99": round(float(np.percentile(ms, 99)), 3),
            "mean": round(float(ms.mean()), 3), "n": len(ms)}


def _wp_summary(ade: list[float], fde: list[float]) -> dict[str, Any]:
    if not ade:
        return {"ade_m": None, "fde_m": None, "n": 0}
    return {"ade_m": round(float(np.mean(ade)), 4), "fde_m": round(float(np.mean(fde)), 4), "n": len(ade)}


# ------------------------------------------------------------------------------------------------ frames


@dataclass
class Frame:
    """One sensor frame of the bag in the encoder's input layout, with the labels recorded beside it."""

    t_ns: int
    sensors: dict[str, np.ndarray]
    speed: float
    target_point: np.ndarray
    instruction: str = ""
    notice: str = ""
    tl_state: int | None = None
    expert_wp: np.ndarray | None = None
    recorded_wp: np.ndarray | None = None
    decode_s: float = 0.0


def expert_topics(role: str) -> tuple[str, str]:
    """Where expert waypoints may be: `flad bag record`'s label (the ego's actual next 2.5 s), else the closed-loop
    world bridge's privileged expert plan (`flad_sim.closed_loop`, e.g. in a `--from-bus` recording)."""
    from flad_sim import bridge
    from flad_sim.bag import flad_topic

    return flad_topic(role, "expert_waypoints"), bridge.topic(role, "expert_waypoints")


def replay_topics(role: str, cameras: list[str], expert_topic: str | None = None) -> dict[str, str]:
    from flad_sim import bridge
    from flad_sim.bag import flad_topic

    t = {bridge.topic(role, c): c for c in cameras}
    t.update({bridge.topic(role, "lidar"): "lidar", bridge.topic(role, "speedometer"): "speed",
              bridge.topic(role, "odometry"): "odom", bridge.topic(role, "navigation"): "nav",
              flad_topic(role, "traffic_light"): "tl", flad_topic(role, "waypoints"): "recorded"})
    if expert_topic:
        t[expert_topic] = "expert"
    return t


def check_bag(bag: Path, role: str, cameras: list[str]) -> dict[str, Any]:
    """bag_info, after checking the topics replay needs are there with the right types (ReplayError if not)."""
    from flad_sim import bridge
    from flad_sim.bag import BagError, bag_info

    try:
        info = bag_info(bag)
    except BagError as exc:
        raise ReplayError(str(exc)) from exc
    need = {bridge.topic(role, c): "sensor_msgs/msg/Image" for c in cameras}
    need[bridge.topic(role, "lidar")] = "sensor_msgs/msg/PointCloud2"
    missing = [t for t in need if t not in info.topics]
    if missing:
        raise ReplayError(f"bag {bag}: missing topic(s) {missing} that the encoder needs (role {role!r}); "
                          f"the bag has {sorted(info.topics)}")
    wrong = [f"{t} is {info.topics[t].msgtype}, expected {ty}" for t, ty in need.items()
             if info.topics[t].msgtype != ty]
    if wrong:
        raise ReplayError(f"bag {bag}: " + "; ".join(wrong))
    return info.to_dict()


#: stamps assembled at once (20 = 1 s of ticks): in a bus recording a frame's messages interleave with later ones
FRAME_WINDOW = 20


def iter_frames(bag: Path, role: str, cameras: dict[str, tuple[int, int]], lidar_rays: int,
                expert_topic: str | None = None) -> Iterator[Frame]:
    """Frames of the bag in stamp order: every header stamp that carries all `cameras` and the LiDAR.

    Messages are matched by their header stamp (the frame's simulated time), not by bag time, so a bag recorded
    from a live bus (receive times) replays like one recorded from the world. Speed comes from the frame's
    odometry (else the latest speedometer reading). `Frame.decode_s` is the time spent decoding the frame's
    camera and LiDAR messages (CDR + conversion to arrays).
    """
    from flad_sim.bag import read_bag
    from flad_sim.bridge import stamp_key

    topics = replay_topics(role, list(cameras), expert_topic)
    open_frames: dict[int, Frame] = {}
    done_upto = -1
    late = 0
    speedometer = 0.0
    for m in read_bag(bag, topics=list(topics), raw=True):
        kind = topics[m.topic]
        t0 = time.perf_counter()
        msg = _decode(bag, m)
        if kind == "speed":
            speedometer = float(msg.data)
            continue
        key = stamp_key(msg.header)
        if key <= done_upto:
            late += 1
            continue
        fr = open_frames.get(key)
        if fr is None:
            fr = open_frames[key] = Frame(key, {}, speedometer, np.array([10.0, 0.0], np.float32))
        if kind in cameras or kind == "lidar":
            _add_sensor(fr, kind, msg, bag, m.topic, cameras, lidar_rays)
            fr.decode_s += time.perf_counter() - t0
        else:
            _add_label(fr, kind, msg)
        while len(open_frames) > FRAME_WINDOW:
            oldest = min(open_frames)
            done_upto = oldest
            done = open_frames.pop(oldest)
            if _complete(done, cameras):
                yield done
    for key in sorted(open_frames):
        if _complete(open_frames[key], cameras):
            yield open_frames[key]
    if late:
        log.warning("bag %s: %d message(s) arrived after their frame was evaluated (left out)", bag, late)


def _decode(bag: Path, m: Any) -> Any:
    """One raw bag message as a rosbags object (ReplayError naming the topic and time if it does not decode)."""
    from flad_core import codec

    try:
        return codec.decode(m.msg, m.msgtype)
    except codec.CodecError as exc:
        raise ReplayError(f"bag {bag}: {m.topic} at t={m.time_ns} ns: {exc}") from exc


def _add_sensor(fr: Frame, kind: str, msg: Any, bag: Path, topic: str, cameras: dict[str, tuple[int, int]],
                lidar_rays: int) -> None:
    """A camera image (of the size the encoder expects) or the LiDAR sweep into `fr.sensors`."""
    from flad_sim.bridge import image_from_msg, points_from_msg

    key = fr.t_ns
    try:
        if kind in cameras:
            img = image_from_msg(msg)
            h, w = cameras[kind]
            if img.shape[:2] != (h, w):
                raise ReplayError(f"bag {bag}: {topic} is {img.shape[0]}x{img.shape[1]} at t={key} ns, the "
                                  f"encoder expects {h}x{w}")
            fr.sensors[kind] = img
        elif kind == "lidar":
            fr.sensors["lidar"] = _lidar_layout(points_from_msg(msg), lidar_rays, key)
    except ValueError as exc:
        raise ReplayError(f"bag {bag}: {topic} at t={key} ns: {exc}") from exc


def _add_label(fr: Frame, kind: str, msg: Any) -> None:
    """What was recorded beside the sensors: odometry speed, navigation, traffic light, expert/recorded plans."""
    from flad_sim.bridge import waypoints_from_path

    if kind == "odom":
        fr.speed = float(msg.twist.twist.linear.x)
    elif kind == "nav":
        fr.target_point = np.array([msg.target_point.x, msg.target_point.y], np.float32)
        fr.instruction, fr.notice = str(msg.instruction), str(msg.notice)
    elif kind == "tl":
        fr.tl_state = int(msg.state)
    elif kind == "expert":
        fr.expert_wp = waypoints_from_path(msg)
    elif kind == "recorded":
        fr.recorded_wp = waypoints_from_path(msg)


def _complete(fr: Frame, cameras: dict[str, tuple[int, int]]) -> bool:
    return "lidar" in fr.sensors and all(c in fr.sensors for c in cameras)


def _lidar_layout(pts: np.ndarray, rays: int, key: int) -> np.ndarray:
    """carla-ros-bridge point clouds leave out rays without a return; the encoder takes [rays, 4] with those rays
    as zero rows of intensity -1 (as the rig and the dataset have them)."""
    lidar = np.zeros((rays, 4), np.float32)
    lidar[:, 3] = -1.0
    n = min(len(pts), rays)
    if len(pts) > rays:
        log.warning("t=%d ns: %d LiDAR points, the encoder takes %d; the rest are dropped", key, len(pts), rays)
    lidar[:n] = pts[:n]
    return lidar


# ------------------------------------------------------------------------------------------------ models


def load_encoder(path: str, device: Any = "cpu") -> Any:
    """The encoder checkpoint at `path` on `device`, in eval mode (ReplayError when it does not load)."""
    from flad_vehicle.encoder.checkpoint import CheckpointError, load_checkpoint

    try:
        model, _ = load_checkpoint(path, device=device)
    except CheckpointError as exc:
        raise ReplayError(str(exc)) from exc
    return model.eval()


def load_adm(path: str, encoder_cfg: Any, device: Any = "cpu") -> Any:
    """The CELLAdapt model saved at `path` on `device` (fp32), checked against the encoder's feature shape."""
    from flad_edge.celladapt.model import ADLLM, CONFIG_FILE

    d = Path(path)
    if not (d / CONFIG_FILE).is_file():
        raise ReplayError(f"ADM {d}: not a CELLAdapt save_pretrained folder (no {CONFIG_FILE})")
    try:
        model = ADLLM.from_pretrained(d, device=device).eval()
    except Exception as exc:     # transformers/peft/safetensors raise many types for a broken folder
        raise ReplayError(f"ADM {d}: cannot load: {type(exc).__name__}: {exc}") from exc
    a = model.cfg.adapter
    if (a.d_feature, a.n_feature_tokens) != (encoder_cfg.d_model, encoder_cfg.n_feature_tokens):
        raise ReplayError(f"ADM {d} takes features [{a.n_feature_tokens}, {a.d_feature}], the encoder makes "
                          f"[{encoder_cfg.n_feature_tokens}, {encoder_cfg.d_model}]")
    return model


# ------------------------------------------------------------------------------------------------ evaluation


def _device(spec: str) -> Any:
    """The torch device of `spec` on this host (ReplayError naming it when this host has no such device)."""
    from flad_core.device import DeviceError, resolve_device

    try:
        return resolve_device(spec)
    except DeviceError as exc:
        raise ReplayError(f"--device: {exc}") from exc


def evaluate(cfg: ReplayConfig, run_path: Path | None = None) -> dict[str, Any]:
    """Replays the bag through the models on `cfg.device`; returns the result dict (and writes plots/report into
    `run_path`)."""
    import torch

    from flad_core.device import log_device, synchronize, to_device
    from flad_sim.bag import BagError

    cfg.validate()
    bag = Path(cfg.bag)
    torch.set_num_threads(cfg.threads)
    dev = _device(cfg.device)
    device = log_device("replay", dev)
    encoder = load_encoder(cfg.checkpoint, dev)
    ecfg = encoder.cfg
    cameras = {c: tuple(ecfg.cameras[c]) for c in encoder.sensor_inputs if c != "lidar"}
    info = check_bag(bag, cfg.role, list(cameras))
    expert_topic = next((t for t in expert_topics(cfg.role) if t in info["topics"]), None)
    if expert_topic is None:
        log.warning("bag %s has no expert waypoints (%s): no ADE/FDE", bag, " or ".join(expert_topics(cfg.role)))
    adm = load_adm(cfg.adm, ecfg, dev) if cfg.adm else None
    times: list[float] = []
    head_wp, adm_wp, expert_wp, recorded_wp = [], [], [], []
    lat: dict[str, list[float]] = {"decode": [], "encoder": [], "adm": []}
    tl_pred, tl_true = [], []
    n = 0
    try:
        for fr in iter_frames(bag, cfg.role, cameras, ecfg.lidar_rays, expert_topic):
            if cfg.max_frames and n >= cfg.max_frames:
                break
            n += 1
            lat["decode"].append(fr.decode_s)
            batch = {k: torch.from_numpy(np.ascontiguousarray(v))[None] for k, v in fr.sensors.items()}
            batch["speed"] = torch.tensor([fr.speed], dtype=torch.float32)
            batch["target_point"] = torch.from_numpy(fr.target_point.reshape(1, 2))
            t0 = time.perf_counter()
            with torch.no_grad():
                out = encoder(to_device(batch, dev))
            synchronize(dev)         # the GPU's queued work belongs to the encoder's latency
            lat["encoder"].append(time.perf_counter() - t0)
            out = {k: out[k].float().cpu() for k in ("features", "pred.waypoints", "pred.tl")}
            head = out["pred.waypoints"][0].numpy().astype(np.float64)
            a_wp = None
            if adm is not None:
                t0 = time.perf_counter()
                a_wp = adm.predict(out["features"], [fr.instruction or "follow the lane"], [fr.notice],
                                   batch["target_point"])[0].numpy()
                lat["adm"].append(time.perf_counter() - t0)
            if fr.tl_state is not None:
                tl_true.append(fr.tl_state)
                tl_pred.append(int(out["pred.tl"][0].argmax()))
            times.append(fr.t_ns / 1e9)
            head_wp.append(head)
            adm_wp.append(a_wp)
            expert_wp.append(fr.expert_wp)
            recorded_wp.append(fr.recorded_wp)
    except BagError as exc:
        raise ReplayError(str(exc)) from exc
    if n == 0:
        raise ReplayError(f"bag {bag}: no complete sensor frame (all of {list(cameras)} and the LiDAR at one "
                          f"timestamp) for role {cfg.role!r}")

    labelled = [i for i, e in enumerate(expert_wp) if e is not None and e.shape == head_wp[i].shape]
    per_frame: dict[str, list[float | None]] = {"t_s": times, "encoder_head_ade": [None] * n, "adm_ade": [None] * n}
    scores: dict[str, Any] = {}
    for name, preds in (("encoder_head", head_wp), ("adm", adm_wp), ("recorded_plan", recorded_wp)):
        idx = [i for i in labelled if preds[i] is not None and np.shape(preds[i]) == expert_wp[i].shape]
        if name != "encoder_head" and not any(p is not None for p in preds):
            continue
        if idx:
            ade, fde = ade_fde(np.stack([preds[i] for i in idx]), np.stack([expert_wp[i] for i in idx]))
            if f"{name}_ade" in per_frame:
                for i, a in zip(idx, ade, strict=True):
                    per_frame[f"{name}_ade"][i] = float(a)
            scores[name] = _wp_summary(list(ade), list(fde))
        else:
            scores[name] = _wp_summary([], [])
    rec_idx = [i for i in range(n) if recorded_wp[i] is not None and recorded_wp[i].shape == head_wp[i].shape]
    result: dict[str, Any] = {
        "bag": str(bag), "role": cfg.role, "frames": n, "frames_with_expert": len(labelled),
        "expert_topic": expert_topic, "frames_with_tl": len(tl_true),
        "sim_time_s": [round(times[0], 3), round(times[-1], 3)],
        "encoder": {"checkpoint": cfg.checkpoint, "config": ecfg.name,
                    "cameras": {k: list(v) for k, v in cameras.items()}, "lidar_rays": ecfg.lidar_rays},
        "adm": cfg.adm or None,
        "device": device,
        "waypoints": scores,
        "traffic_light": _tl_summary(tl_pred, tl_true),
        "latency_ms": {k: latency_summary(v) for k, v in lat.items() if v},
        "recorded_result": _recorded_result(bag, cfg.role),
        "bag_info": {"message_count": info["message_count"], "duration_s": round(info["duration_s"], 3),
                     "topics": {t: v["count"] for t, v in info["topics"].items()}},
    }
    if rec_idx:
        diff = max(float(np.abs(head_wp[i] - recorded_wp[i]).max()) for i in rec_idx)
        result["replay_vs_recorded_plan_max_abs_m"] = round(diff, 6)
    if run_path is not None:
        result["report"] = str(write_report(run_path, result, times, head_wp, adm_wp, expert_wp, per_frame,
                                            cfg.plot_frames))
    return result


def _tl_summary(pred: list[int], true: list[int]) -> dict[str, Any]:
    if not true:
        return {"accuracy": None, "n": 0}
    p, t = np.asarray(pred), np.asarray(true)
    k = len(TL_NAMES)
    conf = np.zeros((k, k), int)
    for a, b in zip(t, p, strict=True):
        if 0 <= a < k and 0 <= b < k:
            conf[a, b] += 1
    majority = np.bincount(t, minlength=k).max() / len(t)
    return {"accuracy": round(float((p == t).mean()), 4), "n": len(t),
            "majority_baseline": round(float(majority), 4), "classes": list(TL_NAMES),
            "confusion_true_by_pred": conf.tolist()}


def _recorded_result(bag: Path, role: str) -> dict[str, Any] | None:
    """The run's last DrivingScore (RC/IS/DS, status, infraction counts) when the bag carries one."""
    from flad_sim import bridge
    from flad_sim.bag import BagError, read_bag

    last = None
    try:
        for m in read_bag(bag, topics=[bridge.topic(role, "driving_score")]):
            last = m.msg
    except BagError as exc:
        raise ReplayError(str(exc)) from exc
    if last is None:
        return None
    d = bridge.score_from_msg(last)
    counts: dict[str, int] = {}
    for inf in d.pop("infractions"):
        counts[inf["kind"]] = counts.get(inf["kind"], 0) + 1
    d["infractions"] = counts
    return d


# ------------------------------------------------------------------------------------------------ report


def write_report(run_path: Path, result: dict[str, Any], times: list[float], head: list[np.ndarray],
                 adm: list[np.ndarray | None], expert: list[np.ndarray | None], per_frame: dict[str, list],
                 plot_frames: int) -> Path:
    """trajectories.png (predicted vs expert waypoints on a few frames), ade.png (ADE over time), report.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flad_core.atomic import atomic_write_text

    run_path = Path(run_path)
    labelled = [i for i, e in enumerate(expert) if e is not None]
    pick = [labelled[int(j)] for j in np.linspace(0, len(labelled) - 1, min(plot_frames, len(labelled)))] \
        if labelled and plot_frames else []
    figs: list[str] = []
    if pick:
        cols = min(3, len(pick))
        rows = math.ceil(len(pick) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
        for ax, i in zip(axes.flat, pick, strict=False):
            # ego frame drawn with forward up and left to the left
            e = expert[i]
            ax.plot(-e[:, 1], e[:, 0], "k-o", ms=3, label="expert")
            ax.plot(-head[i][:, 1], head[i][:, 0], "-o", color="tab:blue", ms=3, label="encoder head")
            if adm[i] is not None:
                ax.plot(-adm[i][:, 1], adm[i][:, 0], "-o", color="tab:orange", ms=3, label="ADM")
            ax.plot([0], [0], "s", color="gray", ms=5)
            ax.set_title(f"t = {times[i]:.2f} s", fontsize=9)
            ax.set_aspect("equal", adjustable="datalim")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(pick):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7, loc="lower right")
        fig.suptitle("waypoints, ego frame (forward up, metres)", fontsize=10)
        fig.tight_layout()
        fig.savefig(run_path / "trajectories.png", dpi=100)
        plt.close(fig)
        figs.append("trajectories.png")
    series = [(k, lab) for k, lab in (("encoder_head_ade", "encoder head"), ("adm_ade", "ADM"))
              if any(v is not None for v in per_frame[k])]
    if series:
        fig, ax = plt.subplots(figsize=(6.4, 3.2))
        for k, lab in series:
            pts = [(t, v) for t, v in zip(per_frame["t_s"], per_frame[k], strict=True) if v is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ".-", label=lab)
        ax.set_xlabel("simulated time (s)")
        ax.set_ylabel("ADE (m)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(run_path / "ade.png", dpi=100)
        plt.close(fig)
        figs.append("ade.png")
    atomic_write_text(run_path / "report.md", _markdown(result, figs))
    return run_path / "report.md"


def _fmt(v: Any, nd: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def _markdown(r: dict[str, Any], figs: list[str]) -> str:
    lines = [f"# Replay evaluation of `{r['bag']}`", "",
             f"Encoder `{r['encoder']['checkpoint']}` ({r['encoder']['config']})"
             + (f", ADM `{r['adm']}`" if r["adm"] else "") + f"; {r['frames']} frames "
             f"({r['frames_with_expert']} with expert waypoints), simulated time {r['sim_time_s'][0]:.2f}–"
             f"{r['sim_time_s'][1]:.2f} s.", "", "| waypoints vs expert | ADE (m) | FDE (m) | frames |",
             "|---|---|---|---|"]
    for name, s in r["waypoints"].items():
        lines.append(f"| {name} | {_fmt(s['ade_m'])} | {_fmt(s['fde_m'])} | {s['n']} |")
    tl = r["traffic_light"]
    lines += ["", f"Traffic-light accuracy (encoder head): {_fmt(tl['accuracy'])} over {tl['n']} frames"
                  + (f" (majority-class baseline {_fmt(tl['majority_baseline'])})" if tl.get("n") else "") + ".",
              "", "| stage | p50 (ms) | p99 (ms) |", "|---|---|---|"]
    for k, s in r["latency_ms"].items():
        lines.append(f"| {k} | {_fmt(s['p50'])} | {_fmt(s['p99'])} |")
    rr = r.get("recorded_result")
    if rr:
        lines += ["", f"Recorded run (route {rr['route_id']}): {rr['status']}, RC {rr['rc']:.1f}, "
                      f"IS {rr['is']:.3f}, DS {rr['ds']:.1f}, events {rr['infractions'] or 'none'}."]
    lines.append("")
    for f in figs:
        lines += [f"![{f}]({f})", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CLI


def register(subparsers: argparse._SubParsersAction) -> None:
    from flad_core.device import add_device_argument

    parser = subparsers.add_parser("eval", help="evaluate models on recorded data (replay bags)",
                                   description="Evaluation commands.")
    sub = parser.add_subparsers(dest="eval_command", metavar="SUBCOMMAND")
    r = sub.add_parser("replay", help="open-loop replay of a recorded bag through the encoder (+ ADM)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("bag", help="rosbag2 bag folder or .mcap file (e.g. from `flad bag record`)")
    r.add_argument("--checkpoint", required=True, help="encoder checkpoint (.safetensors)")
    r.add_argument("--adm", default="", help="CELLAdapt AD-LLM/ADM save_pretrained folder (optional)")
    r.add_argument("--role", default="hero", help="ego role name in the topic names [%(default)s]")
    r.add_argument("--max-frames", type=int, default=0, help="stop after N frames (0: all)")
    r.add_argument("--threads", type=int, default=1, help="torch threads [%(default)s]")
    r.add_argument("--plot-frames", type=int, default=6, help="frames in the trajectory plot [%(default)s]")
    add_device_argument(r, what="the encoder and the ADM")
    r.add_argument("--runs-dir", default=None, help="runs root (default $FLAD_RUNS_DIR or runs)")
    r.add_argument("--json", action="store_true", help="print the result as one JSON object")
    r.set_defaults(func=_replay)

    def _help(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 0

    parser.set_defaults(func=_help)


def _check_model_inputs(cfg: ReplayConfig) -> None:
    """ReplayError, in one line naming the command that makes it, for a missing checkpoint or ADM folder."""
    from flad_edge.celladapt.model import CONFIG_FILE
    from flad_vehicle.encoder.checkpoint import CheckpointError, read_checkpoint

    try:
        read_checkpoint(cfg.checkpoint)
    except CheckpointError as exc:
        raise ReplayError(f"{exc} (`flad vehicle train` makes an encoder checkpoint)") from exc
    if cfg.adm and not (Path(cfg.adm) / CONFIG_FILE).is_file():
        raise ReplayError(f"ADM {cfg.adm}: not a CELLAdapt save_pretrained folder (no {CONFIG_FILE}); "
                          "`flad llm train` writes runs/<id>/models/adm")


def _replay(args: argparse.Namespace) -> int:
    from flad_core.config import ConfigError, from_dict
    from flad_core.runs import RunDir
    from flad_sim.bag import BagError, bag_info

    try:
        cfg = from_dict(ReplayConfig, {"bag": args.bag, "checkpoint": args.checkpoint, "adm": args.adm,
                                       "role": args.role, "max_frames": args.max_frames, "threads": args.threads,
                                       "plot_frames": args.plot_frames, "device": args.device})
        _device(cfg.device)         # a device this host lacks, a bad bag, checkpoint or ADM folder is refused
        bag_info(cfg.bag)           # before a run folder is made
        _check_model_inputs(cfg)
    except (ConfigError, BagError, ReplayError) as exc:
        print(f"flad eval replay: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    run = RunDir.create("eval-replay", cfg, root=Path(args.runs_dir) if args.runs_dir else None)
    try:
        result = evaluate(cfg, run.path)
    except ReplayError as exc:
        log.error("%s", exc)
        print(f"flad eval replay: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    result["run"] = str(run.path)
    run.write_json("replay.json", result)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        w = result["waypoints"]
        parts = [f"{k} ADE {_fmt(v['ade_m'])} m FDE {_fmt(v['fde_m'])} m" for k, v in w.items()]
        print(f"{result['frames']} frames; " + "; ".join(parts)
              + f"; TL accuracy {_fmt(result['traffic_light']['accuracy'])}")
        print(f"report: {result['report']}")
        print(f"json:   {run.path / 'replay.json'}")
    return 0


if __name__ == "__main__":
    from flad_core.cli import main

    sys.exit(main(["eval", "replay", *sys.argv[1:]]))
