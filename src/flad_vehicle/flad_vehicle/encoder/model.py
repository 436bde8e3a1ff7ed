"""The multimodal vision encoder (after LMDrive/InterFuser) as an explicit sequence of named-tensor layers.

Data flow (names are the tensors layers read/write; see `VisionEncoder.layer_list`):

    speed, target_point ─ meas ─────────────────────────────────────┐ meas.speed, meas.wp_h0
    rgb_front/left/right/rear ─ rgb_stem ─ rgb blocks ─ rgb_tokens ─┐│
    rgb_front ─ tl_focus (full-res crop, small CNN) → tl.focus ─────┼┼─ (traffic-light query, tl_head)
    lidar ─ lidar_pillars ─ lidar blocks ─ lidar_tokens ───────────┤│
                                         fuse ─ enc_* ─ memory ────┤│
                               queries(speed) ─ dec_* (cross-attn memory)
                 bev_head → pred.bev [B,50,50] logits · tl_head → pred.tl [B,4] · wp_head (GRU) → pred.waypoints
                 features → [B, feature_pool² + 1 + n_waypoints, d]   · loss (optional; reads the labels)

Inputs are the dataset's field names (`flad_sim.schema`); images stay uint8 HWC and are normalised inside
the first layer, so the first pipeline stage is the only one that touches raw sensor data.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor, nn

from flad_core.device import resolve_device
from flad_sim.schema import BEV_X_RANGE_M, BEV_Y_RANGE_M
from flad_vehicle.encoder.config import EncoderConfig, get_config
from flad_vehicle.encoder.layers import (
    BasicBlock,
    BevHead,
    Bottleneck,
    DecoderLayer,
    EncoderLayer,
    FeatureHead,
    Fuse,
    Layer,
    LidarTokens,
    LossLayer,
    MeasurementLayer,
    PerView,
    PillarLayer,
    QueryLayer,
    RgbStem,
    RgbTokens,
    Single,
    TrafficLightFocus,
    TrafficLightHead,
    WaypointHead,
)

MEASUREMENT_INPUTS = ("speed", "target_point")
LABEL_INPUTS = ("bev", "tl_state", "waypoints")
PRED_OUTPUTS = ("pred.bev", "pred.tl", "pred.waypoints", "features")
LOSS_OUTPUTS = ("loss", "loss.bev", "loss.tl", "loss.wp")
BACKBONE_GROUPS = ("rgb", "lidar")   # parameter groups trained with the backbone learning rate


class VisionEncoder(nn.Module):
    """LMDrive-style encoder. `layers` is an ordered ModuleDict of `Layer`s (declaration order is a valid
    topological order); `forward(batch)` runs the prediction layers, `forward_train` adds the loss."""

    def __init__(self, cfg: EncoderConfig | str | dict | None = None, device: str | torch.device | None = None
                 ) -> None:
        """`device` (flad_core.device: auto|cpu|cuda[:N]|meta; None = the CPU): the weights are initialised on
        the CPU and then moved, so a seed gives the same model on every device."""
        super().__init__()
        cfg = get_config(cfg if cfg is not None else "tiny")
        self.cfg = cfg
        cams = tuple(sorted(cfg.cameras))   # canonical order: a config round trip may reorder the dict
        self.sensor_inputs = (*cams, "lidar")
        d = cfg.d_model
        L: dict[str, Layer] = {}
        L["meas"] = MeasurementLayer(d, cfg.gru_hidden)
        L["rgb_stem"] = RgbStem(cams, cfg.rgb_stem, cfg.norm, cfg.rgb_stem_pool, cfg.rgb_norm)
        L["lidar_pillars"] = PillarLayer(cfg.lidar_grid, cfg.pillar_channels, BEV_X_RANGE_M, BEV_Y_RANGE_M,
                                         cfg.lidar_max_height_m)
        focus_cam = cfg.focus_camera
        if focus_cam is not None:
            L["tl_focus"] = TrafficLightFocus(focus_cam, cfg.cameras[focus_cam], cfg.tl_focus_box,
                                              cfg.tl_focus_widths, cfg.tl_focus_grid, cfg.norm, d)
        # RGB backbone: one layer per residual block, each applied to every camera with shared weights
        cin, src, k = cfg.rgb_stem[-1], "rgb.0", 0
        for si, (w, depth, stride) in enumerate(zip(cfg.rgb_widths, cfg.rgb_depths, cfg.rgb_strides, strict=True)):
            for bi in range(depth):
                s = stride if bi == 0 else 1
                if cfg.rgb_block == "bottleneck":
                    block: nn.Module = Bottleneck(cin, w, s, cfg.norm)
                    cin = w * Bottleneck.expansion
                else:
                    block = BasicBlock(cin, w, s, cfg.norm)
                    cin = w
                k += 1
                L[f"rgb_s{si + 1}b{bi}"] = PerView(block, cams, src, f"rgb.{k}", "conv", "rgb")
                src = f"rgb.{k}"
        L["rgb_tokens"] = RgbTokens(cams, src, cin, d)
        # LiDAR BEV conv backbone
        cin, src, k = cfg.pillar_channels, "lidar.0", 0
        for si, (w, depth, stride) in enumerate(
                zip(cfg.lidar_widths, cfg.lidar_depths, cfg.lidar_strides, strict=True)):
            for bi in range(depth):
                k += 1
                L[f"lidar_s{si + 1}b{bi}"] = Single(BasicBlock(cin, w, stride if bi == 0 else 1, cfg.norm),
                                                    src, f"lidar.{k}", "conv", "lidar")
                cin, src = w, f"lidar.{k}"
        L["lidar_tokens"] = LidarTokens(src, cin, d)
        L["fuse"] = Fuse()
        for i in range(cfg.enc_depth):
            L[f"enc_{i}"] = EncoderLayer(i, d, cfg.n_heads, cfg.ffn_dim)
        L["memory"] = Single(nn.Identity(), f"enc.{cfg.enc_depth}", "memory", "alias", "encoder")
        L["queries"] = QueryLayer(d, cfg.bev_queries, cfg.n_waypoints, focus_cam is not None)
        for i in range(cfg.dec_depth):
            L[f"dec_{i}"] = DecoderLayer(i, d, cfg.n_heads, cfg.ffn_dim)
        top = f"dec.{cfg.dec_depth}"
        L["bev_head"] = BevHead(top, d, cfg.bev_queries, cfg.bev_size)
        L["tl_head"] = TrafficLightHead(top, d, cfg.bev_queries, cfg.n_tl_classes, focus_cam is not None)
        L["wp_head"] = WaypointHead(top, d, cfg.bev_queries, cfg.n_waypoints, cfg.gru_hidden)
        L["features"] = FeatureHead(top, cfg.bev_queries, cfg.feature_pool, cfg.n_waypoints)
        L["loss"] = LossLayer(cfg.w_bev, cfg.w_tl, cfg.w_wp, cfg.bev_pos_weight, cfg.tl_class_weights)
        self.layers = nn.ModuleDict(L)
        if device is not None:
            self.to(resolve_device(device))

    @property
    def device(self) -> torch.device:
        """Where the weights are (every parameter lives on one device)."""
        return next(self.parameters()).device

    # ------------------------------------------------------------------------------------------ structure

    @property
    def input_names(self) -> tuple[str, ...]:
        return (*self.sensor_inputs, *MEASUREMENT_INPUTS)

    def layer_list(self, include_loss: bool = True) -> list[tuple[str, Layer]]:
        """(name, layer) in declaration order; the loss layer last when `include_loss`."""
        return [(n, m) for n, m in self.layers.items() if include_loss or n != "loss"]  # type: ignore[misc]

    def output_names(self, include_loss: bool = True) -> tuple[str, ...]:
        return PRED_OUTPUTS + (LOSS_OUTPUTS if include_loss else ())

    def param_groups(self, lr: float, backbone_lr: float, weight_decay: float) -> list[dict]:
        """AdamW groups: RGB/LiDAR backbones at `backbone_lr`, everything else at `lr` (the paper's 3e-4/7.5e-4)."""
        bb, rest = [], []
        for _, layer in self.layer_list():
            (bb if layer.group in BACKBONE_GROUPS else rest).extend(layer.parameters())
        return [{"params": bb, "lr": backbone_lr, "weight_decay": weight_decay, "name": "backbone"},
                {"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "general"}]

    # ------------------------------------------------------------------------------------------ running

    def run(self, env: Mapping[str, Tensor], include_loss: bool, outputs: tuple[str, ...] | None = None
            ) -> dict[str, Tensor]:
        """Runs every layer over a dict of named tensors; returns `outputs` (default: the model outputs)."""
        env = dict(env)
        for _, layer in self.layer_list(include_loss):
            outs = layer(*[env[n] for n in layer.reads])
            for i, n in enumerate(layer.writes):
                env[n] = outs[i]
        names = outputs if outputs is not None else self.output_names(include_loss)
        return {n: env[n] for n in names}

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Predictions: pred.bev [B,S,S] logits, pred.tl [B,4] logits, pred.waypoints [B,5,2] m, features."""
        return self.run(select_inputs(batch, self.input_names), include_loss=False)

    def forward_train(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Predictions plus `loss` (weighted total) and `loss.bev`, `loss.tl`, `loss.wp`."""
        return self.run(select_inputs(batch, self.input_names + LABEL_INPUTS), include_loss=True)

    @torch.no_grad()
    def encode_features(self, batch: Mapping[str, Tensor]) -> Tensor:
        """LLM features, [B, n_tokens, d_model] with n_tokens = feature_pool² + 1 + n_waypoints:
        tokens 0..feature_pool²-1 are pooled BEV tokens (row-major, far-to-near, left-to-right), then the
        traffic-light token, then one token per waypoint (0.5 s apart). Tiny: [B, 31, 64]; paper: [B, 31, 256]."""
        return self.forward(batch)["features"]


def select_inputs(batch: Mapping[str, Tensor], names: tuple[str, ...]) -> dict[str, Tensor]:
    missing = [n for n in names if n not in batch]
    if missing:
        raise KeyError(f"batch is missing field(s) {missing}; it has {sorted(batch)}")
    return {n: batch[n] for n in names}


def batch_to_torch(batch: Mapping[str, np.ndarray | list | Tensor], names: tuple[str, ...] | None = None,
                   device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Numpy batch (as `flad_sim.dataset.iter_batches` yields) → torch tensors; text fields are skipped."""
    out: dict[str, Tensor] = {}
    for k, v in batch.items():
        if names is not None and k not in names:
            continue
        if isinstance(v, Tensor):
            out[k] = v.to(device)
        elif isinstance(v, np.ndarray) and v.dtype.kind in "biuf":
            out[k] = torch.from_numpy(np.ascontiguousarray(v)).to(device)
    return out


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
