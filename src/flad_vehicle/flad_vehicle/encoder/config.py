"""Typed encoder configs: `tiny` (CPU-trainable, the default) and `paper` (LMDrive-sized).

The paper size follows LMDrive's `memfuser_baseline_e1d3` (ResNet-50d RGB backbone, conv LiDAR backbone,
d = 256, 1 encoder / 3 decoder layers, GRU waypoint head) scaled to this project's sensor rig; it is built
and profiled here, not trained. Load overrides with `flad_core.config.from_dict(EncoderConfig, {...})`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from flad_core.config import ConfigError, from_dict
from flad_sim.schema import BEV_SIZE, DEFAULT_CAMERA_SIZES, DEFAULT_LIDAR_RAYS, N_WAYPOINTS


@dataclass
class EncoderConfig:
    """Shape of the vision encoder; every size that matters for FLOPs/memory is here."""

    name: str = "tiny"
    # sensor rig (must match the dataset's shapes)
    cameras: dict[str, tuple[int, int]] = field(default_factory=lambda: dict(DEFAULT_CAMERA_SIZES))
    lidar_rays: int = DEFAULT_LIDAR_RAYS
    # transformer
    d_model: int = 64
    n_heads: int = 4
    ffn_dim: int = 128
    enc_depth: int = 2
    dec_depth: int = 2
    # RGB backbone (ResNet-style, shared across cameras; `bottleneck` + deep stem + avg-pool shortcut = ResNet-D)
    rgb_block: Literal["basic", "bottleneck"] = "basic"
    rgb_stem: tuple[int, ...] = (16,)
    rgb_norm: Literal["imagenet", "instance"] = "imagenet"   # instance: per-image, per-channel standardisation
    rgb_stem_pool: bool = True       # ResNet's stride-2 max-pool after the stem (off: 2x finer maps, ~4x RGB FLOPs)
    rgb_widths: tuple[int, ...] = (16, 32, 64)
    rgb_depths: tuple[int, ...] = (1, 1, 1)
    rgb_strides: tuple[int, ...] = (1, 2, 2)
    norm: Literal["group", "batch"] = "group"
    # LiDAR backbone (PointPillars over the BEV label's area)
    lidar_grid: int = 50
    pillar_channels: int = 32
    lidar_widths: tuple[int, ...] = (32, 64)
    lidar_depths: tuple[int, ...] = (1, 1)
    lidar_strides: tuple[int, ...] = (2, 2)
    lidar_max_height_m: float = 4.0
    # decoder queries / heads
    bev_queries: int = 10            # BEV query grid side; each query predicts a (BEV_SIZE/bev_queries)^2 patch
    bev_size: int = BEV_SIZE
    n_waypoints: int = N_WAYPOINTS
    n_tl_classes: int = 4
    # traffic-light focus view (after LMDrive's focus camera): a full-resolution crop of `rgb_front` where the
    # lights governing the ego appear (a few pixels at 128x128, lost by the stride-4 RGB stem), read by a small
    # stride-1/2 CNN into one token that conditions the traffic-light query and feeds the traffic-light head.
    tl_focus: bool = True
    tl_focus_box: tuple[float, ...] = (0.28125, 0.59375, 0.3125, 0.6875)   # (top, bottom, left, right) fractions
    tl_focus_widths: tuple[int, ...] = (16, 32, 32)                 # conv widths; strides 1, 2, 1, 1, ...
    tl_focus_grid: tuple[int, ...] = (4, 4)                         # max-pooled grid (keeps where a lamp is)
    gru_hidden: int = 64
    feature_pool: int = 5            # LLM features: BEV queries avg-pooled to feature_pool x feature_pool tokens
    # loss weights after LMDrive's pretraining (traffic/BEV 0.5, waypoints 0.2, traffic-light state 0.1)
    w_bev: float = 0.5
    w_wp: float = 0.2
    w_tl: float = 0.1
    bev_pos_weight: float = 4.0      # occupancy is sparse; BCE positive weight
    # traffic-light CE class weights (none, red, yellow, green); empty = unweighted. Green/yellow are rare in
    # training (~6% / 2%) but common at other junction timings, so they are up-weighted.
    tl_class_weights: tuple[float, ...] = (1.0, 1.0, 2.0, 2.0)

    def validate(self) -> None:
        if self.d_model % self.n_heads:
            raise ConfigError("d_model", f"must be divisible by n_heads={self.n_heads}")
        if self.bev_size % self.bev_queries:
            raise ConfigError("bev_queries", f"must divide bev_size={self.bev_size}")
        if self.bev_queries % self.feature_pool:
            raise ConfigError("feature_pool", f"must divide bev_queries={self.bev_queries}")
        if not (len(self.rgb_widths) == len(self.rgb_depths) == len(self.rgb_strides)):
            raise ConfigError("rgb_widths", "rgb_widths, rgb_depths and rgb_strides need the same length")
        if not (len(self.lidar_widths) == len(self.lidar_depths) == len(self.lidar_strides)):
            raise ConfigError("lidar_widths", "lidar_widths, lidar_depths and lidar_strides need the same length")
        if not self.cameras:
            raise ConfigError("cameras", "at least one camera is needed")
        if len(self.tl_focus_box) != 4 or not (0 <= self.tl_focus_box[0] < self.tl_focus_box[1] <= 1
                                               and 0 <= self.tl_focus_box[2] < self.tl_focus_box[3] <= 1):
            raise ConfigError("tl_focus_box", "needs (top, bottom, left, right) fractions with top < bottom, "
                              "left < right, all in [0, 1]")
        if len(self.tl_focus_grid) != 2 or not self.tl_focus_widths:
            raise ConfigError("tl_focus_grid", "tl_focus_grid needs 2 values and tl_focus_widths at least 1")
        if self.tl_class_weights and len(self.tl_class_weights) != self.n_tl_classes:
            raise ConfigError("tl_class_weights", f"needs {self.n_tl_classes} values (or none)")

    @property
    def focus_camera(self) -> str | None:
        """The camera the traffic-light focus view crops (None: focus off or no front camera)."""
        return "rgb_front" if self.tl_focus and "rgb_front" in self.cameras else None

    @property
    def n_feature_tokens(self) -> int:
        """Tokens per sample in `encode_features`: pooled BEV + 1 traffic light + waypoints."""
        return self.feature_pool ** 2 + 1 + self.n_waypoints

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["cameras"] = {k: list(v) for k, v in self.cameras.items()}
        for k, v in list(d.items()):
            if isinstance(v, tuple):
                d[k] = list(v)
        return d


def tiny() -> EncoderConfig:
    return EncoderConfig()


def paper() -> EncoderConfig:
    """LMDrive `memfuser_baseline_e1d3`-sized: ResNet-50d (3,4,6,3 bottlenecks), d = 256, 8 heads, FFN 2048."""
    return EncoderConfig(
        name="paper", d_model=256, n_heads=8, ffn_dim=2048, enc_depth=1, dec_depth=3,
        rgb_block="bottleneck", rgb_stem=(32, 32, 64), rgb_widths=(64, 128, 256, 512),
        rgb_depths=(3, 4, 6, 3), rgb_strides=(1, 2, 2, 2), norm="batch",
        lidar_grid=100, pillar_channels=64, lidar_widths=(64, 128, 256), lidar_depths=(2, 3, 3),
        lidar_strides=(2, 2, 1), bev_queries=25, gru_hidden=256, feature_pool=5,
    )


PRESETS = {"tiny": tiny, "paper": paper}


def get_config(name_or_dict: str | dict[str, Any] | EncoderConfig = "tiny") -> EncoderConfig:
    """A preset by name, a YAML file of overrides (`*.yaml`/`*.yml`/`*.json`), or a preset (key `name`,
    default tiny) overridden by the given keys."""
    if isinstance(name_or_dict, EncoderConfig):
        return name_or_dict
    if isinstance(name_or_dict, str) and name_or_dict.endswith((".yaml", ".yml", ".json")):
        import yaml

        try:
            data = yaml.safe_load(Path(name_or_dict).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError("", f"encoder config file not found: {name_or_dict}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError("", f"{name_or_dict}: invalid YAML: {exc}") from exc
        try:
            return get_config(data or {})
        except ConfigError as exc:
            raise ConfigError(exc.key, f"{exc.reason} (in {name_or_dict})") from exc
    if isinstance(name_or_dict, str):
        if name_or_dict not in PRESETS:
            raise ConfigError("name", f"unknown encoder config {name_or_dict!r} (known: {', '.join(PRESETS)})")
        return PRESETS[name_or_dict]()
    data = dict(name_or_dict)
    base = get_config(data.get("name", "tiny")).to_dict()
    base.update(data)
    return from_dict(EncoderConfig, base, "encoder")
