"""`get_momos_model` / `MoMosModel`: fit motifs and mosaics to the target layers of a Transformers model, swap
in MoMos layers, refit them (`project`), and undo it all with `merge_and_unload` (PEFT's tuner shape)."""

from __future__ import annotations

import os
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn
from transformers import AutoConfig

from .checkpoint.save import load_lock
from .checkpoint.schema import QUANT_METHOD
from .checkpoint.verify import read_checkpoint_config
from .config import FIT_FIELDS, MoMosConfig
from .convert.converter import DEFAULT_ACTIVATION_BYTES, DEFAULT_ASSIGN_BYTES, ConversionOptions, Converter
from .convert.targets import find_targets, match_names
from .fit.methods import NEEDS_INPUT_MOMENTS
from .integrations.quantizer import (
    MoMosQuantizationConfig,
    architecture_class,
    mark_momos_model,
    merge_layers,
    push_momos_model,
    save_momos_model,
    unmark,
)
from .layer import (
    MoMosLayer,
    assign_,
    cast_parameters,
    full_tensor,
    layer_class_for,
    momos_layers,
    untouched_dtype,
)


class MoMosModel(nn.Module):
    """A Transformers model whose target layers are MoMos layers; behaves like the model it wraps.

    Construction fits one dictionary per layer (or one for all, `motif_scope="global"`), replaces the
    layers in place, freezes everything except the motifs, scales and `modules_to_save` (as PEFT does), and
    leaves the model untouched if any check fails. Tied input and output embeddings become one dictionary,
    mosaic and scale. The converted model then carries the MoMos quantizer and config like one loaded from a
    MoMos checkpoint, so `model.save_pretrained` writes the compact checkpoint and `Trainer(model=
    mm.base_model)` saves it too.

    A model that already holds MoMos layers (loaded from a MoMos checkpoint, or converted earlier) is
    wrapped as it is: with `config=None` nothing about it changes; a `config` may change the training
    settings (`train_mode`, `project_every`, `modules_to_save`), but one that asks for another fit than the
    layers hold is refused, since the layers would not match it.

    `calibration_data` (needed by fits that read input moments, `fit="data-aware"`): an iterable of
    model-input dicts whose inputs to each target layer are collected as `X^T X` before fitting (see
    `momos_hf.convert.calibration`); in the `"projected"`/`"ste"` train modes each layer keeps its moment for later
    `project()` calls. `dtype`: cast every parameter to this dtype after the fit (motifs too, unless
    `motif_dtype` is set). `max_assign_bytes`: memory budget of one chunk of the block-to-motif distance
    matrix (a property of the machine, not of the model: it is not saved).

    `sequential`, `activation_budget_bytes`, `offload_folder`, `resume_folder`: how the conversion runs
    (`momos_hf.convert.ConversionOptions`); runtime choices, not saved.
    """

    def __init__(
        self,
        model: nn.Module,
        config: Optional[MoMosConfig] = None,
        base_model_name: Optional[str] = None,
        calibration_data: Optional[Iterable[dict[str, Any]]] = None,
        dtype: Optional[torch.dtype] = None,
        max_assign_bytes: int = DEFAULT_ASSIGN_BYTES,
        sequential: bool = False,
        activation_budget_bytes: int = DEFAULT_ACTIVATION_BYTES,
        offload_folder: Optional[str] = None,
        resume_folder: Optional[str] = None,
    ) -> None:
        super().__init__()
        if isinstance(model, MoMosModel):
            raise ValueError("the model is already a MoMosModel; refit it with .project(), or convert the dense model")
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if config is not None:
            if not isinstance(config, MoMosConfig):
                raise ValueError(f"config must be a MoMosConfig, got {type(config).__name__}")
            config = MoMosConfig.from_dict(config.to_dict())  # checked again: its fields may have changed since
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.base_model = model
        # Calls go straight to the base model, whose signature Trainer and pipelines read to pick inputs.
        self.forward = model.forward
        options = ConversionOptions(
            max_assign_bytes=max_assign_bytes,
            sequential=sequential,
            activation_budget_bytes=activation_budget_bytes,
            offload_folder=offload_folder,
            resume_folder=resume_folder,
            dtype=dtype,
        )
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        recorded = getattr(getattr(model, "config", None), "quantization_config", None)
        if momos_layers(model):
            if not isinstance(recorded, MoMosQuantizationConfig) and config is None:
                raise ValueError("the model holds MoMos layers but no MoMos quantization config: pass its MoMosConfig")
            if isinstance(recorded, MoMosQuantizationConfig) and config is not None:
                _check_same_fit(recorded.config, config)
            self.momos_config = config or recorded.config
            self.modules_to_save = match_names(model, self.momos_config.modules_to_save or [], "modules_to_save")
            self._converter = Converter(model, self.momos_config, options, self.modules_to_save)
            if calibration_data is not None:
                raise ValueError(
                    "calibration_data is for converting a dense model; this one holds MoMos layers already"
                )
            if config is None:
                return
            originals = {}
        else:
            if config is None:
                raise ValueError("converting a model needs a MoMosConfig")
            if calibration_data is not None and config.fit not in NEEDS_INPUT_MOMENTS:
                raise ValueError(f"calibration_data is only used by fit='data-aware' (config has fit={config.fit!r})")
            self.momos_config = config
            self.modules_to_save = match_names(model, config.modules_to_save or [], "modules_to_save")
            self._converter = Converter(model, config, options, self.modules_to_save)
            if dtype is not None:
                _check_cast(model, dtype, config.target_modules)
            originals = self._converter.convert(calibration_data)
            if hasattr(model, "config"):  # a Transformers model (plain torch modules have nothing to save it with)
                name = base_model_name if base_model_name is not None else getattr(model, "name_or_path", "")
                mark_momos_model(model, config, name)
            if dtype is not None:
                cast_parameters(model, dtype, config.torch_motif_dtype)
        if self.momos_config.train_mode != "motifs":
            _enable_latents(self.momos_layers().values(), self.momos_config.train_mode, originals)
        _mark_trainable(model, self.momos_config.train_mode, self.modules_to_save)

    @property
    def fit_errors(self) -> dict[str, float]:
        """Relative error of each layer's conversion against the dense weight it replaced (saved with the
        checkpoint; layers loaded without that record are left out). `project()` keeps it and returns its
        refits' own errors."""
        return {name: layer.fit_error for name, layer in self.momos_layers().items() if layer.fit_error is not None}

    @property
    def base_model_name(self) -> str:
        return self.base_model.config.quantization_config.base_model

    @base_model_name.setter
    def base_model_name(self, name: str) -> None:
        self.base_model.config.quantization_config.base_model = name

    @property
    def vector_mosaics(self) -> dict[str, torch.Tensor]:
        """Under `constrain_vectors`: the mosaic `[1, nb]` of each 1-D parameter by full name."""
        return self._converter.vector_mosaics

    @torch.no_grad()
    def project(self) -> dict[str, float]:
        """Refit motifs and mosaics from the current weights (the paper's projection step).

        The current weight is the latent weight where there is one (`"projected"`/`"ste"`), else the
        mosaic weight. In `"projected"` mode the latent weight then snaps onto the new mosaic weight, and so
        do the 1-D parameters under `constrain_vectors` (fitted with the matrices, in the one dictionary).
        Parameters are updated in place, so optimizers keep referring to them; tied layers follow their
        leader. Returns the relative error of each layer's new fit against its weight before the projection
        (`fit_errors` keeps the conversion's error against the dense weights).
        """
        layers = self.momos_layers()
        leaders = {name: layer for name, layer in layers.items() if layer.leader is None}
        current = {
            name: layer.mosaic_weight() if layer.latent is None else full_tensor(layer.latent)
            for name, layer in leaders.items()
        }
        moments = None
        if self.momos_config.fit in NEEDS_INPUT_MOMENTS:
            missing = [name for name, layer in leaders.items() if layer.input_moment is None]
            if missing:
                raise ValueError(
                    f"fit={self.momos_config.fit!r} has no calibration statistics for {missing[:3]} (a model "
                    "loaded from a checkpoint has none): convert with calibration_data, or refit with fit='kmeans'"
                )
            moments = {name: layer.input_moment for name, layer in leaders.items()}
        vectors = self._converter.vectors()
        fitted = self._converter.fit(
            {**current, **{name: full_tensor(v).view(1, -1) for name, v in vectors.items()}}, moments
        )
        self._converter.snap_vectors(vectors, fitted)
        for name, layer in leaders.items():
            fit = fitted[name]
            assign_(layer.motifs, fit.motifs)
            layer.set_mosaic(fit.mosaic)
            if fit.scale is not None:
                assign_(layer.scale, fit.scale)
            if layer.train_mode == "projected":
                assign_(layer.latent, layer.mosaic_weight())
        errors = {name: fitted[name].error for name in leaders}
        leader_names = {layer: name for name, layer in leaders.items()}
        for name, layer in layers.items():
            if layer.leader is not None:
                layer.set_mosaic(layer.leader.mosaic)
                errors[name] = errors[leader_names[layer.leader]]
        return errors

    # -- checkpoints -------------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: Union[str, os.PathLike],
        tokenizer: Any = None,
        max_shard_size: Union[int, str] = "5GB",
        state_dict: Optional[dict[str, torch.Tensor]] = None,
        **kwargs: Any,
    ) -> None:
        """Write the compact checkpoint (see `momos_hf.checkpoint`); any `from_pretrained` loads it back.

        `state_dict`: the full state dict when the model is sharded (e.g. `accelerator.get_state_dict`);
        keys may carry this wrapper's `base_model.` prefix. Other keyword arguments are those of
        `PreTrainedModel.save_pretrained` (`is_main_process`, `push_to_hub`, `safe_serialization`, ...)."""
        if state_dict is not None:
            state_dict = {name.removeprefix("base_model."): tensor for name, tensor in state_dict.items()}
        save_momos_model(
            self.base_model,
            save_directory,
            state_dict=state_dict,
            max_shard_size=max_shard_size,
            tokenizer=tokenizer,
            **kwargs,
        )

    def push_to_hub(
        self,
        repo_id: str,
        tokenizer: Any = None,
        private: Optional[bool] = None,
        token: Optional[str] = None,
        revision: Optional[str] = None,
        commit_message: str = "Upload MoMos model",
        max_shard_size: Union[int, str] = "5GB",
    ) -> str:
        """Save the compact checkpoint with a model card and upload it to the Hub (`HF_ENDPOINT`); a new
        repository is private unless `private=False`. Returns the commit URL."""
        return push_momos_model(
            self.base_model, repo_id, commit_message, private, token, revision, max_shard_size, tokenizer
        )

    @classmethod
    def from_pretrained(
        cls, model_id: Union[str, os.PathLike], model_class: Any = None, **kwargs: Any
    ) -> "MoMosModel":
        """Load a MoMos checkpoint (local folder or Hub id) and wrap it. `model_class` defaults to the
        architecture recorded in its `config.json`; `kwargs` go to `from_pretrained` (dtype, revision, ...)."""
        with load_lock(model_id):  # every file read below comes from one save
            if os.path.isdir(model_id):  # checked before Transformers reads it, whose errors would not name it
                read_checkpoint_config(model_id)
            config = AutoConfig.from_pretrained(
                model_id, **{k: v for k, v in kwargs.items() if k in ("revision", "token")}
            )
            quantization = getattr(config, "quantization_config", None) or {}
            if dict(quantization).get("quant_method") != QUANT_METHOD:
                raise ValueError(
                    f"{model_id} is not a MoMos checkpoint: its config.json has no quantization_config with "
                    "quant_method 'momos'"
                )
            model = (model_class or architecture_class(config)).from_pretrained(model_id, **kwargs)
        return cls(model, model.config.quantization_config.config)

    # -- PEFT-style API ----------------------------------------------------------------------------

    def momos_layers(self) -> dict[str, MoMosLayer]:
        """Every MoMos layer of the model by full name (names relative to the base model)."""
        return momos_layers(self.base_model)

    def cache_weights(self, enabled: bool = True) -> None:
        """Keep each layer's reconstructed weight for inference throughput (dense memory), or drop it and
        compute from motifs and mosaic again (`momos_hf.kernels.products` says which product runs)."""
        for layer in self.momos_layers().values():
            layer.weight_cache_enabled = enabled
            layer.clear_weight_cache()

    def set_product(self, product: Optional[str]) -> None:
        """Force one product (a name in `momos_hf.kernels.products.PRODUCTS`) in every layer, or `None` to let each
        call choose."""
        for layer in self.momos_layers().values():
            layer.product = product

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """`(trainable, total)` parameter counts. As PEFT counts packed 4-bit weights, `total` counts each
        MoMos matrix as the dense weight it stands for (`out * in`, once for tied layers); trainable counts
        what the optimizer updates (motifs once per dictionary, scales, latent weights, `modules_to_save`)."""
        layers = self.momos_layers().values()
        momos_params = {id(p) for layer in layers for p in (layer.motifs, layer.scale, layer.latent) if p is not None}
        params = list(self.base_model.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        matrices = sum(layer.out_features * layer.in_features for layer in layers if layer.leader is None)
        return trainable, sum(p.numel() for p in params if id(p) not in momos_params) + matrices

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def merge_and_unload(self) -> nn.Module:
        """Replace every MoMos layer by a module of the type it replaced holding the mosaic weight, and return
        the base model as a plain Transformers model (no MoMos config or quantizer: it saves and reloads as
        a dense one; tied embeddings are tied again), with the `requires_grad` flags it had before conversion."""
        merge_layers(self.base_model, untouched_dtype(self.base_model))
        if hasattr(self.base_model, "config"):
            unmark(self.base_model)
        for name, param in self.base_model.named_parameters():
            param.requires_grad_(self._requires_grad.get(name, True))
        return self.base_model

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)


def get_momos_model(
    model: nn.Module,
    config: MoMosConfig,
    calibration_data: Optional[Iterable[dict[str, Any]]] = None,
    dtype: Optional[torch.dtype] = None,
    max_assign_bytes: int = DEFAULT_ASSIGN_BYTES,
    sequential: bool = False,
    activation_budget_bytes: int = DEFAULT_ACTIVATION_BYTES,
    offload_folder: Optional[str] = None,
    resume_folder: Optional[str] = None,
) -> MoMosModel:
    """Convert the target layers of `model` (in place) to MoMos layers and wrap it in a `MoMosModel`.

    `calibration_data`, for `fit="data-aware"`: an iterable of model-input dicts (tokenizer outputs,
    DataLoader batches); a few hundred sequences are enough. It is iterated once (kept as a list with
    `sequential`). `dtype`: cast the converted model's parameters to it after the fit. `max_assign_bytes`,
    `sequential`, `activation_budget_bytes`, `offload_folder`, `resume_folder`: see `MoMosModel`. A model that holds
    MoMos layers already is refused unless `config` asks for the fit it has (then it is wrapped as it is)."""
    return MoMosModel(
        model,
        config,
        calibration_data=calibration_data,
        dtype=dtype,
        max_assign_bytes=max_assign_bytes,
        sequential=sequential,
        activation_budget_bytes=activation_budget_bytes,
        offload_folder=offload_folder,
        resume_folder=resume_folder,
    )


def _check_cast(model: nn.Module, dtype: torch.dtype, target_modules: Any) -> None:
    """Refuse, before the conversion, a cast to `dtype` that would make a parameter the conversion keeps (all
    but the targets' matrices, which become motifs: the converter checks those) infinite."""
    replaced = set()
    for name in find_targets(model, target_modules):
        module = model.get_submodule(name)
        replaced.add(id(layer_class_for(module).matrix_of(module)))
    for name, param in model.named_parameters():
        if (
            param.is_floating_point()
            and id(param) not in replaced
            and torch.isfinite(param).all()
            and not torch.isfinite(param.to(dtype)).all()
        ):
            raise ValueError(f"{name} overflows {dtype}: its values are too large for it; keep them in float32")


def _check_same_fit(recorded: MoMosConfig, requested: MoMosConfig) -> None:
    recorded_fit, requested_fit = ({f: getattr(c, f) for f in FIT_FIELDS} for c in (recorded, requested))
    if recorded_fit != requested_fit:
        changed = {f: (recorded_fit[f], requested_fit[f]) for f in FIT_FIELDS if recorded_fit[f] != requested_fit[f]}
        raise ValueError(
            "the model holds MoMos layers fitted with other settings "
            f"({', '.join(f'{f}={a!r}, not {b!r}' for f, (a, b) in changed.items())}); "
            "converting twice would mislabel them: convert the dense model instead"
        )


def _enable_latents(layers: Iterable[MoMosLayer], train_mode: str, originals: dict[MoMosLayer, torch.Tensor]) -> None:
    """Latent weights for `projected`/`ste`, starting from the dense weights where known; a tied layer shares
    its leader's."""
    layers = list(layers)
    for layer in layers:
        if layer.latent is None and layer.leader is None:
            layer.enable_latent(train_mode, originals.get(layer))
    for layer in layers:
        if layer.leader is not None:
            layer.latent, layer.train_mode = layer.leader.latent, layer.leader.train_mode


def _mark_trainable(model: nn.Module, train_mode: str, modules_to_save: list[str]) -> None:
    """`motifs` mode: motifs, scales and modules_to_save train. `projected`/`ste`: every parameter trains except
    motifs and scales, which projections refit."""
    latent_mode = train_mode != "motifs"
    for param in model.parameters():
        param.requires_grad_(latent_mode)
    for layer in momos_layers(model).values():
        layer.motifs.requires_grad_(not latent_mode)
        if layer.scale is not None:
            layer.scale.requires_grad_(not latent_mode)
    for name in modules_to_save:
        model.get_submodule(name).requires_grad_(True)
