"""The reconstruction hook: a transformers quantizer for `quant_method: "momos"` checkpoints.

`import momos_hf` registers it, so every `AutoModel*.from_pretrained` (and `pipeline`) of a MoMos checkpoint
verifies the checkpoint (see `momos_hf.checkpoint.verify_checkpoint`), swaps the target layers for
MoMos layer skeletons on the meta device before any weight is read (the dense matrices are never built),
loads motifs, packed mosaics, scales and every other tensor as usual, then unpacks and checks the mosaics.

A MoMos model in memory, converted or loaded, carries this quantizer and its config like any quantized
Transformers model (`model.hf_quantizer`, `model.config.quantization_config`), and its `save_pretrained`
writes the compact checkpoint (`save_momos_model`): Transformers' own writer would drop the load marker and
could not save atomically. `merge_and_unload` and `model.dequantize()` turn it back into a plain model.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import tempfile
from pathlib import Path
from types import MethodType
from typing import Any, Optional, Union

import torch
import transformers
from torch import nn
from transformers import PreTrainedModel
from transformers.models.auto import modeling_auto  # noqa: F401 (defines the Auto classes wrapped below)
from transformers.models.auto.auto_factory import _BaseAutoModelClass
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import logging
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..checkpoint.save import finish_interrupted_save, load_lock, save_checkpoint
from ..checkpoint.schema import (
    FORMAT_VERSION,
    QUANT_METHOD,
    SAFETENSORS_DTYPES,
    layer_specs,
    parse_quantization,
    stored_dictionary_formats,
    upgrade_quantization,
)
from ..checkpoint.verify import (
    checkpoint_folder,
    read_checkpoint_config,
    verify_checkpoint,
)
from ..config import MoMosConfig
from ..convert.targets import drop_momos_ties
from ..layer import LAYER_TYPES, LayerSpec, momos_layers, replace_with_momos
from ..mosaic import num_blocks_per_row
from ..packing import packed_size

logger = logging.get_logger(__name__)


class MoMosQuantizationConfig(QuantizationConfigMixin):
    """What `config.json` says of a MoMos checkpoint, under `quantization_config` (see `momos_hf.checkpoint`).

    Args:
        momos_config: the `MoMosConfig` of the conversion, as a dict.
        layers: per converted layer (full name), its `LayerSpec` as a dict.
        weights: the checkpoint's weight file (or shard index); `None` for a model not saved yet.
        checksums: sha256 of each weight file and of the index, checked before loading.
        base_model: name or path of the model that was converted.
        format_version: version of the layout; another one than this library's is refused.
    """

    def __init__(
        self,
        momos_config: dict,
        layers: dict[str, dict],
        weights: Optional[str] = None,
        checksums: Optional[dict[str, str]] = None,
        base_model: str = "",
        format_version: int = FORMAT_VERSION,
        quant_method: str = QUANT_METHOD,
        **unknown: Any,
    ):
        if unknown:
            raise ValueError(f"quantization_config has unknown fields {sorted(unknown)}")
        self.quant_method = quant_method
        self.format_version = format_version
        self.base_model = base_model
        self.momos_config = momos_config
        self.layers = layers
        self.weights = weights
        self.checksums = checksums
        parse_quantization(self.to_dict())
        self.__dict__.update(upgrade_quantization(self.to_dict()))  # an older version's fields as today's

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in super().to_dict().items() if value is not None}

    @property
    def config(self) -> MoMosConfig:
        return MoMosConfig.from_dict(self.momos_config)

    @property
    def specs(self) -> dict[str, LayerSpec]:
        return parse_quantization(self.to_dict())


class MoMosHfQuantizer(HfQuantizer):
    """Loads MoMos checkpoints; it never quantizes a dense model (use `get_momos_model` for that)."""

    requires_calibration = True  # a MoMos model is made by fitting, not at load time
    quantization_config: MoMosQuantizationConfig

    def update_attn_implementation(self, config):
        # The one quantizer hook that sees the model config before Transformers resolves the weight files:
        # point `transformers_weights` from the load marker to this checkpoint's weight file.
        if not self.quantization_config.weights:
            raise ValueError(
                "config.json's quantization_config names no weight file ('weights'): the MoMos checkpoint is damaged"
            )
        config.transformers_weights = self.quantization_config.weights
        return config

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files=None, **kwargs: Any) -> None:
        if not checkpoint_files:
            raise ValueError("a MoMos checkpoint loads from its folder or Hub repository, with from_pretrained(path)")
        config = self.quantization_config
        directory = checkpoint_folder(getattr(model.config, "name_or_path", None), checkpoint_files)
        finish_interrupted_save(directory)  # the generation config and tokenizer, read next, then match the weights
        saved = read_checkpoint_config(directory)
        if upgrade_quantization(saved["quantization_config"]) != config.to_dict():
            raise ValueError(
                f"the config given to from_pretrained describes other MoMos layers than {directory}/config.json"
            )
        tensors = verify_checkpoint(directory, saved)
        build_skeleton(model, config.specs, config.config, tensors)
        # What a layer shares with another is stored once, under the owner: the others are not missing.
        shared = {
            rf"(^|\.){re.escape(name)}\.{part}$"
            for name, spec in config.specs.items()
            for part, owner in (("motifs", spec.motifs), ("mosaic_packed", spec.mosaic), ("scale", spec.mosaic))
            if owner != name or (part == "motifs" and config.config.motif_bits is not None)
        }  # q-bit: codes instead
        model._keys_to_ignore_on_load_missing = set(model._keys_to_ignore_on_load_missing or ()) | shared
        if type(model).__name__ in (saved.get("architectures") or []):  # another class may bring new heads
            check_complete(model, tensors)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        specs = self.quantization_config.specs
        for name, spec in specs.items():  # q-bit dictionaries: the motifs from their codes and step
            layer = model.get_submodule(name)
            if layer.motif_bits is not None and spec.motifs == name:
                stored = {"motif_codes": layer.motif_codes, "motif_step": layer.motif_step}
                try:
                    fan_in = max(other.in_features for other in specs.values() if other.motifs == name)
                    motifs = layer.dictionary_format.decode(stored, spec.k, spec.s, fan_in)
                except ValueError as err:
                    raise ValueError(f"corrupted MoMos checkpoint: layer {name}: {err}") from err
                layer.motifs = nn.Parameter(motifs, requires_grad=layer.motifs.requires_grad)
                del layer.motif_codes, layer.motif_step
        for name, spec in specs.items():  # the loader fills each name separately: share the owner's again
            layer = model.get_submodule(name)
            if spec.motifs != name:
                layer.motifs = model.get_submodule(spec.motifs).motifs
            layer.fit_error = spec.fit_error
        for name, spec in sorted(specs.items(), key=lambda item: item[1].mosaic != item[0]):  # leaders first
            layer = model.get_submodule(name)
            if spec.mosaic != name:
                layer.tie_to(model.get_submodule(spec.mosaic))
                continue
            try:
                layer.unpack_mosaic()
            except ValueError as err:
                raise ValueError(f"corrupted MoMos checkpoint: layer {name}: {err}") from err
            for part in ("motifs", "scale"):
                tensor = getattr(layer, part)
                if tensor is not None and not torch.isfinite(tensor).all():
                    raise ValueError(f"corrupted MoMos checkpoint: layer {name} has NaN or infinite {part}")
        enable_momos_save(model)
        return model

    def _dequantize(self, model: nn.Module, dtype: Optional[Union[str, torch.dtype]] = None) -> nn.Module:
        merge_layers(model, getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return model

    def remove_quantization_config(self, model: nn.Module) -> None:
        unmark(model)

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:  # Trainer trains a MoMos model itself (motifs, or through projections)
        return True

    def is_serializable(self) -> bool:
        # MoMos models save through `save_momos_model` (their `save_pretrained`); Transformers' own writer,
        # reached only by calling `PreTrainedModel.save_pretrained` unbound, would write an unverifiable folder.
        logger.warning(
            "save MoMos models with model.save_pretrained(...) (momos-hf's writer), not "
            "PreTrainedModel.save_pretrained"
        )
        return False


def build_skeleton(
    model: nn.Module, specs: dict[str, LayerSpec], momos_config: MoMosConfig, tensors: dict[str, dict]
) -> None:
    """Replace each listed module of `model` by an empty MoMos layer of the recorded kind and shape (on the
    device of the module it replaces, usually meta), its motifs and scale in the dtypes they are stored in
    (`tensors`: the checkpoint's header entries), sharing dictionaries as recorded; tied layers are tied
    once their leader's mosaic is loaded."""
    specs = stored_dictionary_formats(specs, momos_config, tensors)
    motifs: dict[str, nn.Parameter] = {}
    for name, spec in sorted(specs.items(), key=lambda item: item[1].mosaic != item[0]):  # leaders first
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"MoMos layer {name} of the checkpoint is not a module of {type(model).__name__}"
            ) from None
        cls = LAYER_TYPES[spec.kind]
        if type(module) is not cls.replaces:
            raise ValueError(
                f"MoMos layer {name} is recorded as a {spec.kind} layer but the model has a {type(module).__name__} "
                "there"
            )
        expected = tuple(cls.matrix_of(module).shape)
        if expected != (spec.out_features, spec.in_features):
            raise ValueError(
                f"MoMos layer {name} is recorded as {spec.out_features}x{spec.in_features} but the model "
                f"config builds it as {expected[0]}x{expected[1]}: the checkpoint and its config.json disagree"
            )
        device = cls.matrix_of(module).device
        if spec.motifs not in motifs:  # in the dtype they were saved in, whatever dtype the model loads in
            motifs[spec.motifs] = nn.Parameter(torch.empty(spec.k, spec.s, device=device, dtype=spec.dictionary.dtype))
        mosaic = torch.empty(spec.out_features, num_blocks_per_row(spec.in_features, spec.s), device=device)
        scale = None
        if spec.scale and spec.mosaic == name:
            dtype = SAFETENSORS_DTYPES[tensors[f"{name}.scale"]["dtype"]]
            scale = nn.Parameter(torch.empty(spec.out_features, device=device, dtype=dtype))
        elif spec.scale:
            scale = model.get_submodule(spec.mosaic).scale
        layer = replace_with_momos(
            model,
            name,
            motifs=motifs[spec.motifs],
            mosaic=mosaic,
            scale=scale,
            zero_motif=momos_config.zero_motif,
            motif_bits=spec.dictionary.q_bits,
        )
        if spec.dictionary.q_bits is not None and spec.motifs == name:  # what the loader fills, decoded after it
            layer.register_buffer(
                "motif_codes",
                torch.empty(packed_size(spec.k * spec.s, spec.dictionary.q_bits), dtype=torch.uint8, device=device),
            )
            layer.register_buffer("motif_step", torch.empty(1, dtype=torch.float32, device=device))
    drop_momos_ties(model)


def check_complete(model: nn.Module, tensors: dict[str, dict]) -> None:
    """Every tensor the model will read from the checkpoint is in it, in the model's shape: Transformers would
    only warn about a missing one and leave it random. Tied targets and shared MoMos parts are filled from
    their source, and patterns the model lists as optional may be absent. (Called when the model is of the
    class the checkpoint was saved from: another class, say one with a new task head, starts that head
    afresh by design.)"""
    optional = [re.compile(pattern) for pattern in (model._keys_to_ignore_on_load_missing or ())]
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing, wrong = [], []
    for name, tensor in model.state_dict().items():
        if name in tied or any(pattern.search(name) for pattern in optional):
            continue
        if name not in tensors:
            missing.append(name)
        elif tensors[name]["shape"] != list(tensor.shape):
            wrong.append(name)
    if missing or wrong:
        raise ValueError(
            f"the MoMos checkpoint lacks {missing[:5]}: they would load as random weights"
            if missing
            else f"the MoMos checkpoint holds {wrong[:5]} in other shapes than its config.json builds"
        )


def merge_layers(model: nn.Module, dtype: Optional[torch.dtype] = None) -> None:
    """Replace every MoMos layer of `model` by a module of the type it replaced, holding the mosaic weight
    in `dtype`; tied layers become tied Transformers modules again."""
    layers = momos_layers(model)
    tied = any(layer.leader is not None for layer in layers.values())
    for name, layer in layers.items():
        model.set_submodule(name, layer.merge(dtype))
    if tied:
        model.tie_weights()  # from the config, which still says which weights are tied


def mark_momos_model(model: nn.Module, momos_config: MoMosConfig, base_model: str = "") -> None:
    """Make a model whose layers were just converted look like one loaded from a MoMos checkpoint: its
    config and quantizer say MoMos, and `save_pretrained` writes the compact checkpoint. The label goes on the
    model's own copy of its config: the caller's config object may build other, dense, models."""
    specs = {name: spec.to_dict() for name, spec in layer_specs(model).items()}
    quantization = MoMosQuantizationConfig(momos_config.to_dict(), specs, base_model=base_model)
    own_config(model)
    model.config.quantization_config = quantization
    model.hf_quantizer = MoMosHfQuantizer(quantization)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    enable_momos_save(model)


def own_config(model: nn.Module) -> None:
    """Give `model` a copy of its config (sub-configs included), which every submodule then refers to."""
    copies: dict[int, Any] = {}
    model.config = copy.deepcopy(model.config, copies)
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and id(config) in copies:
            module.config = copies[id(config)]


def unmark(model: nn.Module) -> None:
    """Undo `mark_momos_model` (or loading): the model is a plain Transformers model again."""
    for attribute in ("hf_quantizer", "quantization_method", "save_pretrained", "push_to_hub"):
        model.__dict__.pop(attribute, None)
    for attribute in ("quantization_config", "transformers_weights", "_is_quantized"):
        if attribute in model.config.__dict__:
            delattr(model.config, attribute)
    model.is_quantized = False


def enable_momos_save(model: nn.Module) -> None:
    # Instance attributes shadow `PreTrainedModel.save_pretrained` and `push_to_hub` for this model only, so
    # every caller (Trainer, user code) writes the compact checkpoint, and pushes it privately by default.
    model.save_pretrained = MethodType(save_momos_model, model)
    model.push_to_hub = MethodType(push_momos_model, model)


def save_momos_model(
    model: nn.Module,
    save_directory: Union[str, os.PathLike],
    is_main_process: bool = True,
    state_dict: Optional[dict[str, torch.Tensor]] = None,
    push_to_hub: bool = False,
    max_shard_size: Union[int, str] = "5GB",
    safe_serialization: bool = True,
    variant: Optional[str] = None,
    token: Optional[str] = None,
    tokenizer: Any = None,
    save_peft_format: bool = True,
    save_original_format: bool = True,
    distributed_checkpoint: bool = False,
    **hub_kwargs: Any,
) -> Optional[str]:
    """`save_pretrained` of a MoMos model: the compact checkpoint (see `momos_hf.checkpoint`), with the
    arguments of `PreTrainedModel.save_pretrained`. `push_to_hub=True` then uploads it (`repo_id`,
    `commit_message`, `revision`, `private`: a new repository is private unless `private=False`) and returns
    the commit URL. A model whose MoMos layers were all merged away (LoRA's `merge_and_unload`) is a plain
    Transformers model: it is unmarked and saved by `PreTrainedModel.save_pretrained`."""
    if not layer_specs(model):
        return save_merged_model(
            model,
            save_directory,
            tokenizer,
            is_main_process=is_main_process,
            state_dict=state_dict,
            push_to_hub=push_to_hub,
            max_shard_size=max_shard_size,
            safe_serialization=safe_serialization,
            variant=variant,
            token=token,
            save_peft_format=save_peft_format,
            save_original_format=save_original_format,
            **hub_kwargs,
        )
    if not safe_serialization:
        raise ValueError("MoMos checkpoints are safetensors only (safe_serialization=False is not supported)")
    if variant is not None or distributed_checkpoint:
        raise ValueError("MoMos checkpoints have no weight variants and no distributed-checkpoint form")
    unknown = set(hub_kwargs) - {"repo_id", "commit_message", "revision", "private", "create_pr"}
    if unknown:
        raise TypeError(f"save_pretrained() got unexpected keyword arguments {sorted(unknown)}")
    if not is_main_process:
        return None
    quantization = model.config.quantization_config
    if quantization.config.constrain_vectors:
        raise ValueError(
            "a model trained with constrain_vectors=True has no MoMos checkpoint form (its 1-D parameters' "
            "mosaics are not stored): save merge_and_unload()'s dense model instead"
        )
    directory = save_checkpoint(
        model,
        save_directory,
        quantization.momos_config,
        tokenizer,
        max_shard_size,
        quantization.base_model,
        state_dict,
    )
    if not push_to_hub:
        return None
    from .hub import push_folder  # imported here: loading a checkpoint needs neither the Hub nor the card code

    return push_folder(
        directory,
        hub_kwargs.get("repo_id") or Path(save_directory).resolve().name,
        private=hub_kwargs.get("private"),
        token=token,
        revision=hub_kwargs.get("revision"),
        commit_message=hub_kwargs.get("commit_message") or "Upload MoMos model",
    )


def save_merged_model(
    model: nn.Module, save_directory: Union[str, os.PathLike], tokenizer: Any = None, **kwargs: Any
) -> Optional[str]:
    """Save a model that holds no MoMos layer any more as the plain model it is (no quantization config, so it
    loads without momos-hf), its tokenizer beside it; a new Hub repository is private unless `private=False`."""
    if kwargs.get("push_to_hub") and tokenizer is not None:
        raise ValueError("a merged (dense) model is pushed without its tokenizer: push it with tokenizer.push_to_hub")
    if kwargs.get("push_to_hub"):
        kwargs.setdefault("private", True)
    unmark(model)
    url = model.save_pretrained(save_directory, **kwargs)
    if tokenizer is not None and kwargs.get("is_main_process", True):
        tokenizer.save_pretrained(save_directory)
    return url


def push_momos_model(
    model: nn.Module,
    repo_id: str,
    commit_message: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    revision: Optional[str] = None,
    max_shard_size: Union[int, str] = "5GB",
    tokenizer: Any = None,
    **unused: Any,
) -> str:
    """`push_to_hub` of a MoMos model: its compact checkpoint (and `tokenizer`) with a model card, uploaded
    as `momos_hf.integrations.hub.push_folder` does (allow-list; a new repository is private unless `private=False`).
    Returns the commit URL."""
    with tempfile.TemporaryDirectory() as folder:
        return save_momos_model(
            model,
            folder,
            max_shard_size=max_shard_size,
            tokenizer=tokenizer,
            push_to_hub=True,
            repo_id=repo_id,
            private=private,
            token=token,
            revision=revision,
            commit_message=commit_message,
        )


def register() -> None:
    """Make `from_pretrained` find the MoMos quantizer, and make every model and tokenizer `from_pretrained` of a
    local folder wait for a save into it (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(MoMosQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(MoMosHfQuantizer)
    # Transformers reads config.json before any quantizer hook and generation_config.json after the weights:
    # only a lock around the whole call keeps them from two different saves.
    # Each Auto class holds its own copy of `_BaseAutoModelClass.from_pretrained`.
    owners = (PreTrainedModel, PreTrainedTokenizerBase, transformers.AutoTokenizer, *_subclasses(_BaseAutoModelClass))
    for owner in owners:
        load = owner.__dict__.get("from_pretrained")
        if isinstance(load, classmethod) and not getattr(load.__func__, "_momos_locked", False):
            owner.from_pretrained = classmethod(_locked_load(load.__func__))


def _subclasses(cls: type) -> list[type]:
    return [cls] + [sub for direct in cls.__subclasses__() for sub in _subclasses(direct)]


def _locked_load(load: Any) -> Any:
    @functools.wraps(load)
    def locked(cls, *args: Any, **kwargs: Any) -> Any:
        path = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        if not isinstance(path, (str, os.PathLike)):
            return load(cls, *args, **kwargs)
        with load_lock(os.path.join(path, kwargs.get("subfolder") or "")):
            return load(cls, *args, **kwargs)

    locked._momos_locked = True
    return locked


def architecture_class(config: Any) -> type:
    """The Transformers model class named first in `config.architectures` (`AutoModel` when none is named)."""
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else transformers.AutoModel
    if not (
        isinstance(cls, type) and (issubclass(cls, transformers.PreTrainedModel) or cls is transformers.AutoModel)
    ):
        raise ValueError(
            f"config.json names {names[0]!r} as its architecture, which is not a Transformers model class"
        )
    return cls
