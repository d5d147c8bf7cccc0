"""momos-hf: Mosaic-of-Motifs compression for Hugging Face Transformers."""

from .config import MoMosConfig
from .layer import MoMosLinear
from .model import MoMosModel, get_momos_model

__all__ = ["MoMosConfig", "MoMosLinear", "MoMosModel", "get_momos_model"]
__version__ = "0.1.0"
