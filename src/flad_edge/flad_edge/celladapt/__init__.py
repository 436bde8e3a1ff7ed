"""CELLAdapt (paper §3, §5.2): AD-LLM with a visual adapter and waypoint head, cloud distillation, edge LoRA
fine-tuning, AD-LLM → ADM distillation, and the edge waypoint service."""

from flad_edge.celladapt.model import (
    ADLLM,
    AdapterConfig,
    ADLLMConfig,
    VisualAdapter,
    general_config,
    student_config,
    teacher_config,
)
from flad_edge.celladapt.train import (
    FitConfig,
    LoraSettings,
    apply_lora,
    distill_loss,
    evaluate,
    fit,
    merge_lora,
    train_step,
)

__all__ = [
    "ADLLM", "ADLLMConfig", "AdapterConfig", "FitConfig", "LoraSettings", "VisualAdapter", "apply_lora",
    "distill_loss", "evaluate", "fit", "general_config", "merge_lora", "student_config", "teacher_config",
    "train_step",
]
