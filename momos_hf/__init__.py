"""momos-hf: Mosaic-of-Motifs compression for Hugging Face Transformers.

The core (config, layers, the `MoMosModel` wrapper, the transformers quantizer) loads with the package; the
rest (LoRA, training, reports, checkpoint inspection) loads on first use of its name."""

import importlib
from typing import Any

from .config import MoMosConfig
from .integrations.quantizer import MoMosQuantizationConfig, register
from .layer import MoMosConv1D, MoMosConv2d, MoMosEmbedding, MoMosLayer, MoMosLinear, momos_layers
from .model import MoMosModel, get_momos_model

register()  # AutoModel*.from_pretrained now rebuilds MoMos checkpoints

_LAZY = {  # public name -> the module that defines it (imported on first use: peft and the rest are slow to import)
    **dict.fromkeys(["get_lora_model", "load_lora", "merge_lora"], "momos_hf.integrations.lora"),
    **dict.fromkeys(["ComplexityReport", "complexity_report"], "momos_hf.report"),
    **dict.fromkeys(
        ["ComplexityTracker", "MoMosCallback", "ProjectionSchedule", "finetune_to_teacher", "teacher_targets"],
        "momos_hf.train",
    ),
    **dict.fromkeys(["checkpoint_info", "verify_checkpoint"], "momos_hf.checkpoint"),
}

__all__ = [
    "MoMosConfig",
    "MoMosConv1D",
    "MoMosConv2d",
    "MoMosEmbedding",
    "MoMosLayer",
    "MoMosLinear",
    "MoMosModel",
    "MoMosQuantizationConfig",
    "get_momos_model",
    "momos_layers",
    *_LAZY,
]
__version__ = "0.3.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'momos_hf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
