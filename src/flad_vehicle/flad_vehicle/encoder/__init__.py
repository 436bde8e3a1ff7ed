"""FLAD's multimodal vision encoder: model, configs, layer-sequence partitioner, profiler, trainer."""

from .config import EncoderConfig, get_config, paper, tiny
from .model import LABEL_INPUTS, LOSS_OUTPUTS, PRED_OUTPUTS, VisionEncoder, batch_to_torch, count_parameters

__all__ = [
    "LABEL_INPUTS", "LOSS_OUTPUTS", "PRED_OUTPUTS", "EncoderConfig", "VisionEncoder", "batch_to_torch",
    "count_parameters", "get_config", "paper", "tiny",
]
