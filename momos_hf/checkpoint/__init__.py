"""Compact MoMos checkpoints on disk: the format (`schema`), the save (`save`), the load checks (`verify`) and
what a checkpoint holds without building the model (`info`)."""

from .info import checkpoint_info, format_info
from .schema import FORMAT_VERSION, QUANT_METHOD, sha256_of
from .verify import read_checkpoint_config, verify_checkpoint

__all__ = [
    "FORMAT_VERSION",
    "QUANT_METHOD",
    "checkpoint_info",
    "format_info",
    "read_checkpoint_config",
    "sha256_of",
    "verify_checkpoint",
]
