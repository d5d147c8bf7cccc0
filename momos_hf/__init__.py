"""momos-hf: Mosaic-of-Motifs compression for Hugging Face Transformers."""

from .config import MoMosConfig
from .layer import MoMosConv1D, MoMosConv2d, MoMosEmbedding, MoMosLayer, MoMosLinear
from .model import MoMosModel, get_momos_model
from .quantizer import MoMosQuantizationConfig, register

register()  # AutoModel*.from_pretrained now rebuilds MoMos checkpoints

__all__ = ["MoMosConfig", "MoMosConv1D", "MoMosConv2d", "MoMosEmbedding", "MoMosLayer", "MoMosLinear", "MoMosModel",
           "MoMosQuantizationConfig", "get_momos_model"]
__version__ = "0.3.0"
