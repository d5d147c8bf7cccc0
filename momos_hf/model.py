"""`get_momos_model` / `MoMosModel`: find the target layers of a Transformers model, fit their motifs and
mosaics, swap in `MoMosLinear` modules, and undo it all with `merge_and_unload` (PEFT's tuner shape)."""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any, Iterable, Optional, Union

import torch
import transformers
from torch import nn
from transformers import AutoConfig
from transformers.pytorch_utils import Conv1D
from transformers.utils.logging import tqdm

from .checkpoint import QUANT_METHOD, local_weight_files, save_checkpoint, verify_files
from .calibration import input_second_moments
from .config import MoMosConfig
from .data_aware import fit_data_aware
from .fitting import fit_mosaic, num_blocks_per_row, reconstruct, relative_error
from .layer import MoMosLinear, assign_, full_tensor


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def in_repeated_block(name: str) -> bool:
    """True for modules inside an indexed stack of blocks (`layers.3.`, `h.0.`, `encoder.layer.5.`)."""
    return any(part.isdigit() for part in name.split("."))


def find_targets(model: nn.Module, target_modules: Optional[list[str] | str]) -> list[str]:
    """Full names of the modules that `target_modules` selects (see `MoMosConfig.target_modules`)."""
    output_embeddings = _output_embeddings(model)
    candidates = {
        name: module
        for name, module in model.named_modules()
        if is_linear_like(module) and module is not output_embeddings
    }
    if target_modules is None:
        targets = [name for name in candidates if in_repeated_block(name)]
    elif target_modules == "all-linear":
        targets = list(candidates)
    elif isinstance(target_modules, str):
        targets = [name for name, _ in model.named_modules() if re.fullmatch(target_modules, name)]
        _check_linear_like(model, targets)
    else:
        targets = match_names(model, target_modules, "target_modules")
        _check_linear_like(model, targets)
    if not targets:
        raise ValueError(
            f"target_modules={target_modules!r} selects no linear layer of {type(model).__name__}; "
            f"linear layers are named like {_leaf_names(candidates)}"
        )
    return targets


def match_names(model: nn.Module, entries: Iterable[str], option: str) -> list[str]:
    """Modules whose full name equals an entry or ends with `"." + entry`; every entry must match."""
    entries = list(entries)
    names = [name for name, _ in model.named_modules() if name]
    matched = [n for n in names if any(n == e or n.endswith("." + e) for e in entries)]
    unknown = [e for e in entries if not any(n == e or n.endswith("." + e) for n in names)]
    if unknown:
        linear = {n: m for n, m in model.named_modules() if is_linear_like(m)}
        raise ValueError(
            f"{option} {unknown} match no module of {type(model).__name__}; "
            f"its linear layers are named like {_leaf_names(linear)}"
        )
    return matched


class MoMosModel(nn.Module):
    """A Transformers model whose target layers are `MoMosLinear`; behaves like the model it wraps.

    Construction fits one dictionary per layer (or one for all, `motif_scope="global"`), replaces the
    layers, freezes everything except the motifs, scales and `modules_to_save` (as PEFT does), and leaves
    the model untouched if any check fails. A model that already holds MoMos layers (loaded from a MoMos
    checkpoint) is wrapped as it is.

    `calibration_data` (required by `init="data-aware"`): an iterable of model-input dicts whose inputs
    to each target layer are collected as `X^T X` before fitting (see `momos_hf.calibration`). In the
    `"projected"`/`"ste"` train modes these statistics are kept for later `project()` calls.
    """

    def __init__(
        self,
        model: nn.Module,
        config: MoMosConfig,
        fit_errors: Optional[dict[str, float]] = None,
        base_model_name: Optional[str] = None,
        calibration_data: Optional[Iterable[dict[str, Any]]] = None,
    ) -> None:
        super().__init__()
        self.base_model = model
        # Calls go straight to the base model, whose signature Trainer and pipelines read to pick inputs.
        self.forward = model.forward
        self.momos_config = config
        self.base_model_name = base_model_name if base_model_name is not None else getattr(model, "name_or_path", "")
        self.fit_errors: dict[str, float] = dict(fit_errors or {})
        self.modules_to_save = match_names(model, config.modules_to_save or [], "modules_to_save")
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self._second_moments: dict[str, torch.Tensor] = {}
        if calibration_data is not None and config.init != "data-aware":
            raise ValueError(f"calibration_data is only used by init='data-aware' (config has init={config.init!r})")
        originals = {} if self.momos_layers() else self._convert(calibration_data)
        if config.train_mode != "motifs":  # latent weights start from the dense weights where known
            for layer in self.momos_layers().values():
                if layer.latent is None:
                    layer.enable_latent(config.train_mode, originals.get(layer))
        self._mark_trainable()

    def _convert(self, calibration_data: Optional[Iterable[dict[str, Any]]]) -> dict[MoMosLinear, torch.Tensor]:
        """Fit and swap in every target layer; returns each new layer's dense weight `[out, in]`."""
        model, config = self.base_model, self.momos_config
        targets = find_targets(model, config.target_modules)
        overlap = sorted(set(targets) & set(self.modules_to_save))
        if overlap:
            raise ValueError(f"modules {overlap} are both MoMos targets and modules_to_save")
        originals = {name: model.get_submodule(name) for name in targets}
        for name, module in originals.items():
            if not torch.isfinite(module.weight).all():
                raise ValueError(f"weight of {name} has NaN or inf values; MoMos can only fit finite weights")
        if config.init == "data-aware":
            if calibration_data is None:
                raise ValueError("init='data-aware' needs calibration_data: an iterable of model-input dicts (e.g. tokenized batches)")
            self._second_moments = input_second_moments(model, targets, calibration_data)
        fitted = self._fit({name: _weight_out_in(m) for name, m in originals.items()})
        if config.train_mode == "motifs":  # no later projection will need them
            self._second_moments = {}
        dense = {}
        for name, (motifs, mosaic, scale) in fitted.items():
            layer = MoMosLinear.from_module(originals[name], motifs, mosaic, scale, config.zero_motif)
            dense[layer] = _weight_out_in(originals[name]).detach()
            self._set_submodule(name, layer)
        return dense

    # -- fitting -----------------------------------------------------------------------------------

    @torch.no_grad()
    def _fit(self, weights: dict[str, torch.Tensor]) -> dict[str, tuple[nn.Parameter, torch.Tensor, Optional[torch.Tensor]]]:
        """Fit every dictionary; returns `name -> (motifs, mosaic, scale)`; checks all before fitting."""
        config = self.momos_config
        names = list(weights)
        groups = [names] if config.motif_scope == "global" else [[n] for n in names]
        ks = [self._num_motifs(group, weights) for group in groups]
        fitted = {}
        for i, (group, k) in enumerate(tqdm(list(zip(groups, ks)), desc="MoMos fit", unit="dict")):
            matrices = [weights[n] for n in group]
            options = (config.kmeans_iters, config.seed + i, config.zero_motif, config.scale, config.max_assign_bytes)
            if config.init == "data-aware":
                fit = fit_data_aware(matrices, self._moments_of(group), k, config.s, *options)
            else:
                fit = fit_mosaic(matrices, k, config.s, config.init, *options)
            dtype = config.torch_motif_dtype or matrices[0].dtype
            motifs = nn.Parameter(fit.motifs.to(dtype))
            for name, matrix, mosaic, scale in zip(group, matrices, fit.mosaics, fit.scales):
                fitted[name] = (motifs, mosaic, scale)
                approx = reconstruct(fit.motifs, mosaic, matrix.shape[1], scale)
                self.fit_errors[name] = relative_error(matrix, approx)
        return fitted

    def _moments_of(self, group: list[str]) -> list[torch.Tensor]:
        missing = [n for n in group if n not in self._second_moments]
        if missing:
            raise ValueError(f"init='data-aware' has no calibration statistics for {missing[:3]} (a model loaded from a "
                             "checkpoint has none): convert with calibration_data, or refit with init='kmeans'")
        return [self._second_moments[n] for n in group]

    def _num_motifs(self, group: list[str], weights: dict[str, torch.Tensor]) -> int:
        s = self.momos_config.s
        n_blocks = sum(weights[n].shape[0] * num_blocks_per_row(weights[n].shape[1], s) for n in group)
        k = self.momos_config.num_motifs(n_blocks)
        if k > n_blocks:
            shapes = ", ".join(f"{n} {tuple(weights[n].shape)}" for n in group[:3])
            raise ValueError(
                f"k={k} motifs do not fit: {shapes}{' ...' if len(group) > 3 else ''} has only {n_blocks} blocks "
                f"of s={s} values; use k <= {n_blocks}, a smaller s, motif_scope='global', or capacity"
            )
        return k

    @torch.no_grad()
    def project(self) -> dict[str, float]:
        """Refit motifs and mosaics from the current weights (the paper's projection step).

        The current weight is the latent weight where there is one (`"projected"`/`"ste"`), else the
        mosaic weight. In `"projected"` mode the latent weight then snaps onto the new mosaic weight.
        Parameters are updated in place, so optimizers keep referring to them. Returns the relative
        error of each layer's new fit against its weight before the projection.
        """
        layers = self.momos_layers()
        current = {name: layer.dense_weight() if layer.latent is None else full_tensor(layer.latent) for name, layer in layers.items()}
        fitted = self._fit(current)
        for name, (motifs, mosaic, scale) in fitted.items():
            layer = layers[name]
            assign_(layer.motifs, motifs)
            layer.set_mosaic(mosaic)
            if scale is not None:
                assign_(layer.scale, scale)
            if layer.train_mode == "projected":
                assign_(layer.latent, layer.dense_weight())
        return dict(self.fit_errors)

    # -- checkpoints -------------------------------------------------------------------------------

    def save_pretrained(
        self,
        save_directory: Union[str, os.PathLike],
        tokenizer: Any = None,
        max_shard_size: Union[int, str] = "5GB",
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        """Write the compact checkpoint (see `momos_hf.checkpoint`); any `from_pretrained` loads it back.

        `state_dict`: the full state dict when the model is sharded (e.g. `accelerator.get_state_dict`);
        keys may carry this wrapper's `base_model.` prefix."""
        if state_dict is not None:
            state_dict = {name.removeprefix("base_model."): tensor for name, tensor in state_dict.items()}
        save_checkpoint(
            self.base_model, save_directory, self.momos_config.to_dict(), self.fit_errors, tokenizer, max_shard_size,
            self.base_model_name, state_dict,
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
        """Save the compact checkpoint with a model card and upload it to the Hub (`HF_ENDPOINT`);
        returns the commit URL."""
        from .hub import push_folder

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, tokenizer, max_shard_size)
            return push_folder(tmp, repo_id, private=private, token=token, revision=revision, commit_message=commit_message)

    @classmethod
    def from_pretrained(cls, model_id: Union[str, os.PathLike], model_class: Any = None, **kwargs: Any) -> "MoMosModel":
        """Load a MoMos checkpoint (local folder or Hub id) and wrap it. `model_class` defaults to the
        architecture recorded in its `config.json`; `kwargs` go to `from_pretrained` (dtype, revision, ...)."""
        config = AutoConfig.from_pretrained(model_id, **{k: v for k, v in kwargs.items() if k in ("revision", "token")})
        quantization = getattr(config, "quantization_config", None) or {}
        if dict(quantization).get("quant_method") != QUANT_METHOD:
            raise ValueError(f"{model_id} is not a MoMos checkpoint: its config.json has no quantization_config with quant_method 'momos'")
        if os.path.isdir(model_id):  # check before Transformers reads them: its errors do not name the file
            verify_files(local_weight_files(model_id), dict(quantization).get("checksums", {}))
        model = (model_class or architecture_class(config)).from_pretrained(model_id, **kwargs)
        quantization = model.config.quantization_config
        fit_errors = {n: spec["fit_error"] for n, spec in quantization.layers.items() if "fit_error" in spec}
        return cls(model, quantization.config, fit_errors, quantization.base_model)

    # -- PEFT-style API ----------------------------------------------------------------------------

    def momos_layers(self) -> dict[str, MoMosLinear]:
        """Every `MoMosLinear` of the model by full name (names relative to the base model)."""
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, MoMosLinear)}

    def cache_weights(self, enabled: bool = True) -> None:
        """Keep each layer's reconstructed dense weight for inference throughput (dense memory), or drop
        it and compute from motifs and mosaic again (`MoMosLinear.forward` says which product runs)."""
        for layer in self.momos_layers().values():
            layer.cache_weight = enabled
            layer._cached = None

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """`(trainable, total)` parameter counts; a shared dictionary counts once."""
        params = list(self.base_model.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def merge_and_unload(self) -> nn.Module:
        """Replace every MoMos layer by a plain `nn.Linear`/`Conv1D` holding the mosaic weight and return
        the base model, with the `requires_grad` flags it had before conversion."""
        for name, layer in self.momos_layers().items():
            self._set_submodule(name, layer.merge())
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

    # -- plumbing ----------------------------------------------------------------------------------

    def _set_submodule(self, name: str, module: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        setattr(self.base_model.get_submodule(parent_name), child, module)

    def _mark_trainable(self) -> None:
        """`motifs` mode: motifs, scales and modules_to_save train. `projected`/`ste`: every parameter
        trains except motifs and scales, which projections refit."""
        latent_mode = self.momos_config.train_mode != "motifs"
        for param in self.base_model.parameters():
            param.requires_grad_(latent_mode)
        for layer in self.momos_layers().values():
            layer.motifs.requires_grad_(not latent_mode)
            if layer.scale is not None:
                layer.scale.requires_grad_(not latent_mode)
        for name in self.modules_to_save:
            self.base_model.get_submodule(name).requires_grad_(True)


def get_momos_model(
    model: nn.Module, config: MoMosConfig, calibration_data: Optional[Iterable[dict[str, Any]]] = None
) -> MoMosModel:
    """Convert the target layers of `model` (in place) to MoMos layers and wrap it in a `MoMosModel`.

    `calibration_data`, for `init="data-aware"`: an iterable of model-input dicts (tokenizer outputs,
    DataLoader batches); a few hundred sequences are enough. It is iterated once."""
    return MoMosModel(model, config, calibration_data=calibration_data)


def architecture_class(config: Any) -> type:
    """The Transformers class named first in `config.architectures` (`AutoModel` when none is named)."""
    names = getattr(config, "architectures", None) or []
    return getattr(transformers, names[0], transformers.AutoModel) if names else transformers.AutoModel


def _weight_out_in(module: nn.Module) -> torch.Tensor:
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def _output_embeddings(model: nn.Module) -> Optional[nn.Module]:
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if callable(getter) else None


def _check_linear_like(model: nn.Module, names: list[str]) -> None:
    wrong = [f"{n} ({type(model.get_submodule(n)).__name__})" for n in names if not is_linear_like(model.get_submodule(n))]
    if wrong:
        raise ValueError(f"target_modules selects modules that are not nn.Linear or Conv1D: {wrong}")


def _leaf_names(modules: dict[str, nn.Module]) -> list[str]:
    return sorted({name.rpartition(".")[2] for name in modules})
