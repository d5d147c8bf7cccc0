"""The reconstruction hook: a transformers quantizer for `quant_method: "momos"` checkpoints.

`import momos_hf` registers it, so every `AutoModel*.from_pretrained` (and `pipeline`) of a MoMos checkpoint
swaps the target layers for `MoMosLinear` skeletons on the meta device before any weight is read (the dense
matrices are never built), loads motifs, packed mosaics, scales and every other tensor as usual, then unpacks
the mosaics.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .checkpoint import FORMAT_VERSION, QUANT_METHOD, verify_files
from .config import MoMosConfig
from .fitting import num_blocks_per_row
from .layer import MoMosLinear


class MoMosQuantizationConfig(QuantizationConfigMixin):
    """What `config.json` says of a MoMos checkpoint, under `quantization_config`.

    Args:
        momos_config: the `MoMosConfig` of the conversion, as a dict.
        layers: per converted layer (full name): `in_features`, `out_features`, `k`, `s`, `scale`, `conv1d`,
            and `motifs`, the name of the layer whose `motifs` tensor it uses (itself unless shared).
        checksums: sha256 of each weight file, checked before loading.
        base_model: name or path of the model that was converted.
        format_version: version of this layout; a newer one than this library knows is refused.
    """

    def __init__(
        self,
        momos_config: dict,
        layers: dict[str, dict],
        checksums: Optional[dict[str, str]] = None,
        base_model: str = "",
        format_version: int = FORMAT_VERSION,
        **kwargs: Any,
    ):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.base_model = base_model
        self.momos_config = momos_config
        self.layers = layers
        self.checksums = checksums or {}
        if not isinstance(format_version, int) or format_version > FORMAT_VERSION:
            raise ValueError(
                f"this checkpoint uses momos format_version {format_version!r}; this momos-hf reads up to "
                f"{FORMAT_VERSION}: upgrade momos-hf"
            )
        MoMosConfig.from_dict(momos_config)  # validates
        for name, spec in layers.items():
            missing = {"in_features", "out_features", "k", "s", "scale", "conv1d", "motifs"} - set(spec)
            if missing:
                raise ValueError(f"quantization_config.layers[{name!r}] lacks {sorted(missing)}")
            if spec["motifs"] not in layers:
                raise ValueError(f"layer {name!r} uses the motifs of {spec['motifs']!r}, which is not a MoMos layer")

    @property
    def config(self) -> MoMosConfig:
        return MoMosConfig.from_dict(self.momos_config)


class MoMosHfQuantizer(HfQuantizer):
    """Loads MoMos checkpoints; it never quantizes a dense model (use `get_momos_model` for that)."""

    requires_calibration = True  # a MoMos model is made by fitting, not at load time
    quantization_config: MoMosQuantizationConfig

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files=None, **kwargs: Any) -> None:
        config = self.quantization_config
        if checkpoint_files:
            verify_files(checkpoint_files, config.checksums)
        build_skeleton(model, config.layers, config.config.zero_motif)
        # A shared dictionary is stored once, under its owner; the loader must not call the others missing.
        shared = {rf"(^|\.){re.escape(name)}\.motifs$" for name, spec in config.layers.items() if spec["motifs"] != name}
        model._keys_to_ignore_on_load_missing = set(model._keys_to_ignore_on_load_missing or ()) | shared

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        layers = self.quantization_config.layers
        for name, spec in layers.items():
            module = model.get_submodule(name)
            if spec["motifs"] != name:  # the loader fills each name separately: share the owner's again
                module.motifs = model.get_submodule(spec["motifs"]).motifs
            try:
                module.unpack_mosaic()
            except ValueError as err:
                raise ValueError(f"corrupted MoMos checkpoint: layer {name}: {err}") from err
        return model

    @property
    def is_trainable(self) -> bool:
        return True

    def is_serializable(self) -> bool:
        return True


def build_skeleton(model: nn.Module, layers: dict[str, dict], zero_motif: bool = False) -> None:
    """Replace each listed `nn.Linear`/`Conv1D` of `model` by an empty `MoMosLinear` of the recorded shape
    (on the device of the layer it replaces, usually meta), sharing dictionaries as recorded."""
    motifs: dict[str, nn.Parameter] = {}
    for name, spec in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"MoMos layer {name} of the checkpoint is not a module of {type(model).__name__}") from None
        if not isinstance(module, (nn.Linear, Conv1D)):
            raise ValueError(f"MoMos layer {name} replaces a {type(module).__name__}; expected nn.Linear or Conv1D")
        expected = tuple(module.weight.shape[::-1] if spec["conv1d"] else module.weight.shape)
        if expected != (spec["out_features"], spec["in_features"]):
            raise ValueError(
                f"MoMos layer {name} is recorded as {spec['out_features']}x{spec['in_features']} but the model "
                f"config builds it as {expected[0]}x{expected[1]}: the checkpoint and its config.json disagree"
            )
        device, dtype = module.weight.device, module.weight.dtype
        owner = spec["motifs"]
        if owner not in motifs:
            owner_spec = layers[owner]
            motifs[owner] = nn.Parameter(torch.empty(owner_spec["k"], owner_spec["s"], device=device, dtype=dtype))
        mosaic = torch.empty(spec["out_features"], num_blocks_per_row(spec["in_features"], spec["s"]), device=device)
        scale = nn.Parameter(torch.empty(spec["out_features"], device=device, dtype=dtype)) if spec["scale"] else None
        layer = MoMosLinear(
            spec["in_features"], spec["out_features"], motifs[owner], mosaic, scale, module.bias, zero_motif, spec["conv1d"]
        )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)


def register() -> None:
    """Make `from_pretrained` find the MoMos quantizer (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(MoMosQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(MoMosHfQuantizer)
