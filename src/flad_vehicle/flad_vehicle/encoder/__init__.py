"""FLAD's multimodal vision encoder: model, configs, layer-sequence partitioner, profiler, trainer."""

from flad_vehicle.encoder.config import EncoderConfig, get_config, paper, tiny
from flad_vehicle.encoder.model import (
    LABEL_INPUTS,
    LOSS_OUTPUTS,
    PRED_OUTPUTS,
    VisionEncoder,
    batch_to_torch,
    count_parameters,
)

__all__ = [
    "LABEL_INPUTS", "LOSS_OUTPUTS", "PRED_OUTPUTS", "EncoderConfig", "VisionEncoder", "batch_to_torch",
    "count_parameters", "get_config", "paper", "tiny",
]
