"""`get_momos_model` / `MoMosModel`: fit motifs and mosaics to the target layers of a Transformers model, swap
in MoMos layers, refit them (`project`), and undo it all with `merge_and_unload` (PEFT's tuner shape)."""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Optional, Union

import torch
import transformers
from torch import nn
from transformers import AutoConfig
from transformers.utils.logging import tqdm

from .calibration import ActivationStore, block_by_block, input_moments
from .checkpoint import QUANT_METHOD, read_checkpoint_config
from .config import FIT_FIELDS, MoMosConfig
from .fits import FIT_METHODS, NEEDS_INPUT_MOMENTS
from .fitting import FitOptions, dictionary_bits, index_bits, num_blocks_per_row, quantize_motifs, reconstruct, relative_error
from .layer import MoMosLayer, assign_, full_tensor, layer_class_for, momos_layers, replace_with_momos
from .resume import BlockResults, conversion_key
from .quantizer import MoMosQuantizationConfig, drop_momos_ties, mark_momos_model, merge_layers, push_momos_model, save_momos_model, unmark
from .targets import block_stack, find_targets, match_names, tie_groups

DEFAULT_ASSIGN_BYTES = 256 * 2**20
DEFAULT_ACTIVATION_BYTES = 2 * 2**30


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
    `momos_hf.calibration`); in the `"projected"`/`"ste"` train modes each layer keeps its moment for later
    `project()` calls. `dtype`: cast every parameter to this dtype after the fit (motifs too, unless
    `motif_dtype` is set). `max_assign_bytes`: memory budget of one chunk of the block-to-motif distance
    matrix (a property of the machine, not of the model: it is not saved).

    `sequential` (data-aware fits, one dictionary per layer): convert the model's stack of blocks one block at
    a time, each calibrated on the outputs of the blocks converted before it (GPTQ's order), holding one
    block's input moments at a time; the hidden states between blocks stay in memory up to
    `activation_budget_bytes` and go to a temporary folder under `offload_folder` (default: the system's)
    past it. With `resume_folder`, each block's fit is saved there as it finishes, and a rerun of the same
    conversion (model, settings, calibration) reuses the blocks found there instead of fitting them again
    (`momos_hf.resume`). Runtime choices, not saved.
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
        self.max_assign_bytes = max_assign_bytes
        self.sequential, self.activation_budget_bytes, self.offload_folder = sequential, activation_budget_bytes, offload_folder
        if resume_folder is not None and not sequential:
            raise ValueError("resume_folder keeps the blocks of a sequential conversion: use sequential=True")
        self.resume_folder = resume_folder
        self.vector_mosaics: dict[str, torch.Tensor] = {}  # constrain_vectors: each 1-D parameter's mosaic [1, nb]
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        recorded = getattr(getattr(model, "config", None), "quantization_config", None)
        if momos_layers(model):
            if not isinstance(recorded, MoMosQuantizationConfig) and config is None:
                raise ValueError("the model holds MoMos layers but no MoMos quantization config: pass its MoMosConfig")
            if isinstance(recorded, MoMosQuantizationConfig) and config is not None:
                _check_same_fit(recorded.config, config)
            self.momos_config = config or recorded.config
            self.modules_to_save = match_names(model, self.momos_config.modules_to_save or [], "modules_to_save")
            if calibration_data is not None:
                raise ValueError("calibration_data is for converting a dense model; this one holds MoMos layers already")
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
            originals = self._convert(calibration_data)
            if hasattr(model, "config"):  # a Transformers model (plain torch modules have nothing to save it with)
                name = base_model_name if base_model_name is not None else getattr(model, "name_or_path", "")
                mark_momos_model(model, config, name)
            if dtype is not None:
                _cast_parameters(model, dtype, config.torch_motif_dtype)
        if self.momos_config.train_mode != "motifs":
            self._enable_latents(originals)
        self._mark_trainable()

    @property
    def fit_errors(self) -> dict[str, float]:
        """Relative weight error of each layer's last fit (layers loaded without that record are left out)."""
        return {name: layer.fit_error for name, layer in self.momos_layers().items() if layer.fit_error is not None}

    @property
    def base_model_name(self) -> str:
        return self.base_model.config.quantization_config.base_model

    @base_model_name.setter
    def base_model_name(self, name: str) -> None:
        self.base_model.config.quantization_config.base_model = name

    # -- conversion --------------------------------------------------------------------------------

    def _convert(self, calibration_data: Optional[Iterable[dict[str, Any]]]) -> dict[MoMosLayer, torch.Tensor]:
        """Fit and swap in every target layer; returns each new layer's original matrix `[out, in]`."""
        model, config = self.base_model, self.momos_config
        targets = find_targets(model, config.target_modules)
        overlap = sorted(set(targets) & set(self.modules_to_save))
        if overlap:
            raise ValueError(f"modules {overlap} are both MoMos targets and modules_to_save")
        ties = tie_groups(model, targets)
        originals = {name: model.get_submodule(name) for name in targets}
        matrices = {name: layer_class_for(module).matrix_of(module) for name, module in originals.items() if name not in ties}
        for name, matrix in matrices.items():
            if not torch.isfinite(matrix).all():
                raise ValueError(f"weight of {name} has NaN or inf values; MoMos can only fit finite weights")
        self._check_compresses(matrices)
        vectors = self._vectors()
        if config.fit in NEEDS_INPUT_MOMENTS and self.sequential:
            fitted, layers = self._convert_sequentially(calibration_data, matrices, originals, ties)
        else:
            moments = self._calibrate(calibration_data, originals, ties) if config.fit in NEEDS_INPUT_MOMENTS else None
            fitted = self._fit({**matrices, **{name: vector.view(1, -1) for name, vector in vectors.items()}}, moments)
            layers = self._swap_in({name: fit for name, fit in fitted.items() if name not in vectors}, moments)
            self._snap_vectors(vectors, fitted)
        for name, leader in ties.items():
            layers[name] = replace_with_momos(model, name, layers[leader].motifs, layers[leader].mosaic.clone(),
                                              layers[leader].scale, config.zero_motif, config.motif_bits)
            layers[name].tie_to(layers[leader])
            fitted[name] = fitted[leader]
        for name, layer in layers.items():
            layer.fit_error = fitted[name][3]
        if ties:
            drop_momos_ties(model)
        return {layers[name]: matrix.detach() for name, matrix in matrices.items()}

    def _swap_in(self, fitted: dict[str, tuple], moments: Optional[dict[str, torch.Tensor]]) -> dict[str, MoMosLayer]:
        """Replace each fitted module by its MoMos layer; in the `"projected"`/`"ste"` modes a layer keeps its
        input moment, since later projections refit in the same metric."""
        config, layers = self.momos_config, {}
        for name, (motifs, mosaic, scale, _) in fitted.items():
            layers[name] = replace_with_momos(self.base_model, name, motifs, mosaic, scale, config.zero_motif, config.motif_bits)
            if moments is not None and config.train_mode != "motifs":
                layers[name].input_moment = moments[name]
        return layers

    def _vectors(self) -> dict[str, nn.Parameter]:
        """The 1-D parameters `constrain_vectors` puts on the dictionary (biases, norm weights and biases), by
        full name; none without that setting. `modules_to_save` stay dense."""
        if not self.momos_config.constrain_vectors:
            return {}
        kept = {id(p) for name in self.modules_to_save for p in self.base_model.get_submodule(name).parameters()}
        return {name: p for name, p in self.base_model.named_parameters() if p.ndim == 1 and id(p) not in kept}

    @torch.no_grad()
    def _snap_vectors(self, vectors: dict[str, nn.Parameter], fitted: dict[str, tuple]) -> None:
        """Set each constrained vector to its mosaic's values (the projection) and keep the mosaic."""
        for name, vector in vectors.items():
            motifs, mosaic = fitted[name][:2]
            motifs = quantize_motifs(motifs, self.momos_config.motif_bits) if self.momos_config.motif_bits else motifs
            assign_(vector, reconstruct(motifs, mosaic, vector.numel()).reshape(vector.shape))
            self.vector_mosaics[name] = mosaic

    def _convert_sequentially(self, calibration_data: Optional[Iterable[dict[str, Any]]], matrices: dict[str, torch.Tensor],
                              originals: dict[str, nn.Module], ties: dict[str, str]) -> tuple[dict[str, tuple], dict[str, MoMosLayer]]:
        """Data-aware conversion block by block (see `momos_hf.calibration`): each block of the model's stack is
        calibrated on the outputs of the blocks already converted, holding one block's input moments at a
        time; the targets outside the stack (embeddings, heads) are calibrated last, on the converted model."""
        if calibration_data is None:
            raise ValueError(f"fit={self.momos_config.fit!r} needs calibration_data: an iterable of model-input dicts "
                             "(e.g. tokenized batches)")
        if self.momos_config.motif_scope == "global":
            raise ValueError("sequential calibration fits one block at a time; motif_scope='global' fits one dictionary "
                             "for all layers at once: use sequential=False")
        model, batches = self.base_model, list(calibration_data)
        stack_name = block_stack(model, list(matrices))
        if stack_name is None:
            raise ValueError(f"sequential calibration needs the targets inside a stack of blocks (an nn.ModuleList); "
                             f"{type(model).__name__} has none holding them: use sequential=False")
        stack = model.get_submodule(stack_name)
        fitted: dict[str, tuple] = {}
        layers: dict[str, MoMosLayer] = {}
        store = ActivationStore(self.activation_budget_bytes, self.offload_folder)
        by_block = [[n for n in matrices if n.startswith(f"{stack_name}.{i}.")] for i in range(len(stack))]
        measured = [{n: originals[n] for n in names if layer_class_for(originals[n]).multiplies_input} for names in by_block]
        saved = None
        if self.resume_folder is not None:
            settings = {"config": self.momos_config.to_dict(), "model": type(model).__name__, "targets": list(matrices)}
            saved = BlockResults(self.resume_folder, conversion_key(settings, model, batches))
        try:
            blocks = block_by_block(model, stack, batches, store, measured)
            for i, seen in tqdm(blocks, desc="MoMos blocks", unit="block", total=sum(map(bool, measured))):
                moments = {n: seen.get(n, torch.eye(matrices[n].shape[1])) for n in by_block[i]}
                block_fit = None
                if saved is not None:
                    block_fit = saved.load(i, {n: (*matrices[n].shape, self._num_motifs([n], matrices), self.momos_config.s,
                                                   self.momos_config.scale) for n in by_block[i]})
                if block_fit is None:
                    block_fit = self._fit({n: matrices[n] for n in by_block[i]}, moments, False, list(matrices))
                    if saved is not None:
                        saved.save(i, block_fit)
                fitted.update(block_fit)
                layers.update(self._swap_in(block_fit, moments))
            rest = [n for n in matrices if n not in fitted]
            if rest:
                involved = {n: originals[n] for n in originals if n in rest or ties.get(n) in rest}
                moments = self._calibrate(batches, involved, ties)
                rest_fit = self._fit({n: matrices[n] for n in rest}, moments, False, list(matrices))
                fitted.update(rest_fit)
                layers.update(self._swap_in(rest_fit, moments))
        except BaseException:  # a failed conversion leaves the model as it was
            for name in layers:
                model.set_submodule(name, originals[name])
            raise
        finally:
            store.close()
        return fitted, layers

    def _calibrate(self, calibration_data: Optional[Iterable[dict[str, Any]]], originals: dict[str, nn.Module],
                   ties: dict[str, str]) -> dict[str, torch.Tensor]:
        """Each fitted matrix's input moment: its own, or for an embedding the moment of the head tied to it,
        or the identity (the weight-space metric) for an embedding nothing multiplies by."""
        if calibration_data is None:
            raise ValueError(f"fit={self.momos_config.fit!r} needs calibration_data: an iterable of model-input dicts "
                             "(e.g. tokenized batches)")
        names = [name for name, module in originals.items() if layer_class_for(module).multiplies_input]
        collected = input_moments(self.base_model, names, calibration_data)
        for follower, leader in ties.items():
            if leader not in collected and follower in collected:
                collected[leader] = collected[follower]
        return {name: collected.get(name, torch.eye(layer_class_for(module).matrix_of(module).shape[1]))
                for name, module in originals.items() if name not in ties}

    # -- fitting -----------------------------------------------------------------------------------

    def _groups(self, names: list[str]) -> list[list[str]]:
        return [names] if self.momos_config.motif_scope == "global" else [[n] for n in names]

    @torch.no_grad()
    def _fit(self, matrices: dict[str, torch.Tensor], moments: Optional[dict[str, torch.Tensor]] = None,
             progress: bool = True, order: Optional[list[str]] = None,
             ) -> dict[str, tuple[nn.Parameter, torch.Tensor, Optional[nn.Parameter], float]]:
        """Fit every dictionary with the configured method (`momos_hf.fits`); returns `name -> (motifs, mosaic,
        scale, relative error)`. A dictionary's seed is `config.seed` plus its position (in `order`, the whole
        conversion's list of names, where this call fits a part of it). Fits run in float32 or wider on
        matrices divided by their RMS (so that no square overflows), and the result must be finite in the
        dtype it is stored in."""
        config = self.momos_config
        order = order or list(matrices)
        groups = self._groups(list(matrices))
        ks = [self._num_motifs(group, matrices) for group in groups]
        fitted = {}
        for group, k in tqdm(list(zip(groups, ks)), desc="MoMos fit", unit="dict", disable=not progress):
            originals = [matrices[n].detach() for n in group]
            unit = _rms(originals)
            normalised = [m.float().div(unit) for m in originals]
            options = FitOptions(k, config.s, config.kmeans_iters, config.seed + order.index(group[0]), config.zero_motif, config.scale,
                                 self.max_assign_bytes, config.motif_bits)
            fit = FIT_METHODS[config.fit](normalised, None if moments is None else [moments[n] for n in group], options)
            dtype = config.torch_motif_dtype or originals[0].dtype
            motifs = nn.Parameter((fit.motifs.double() * unit).to(dtype))
            scales = [None if s is None else nn.Parameter(s.to(dtype)) for s in fit.scales]
            if not torch.isfinite(motifs).all() or any(s is not None and not torch.isfinite(s).all() for s in scales):
                raise ValueError(f"the motifs fitted to {group[0]}{' ...' if len(group) > 1 else ''} overflow {dtype}: "
                                 "its weights are too large for it; set motif_dtype='float32'")
            for name, matrix, mosaic, scale in zip(group, originals, fit.mosaics, scales):
                approx = reconstruct(motifs.double(), mosaic, matrix.shape[1], None if scale is None else scale.double())
                fitted[name] = (motifs, mosaic, scale, relative_error(matrix, approx))
        return fitted

    def _num_motifs(self, group: list[str], matrices: dict[str, torch.Tensor]) -> int:
        s = self.momos_config.s
        n_blocks = sum(matrices[n].shape[0] * num_blocks_per_row(matrices[n].shape[1], s) for n in group)
        k = self.momos_config.num_motifs(n_blocks)
        if k > n_blocks:
            shapes = ", ".join(f"{n} {tuple(matrices[n].shape)}" for n in group[:3])
            raise ValueError(
                f"k={k} motifs do not fit: {shapes}{' ...' if len(group) > 3 else ''} has only {n_blocks} blocks "
                f"of s={s} values; use k <= {n_blocks}, a smaller s, motif_scope='global', or capacity"
            )
        return k

    def _check_compresses(self, matrices: dict[str, torch.Tensor]) -> None:
        """Refuse settings under which a dictionary and its mosaics would take more bits than the dense
        weights they replace (so a MoMos checkpoint is never larger than the model it came from)."""
        config = self.momos_config
        for group in self._groups(list(matrices)):
            k = self._num_motifs(group, matrices)
            value_bits = torch.finfo(config.torch_motif_dtype or matrices[group[0]].dtype).bits
            dense = sum(matrices[n].numel() * matrices[n].element_size() * 8 for n in group)
            momos = dictionary_bits(k, config.s, value_bits, config.motif_bits) + sum(
                matrices[n].shape[0] * (num_blocks_per_row(matrices[n].shape[1], config.s) * index_bits(k)
                                        + (value_bits if config.scale else 0)) for n in group)
            if momos > dense:
                raise ValueError(
                    f"with k={k}, s={config.s} the MoMos form of {group[0]}{' ...' if len(group) > 1 else ''} takes "
                    f"{momos / 8:,.0f} bytes, more than its {dense / 8:,.0f} dense bytes: use fewer motifs (k), "
                    "longer blocks (s), or motif_scope='global'"
                )

    @torch.no_grad()
    def project(self) -> dict[str, float]:
        """Refit motifs and mosaics from the current weights (the paper's projection step).

        The current weight is the latent weight where there is one (`"projected"`/`"ste"`), else the
        mosaic weight. In `"projected"` mode the latent weight then snaps onto the new mosaic weight, and so
        do the 1-D parameters under `constrain_vectors` (fitted with the matrices, in the one dictionary).
        Parameters are updated in place, so optimizers keep referring to them; tied layers follow their
        leader. Returns the relative error of each layer's new fit against its weight before the projection.
        """
        layers = self.momos_layers()
        leaders = {name: layer for name, layer in layers.items() if layer.leader is None}
        current = {name: layer.mosaic_weight() if layer.latent is None else full_tensor(layer.latent) for name, layer in leaders.items()}
        moments = None
        if self.momos_config.fit in NEEDS_INPUT_MOMENTS:
            missing = [name for name, layer in leaders.items() if layer.input_moment is None]
            if missing:
                raise ValueError(f"fit={self.momos_config.fit!r} has no calibration statistics for {missing[:3]} (a model "
                                 "loaded from a checkpoint has none): convert with calibration_data, or refit with fit='kmeans'")
            moments = {name: layer.input_moment for name, layer in leaders.items()}
        vectors = self._vectors()
        fitted = self._fit({**current, **{name: full_tensor(vector).view(1, -1) for name, vector in vectors.items()}}, moments)
        self._snap_vectors(vectors, fitted)
        for name, (motifs, mosaic, scale, error) in fitted.items():
            if name in vectors:
                continue
            layer = leaders[name]
            assign_(layer.motifs, motifs)
            layer.set_mosaic(mosaic)
            if scale is not None:
                assign_(layer.scale, scale)
            if layer.train_mode == "projected":
                assign_(layer.latent, layer.mosaic_weight())
            layer.fit_error = error
        for layer in layers.values():
            if layer.leader is not None:
                layer.set_mosaic(layer.leader.mosaic)
                layer.fit_error = layer.leader.fit_error
        return self.fit_errors

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
        save_momos_model(self.base_model, save_directory, state_dict=state_dict, max_shard_size=max_shard_size,
                         tokenizer=tokenizer, **kwargs)

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
        return push_momos_model(self.base_model, repo_id, commit_message, private, token, revision, max_shard_size, tokenizer)

    @classmethod
    def from_pretrained(cls, model_id: Union[str, os.PathLike], model_class: Any = None, **kwargs: Any) -> "MoMosModel":
        """Load a MoMos checkpoint (local folder or Hub id) and wrap it. `model_class` defaults to the
        architecture recorded in its `config.json`; `kwargs` go to `from_pretrained` (dtype, revision, ...)."""
        if os.path.isdir(model_id):  # checked before Transformers reads it, whose errors would not name the problem
            read_checkpoint_config(model_id)
        config = AutoConfig.from_pretrained(model_id, **{k: v for k, v in kwargs.items() if k in ("revision", "token")})
        quantization = getattr(config, "quantization_config", None) or {}
        if dict(quantization).get("quant_method") != QUANT_METHOD:
            raise ValueError(f"{model_id} is not a MoMos checkpoint: its config.json has no quantization_config with quant_method 'momos'")
        model = (model_class or architecture_class(config)).from_pretrained(model_id, **kwargs)
        return cls(model, model.config.quantization_config.config)

    # -- PEFT-style API ----------------------------------------------------------------------------

    def momos_layers(self) -> dict[str, MoMosLayer]:
        """Every MoMos layer of the model by full name (names relative to the base model)."""
        return momos_layers(self.base_model)

    def cache_weights(self, enabled: bool = True) -> None:
        """Keep each layer's reconstructed weight for inference throughput (dense memory), or drop it and
        compute from motifs and mosaic again (`momos_hf.products` says which product runs)."""
        for layer in self.momos_layers().values():
            layer.weight_cache_enabled = enabled
            layer.clear_weight_cache()

    def set_product(self, product: Optional[str]) -> None:
        """Force one product (a name in `momos_hf.products.PRODUCTS`) in every layer, or `None` to let each
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
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def merge_and_unload(self) -> nn.Module:
        """Replace every MoMos layer by a module of the type it replaced holding the mosaic weight, and return
        the base model as a plain Transformers model (no MoMos config or quantizer: it saves and reloads as
        a dense one; tied embeddings are tied again), with the `requires_grad` flags it had before conversion."""
        merge_layers(self.base_model, _untouched_dtype(self.base_model))
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

    # -- plumbing ----------------------------------------------------------------------------------

    def _enable_latents(self, originals: dict[MoMosLayer, torch.Tensor]) -> None:
        """Latent weights for `projected`/`ste`, starting from the dense weights where known; a tied layer
        shares its leader's."""
        layers = self.momos_layers().values()
        for layer in layers:
            if layer.latent is None and layer.leader is None:
                layer.enable_latent(self.momos_config.train_mode, originals.get(layer))
        for layer in layers:
            if layer.leader is not None:
                layer.latent, layer.train_mode = layer.leader.latent, layer.leader.train_mode

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
    return MoMosModel(model, config, calibration_data=calibration_data, dtype=dtype, max_assign_bytes=max_assign_bytes,
                      sequential=sequential, activation_budget_bytes=activation_budget_bytes, offload_folder=offload_folder,
                      resume_folder=resume_folder)


def architecture_class(config: Any) -> type:
    """The Transformers model class named first in `config.architectures` (`AutoModel` when none is named)."""
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else transformers.AutoModel
    if not (isinstance(cls, type) and (issubclass(cls, transformers.PreTrainedModel) or cls is transformers.AutoModel)):
        raise ValueError(f"config.json names {names[0]!r} as its architecture, which is not a Transformers model class")
    return cls


def _check_same_fit(recorded: MoMosConfig, requested: MoMosConfig) -> None:
    recorded_fit, requested_fit = ({f: getattr(c, f) for f in FIT_FIELDS} for c in (recorded, requested))
    if recorded_fit != requested_fit:
        changed = {f: (recorded_fit[f], requested_fit[f]) for f in FIT_FIELDS if recorded_fit[f] != requested_fit[f]}
        raise ValueError(f"the model holds MoMos layers fitted with other settings ({', '.join(f'{f}={a!r}, not {b!r}' for f, (a, b) in changed.items())}); "
                         "converting twice would mislabel them: convert the dense model instead")


def _cast_parameters(model: nn.Module, dtype: torch.dtype, motif_dtype: Optional[torch.dtype]) -> None:
    """Cast every parameter (not the buffers, as loading in that dtype leaves them) in place."""
    motif_ids = {id(layer.motifs) for layer in momos_layers(model).values()}
    for param in model.parameters():
        param.data = param.data.to(motif_dtype if motif_dtype is not None and id(param) in motif_ids else dtype)


def _untouched_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the model's first floating-point parameter outside its MoMos layers (its storage dtype)."""
    momos = {id(p) for layer in momos_layers(model).values() for p in layer.parameters()}
    return next((p.dtype for p in model.parameters() if p.is_floating_point() and id(p) not in momos), None)


def _rms(matrices: list[torch.Tensor]) -> float:
    """Root mean square of all values (1 when they are all zero), in float64 so that no square overflows."""
    total = sum(float(m.double().square().sum()) for m in matrices)
    count = sum(m.numel() for m in matrices)
    return math.sqrt(total / count) if total > 0 else 1.0
