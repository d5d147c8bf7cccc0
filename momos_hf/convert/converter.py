"""`Converter`: fit motifs and mosaics to the target layers of a model and swap in MoMos layers.

The steps: find the targets (`momos_hf.convert.targets`), refuse settings that would not compress, collect
input moments where the fit reads them (`momos_hf.convert.calibration`: all layers at once, or block by block
with `sequential`), fit each dictionary (`momos_hf.fit`), replace the modules, tie what was tied. A failed
sequential conversion puts the converted blocks back. `MoMosModel` runs this at construction and reuses `fit`
for its `project()` refits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
from torch import nn
from transformers.utils import logging
from transformers.utils.logging import tqdm

from ..config import MoMosConfig
from ..fit.methods import FIT_METHODS, NEEDS_INPUT_MOMENTS, FitResult
from ..fit.weight_space import FitOptions
from ..layer import MoMosLayer, assign_, layer_class_for, replace_with_momos
from ..mosaic import description_bits, num_blocks_per_row, quantize_motifs, reconstruct, relative_error
from .calibration import ActivationStore, block_by_block, input_moments
from .resume import BlockResults, conversion_key
from .targets import block_stack, drop_momos_ties, find_targets, tie_groups

logger = logging.get_logger(__name__)

DEFAULT_ASSIGN_BYTES = 256 * 2**20
DEFAULT_ACTIVATION_BYTES = 2 * 2**30


@dataclass(frozen=True, kw_only=True)
class ConversionOptions:
    """Runtime choices of a conversion (properties of the machine and the run, not of the model: not saved).

    `max_assign_bytes`: memory budget of one chunk of the block-to-motif distance matrix. `sequential`
    (data-aware fits, one dictionary per layer): convert the model's stack of blocks one block at a time, each
    calibrated on the outputs of the blocks converted before it (GPTQ's order), holding one block's input
    moments at a time; the hidden states between blocks stay in memory up to `activation_budget_bytes` and go
    to a temporary folder under `offload_folder` (default: the system's) past it. `resume_folder`: each
    block's fit is saved there as it finishes, and a rerun of the same conversion (model, settings,
    calibration) reuses the blocks found there (`momos_hf.convert.resume`). `dtype`: the dtype the model is cast
    to after the conversion; motifs (unless the config sets `motif_dtype`) and scales are made, and checked, in it."""

    max_assign_bytes: int = DEFAULT_ASSIGN_BYTES
    sequential: bool = False
    activation_budget_bytes: int = DEFAULT_ACTIVATION_BYTES
    offload_folder: Optional[str] = None
    resume_folder: Optional[str] = None
    dtype: Optional[torch.dtype] = None

    def __post_init__(self) -> None:
        if self.resume_folder is not None and not self.sequential:
            raise ValueError("resume_folder keeps the blocks of a sequential conversion: use sequential=True")


VECTOR_MOSAICS = "_momos_vector_mosaics"  # the model attribute holding the mosaics of constrained vectors


class Converter:
    """Converts the targets of `model` (in place) under `config`; `modules_to_save` stay dense and trainable.

    `vector_mosaics`: under `constrain_vectors`, the mosaic `[1, nb]` of each 1-D parameter by full name."""

    def __init__(
        self,
        model: nn.Module,
        config: MoMosConfig,
        options: ConversionOptions = ConversionOptions(),
        modules_to_save: Iterable[str] = (),
    ) -> None:
        self.model, self.config, self.options = model, config, options
        self.modules_to_save = list(modules_to_save)
        # Kept on the model too, where `complexity_report` of the model alone finds them.
        self.vector_mosaics: dict[str, torch.Tensor] = model.__dict__.setdefault(VECTOR_MOSAICS, {})

    def convert(self, calibration_data: Optional[Iterable[dict[str, Any]]]) -> dict[MoMosLayer, torch.Tensor]:
        """Fit and swap in every target layer; returns each new layer's original matrix `[out, in]`."""
        model, config = self.model, self.config
        targets = find_targets(model, config.target_modules)
        overlap = sorted(set(targets) & set(self.modules_to_save))
        if overlap:
            raise ValueError(f"modules {overlap} are both MoMos targets and modules_to_save")
        ties = tie_groups(model, targets)
        originals = {name: model.get_submodule(name) for name in targets}
        matrices = {
            name: layer_class_for(module).matrix_of(module) for name, module in originals.items() if name not in ties
        }
        for name, matrix in matrices.items():
            if not torch.isfinite(matrix).all():
                raise ValueError(f"weight of {name} has NaN or inf values; MoMos can only fit finite weights")
        self._check_compresses(matrices)
        vectors = self.vectors()
        if config.fit in NEEDS_INPUT_MOMENTS and self.options.sequential:
            fitted, layers = self._convert_sequentially(calibration_data, matrices, originals, ties)
        else:
            moments = self._calibrate(calibration_data, originals, ties) if config.fit in NEEDS_INPUT_MOMENTS else None
            fitted = self.fit({**matrices, **{name: vector.view(1, -1) for name, vector in vectors.items()}}, moments)
            layers = self._swap_in({name: fit for name, fit in fitted.items() if name not in vectors}, moments)
            self.snap_vectors(vectors, fitted)
        for name, leader in ties.items():
            layers[name] = replace_with_momos(
                model,
                name,
                motifs=layers[leader].motifs,
                mosaic=layers[leader].mosaic.clone(),
                scale=layers[leader].scale,
                zero_motif=config.zero_motif,
                motif_bits=config.motif_bits,
            )
            layers[name].tie_to(layers[leader])
            fitted[name] = fitted[leader]
        for name, layer in layers.items():
            layer.fit_error = fitted[name].error
        if ties:
            drop_momos_ties(model)
        return {layers[name]: matrix.detach() for name, matrix in matrices.items()}

    def vectors(self) -> dict[str, nn.Parameter]:
        """The 1-D parameters `constrain_vectors` puts on the dictionary (biases, norm weights and biases), by
        full name; none without that setting. `modules_to_save` stay dense."""
        if not self.config.constrain_vectors:
            return {}
        kept = {id(p) for name in self.modules_to_save for p in self.model.get_submodule(name).parameters()}
        return {name: p for name, p in self.model.named_parameters() if p.ndim == 1 and id(p) not in kept}

    @torch.no_grad()
    def snap_vectors(self, vectors: dict[str, nn.Parameter], fitted: dict[str, FitResult]) -> None:
        """Set each constrained vector to its mosaic's values (the projection) and keep the mosaic."""
        for name, vector in vectors.items():
            motifs, mosaic = fitted[name].motifs, fitted[name].mosaic
            motifs = quantize_motifs(motifs, self.config.motif_bits) if self.config.motif_bits else motifs
            assign_(vector, reconstruct(motifs, mosaic, vector.numel()).reshape(vector.shape))
            self.vector_mosaics[name] = mosaic

    @torch.no_grad()
    def fit(
        self,
        matrices: dict[str, torch.Tensor],
        moments: Optional[dict[str, torch.Tensor]] = None,
        progress: bool = True,
        order: Optional[list[str]] = None,
    ) -> dict[str, FitResult]:
        """Fit every dictionary with the configured method (`momos_hf.fit.methods`). A dictionary's seed is
        `config.seed` plus its position (in `order`, the whole conversion's list of names, where this call fits
        a part of it). Fits run in float32 or wider on matrices divided by their RMS (so that no square
        overflows), and the result must be finite in the dtype it is stored in."""
        config = self.config
        order = order or list(matrices)
        groups = self._groups(list(matrices))
        ks = [self._num_motifs(group, matrices) for group in groups]
        fitted = {}
        for group, k in tqdm(list(zip(groups, ks)), desc="MoMos fit", unit="dict", disable=not progress):
            originals = [matrices[n].detach() for n in group]
            unit = _rms(originals)
            normalised = [m.float().div(unit) for m in originals]
            options = FitOptions(
                k=k,
                s=config.s,
                iters=config.kmeans_iters,
                seed=config.seed + order.index(group[0]),
                zero_motif=config.zero_motif,
                scale=config.scale,
                max_assign_bytes=self.options.max_assign_bytes,
                motif_bits=config.motif_bits,
            )
            fit = FIT_METHODS[config.fit](
                normalised, None if moments is None else [moments[n] for n in group], options
            )
            dtype = config.torch_motif_dtype or self.options.dtype or originals[0].dtype
            motifs = nn.Parameter((fit.motifs.double() * unit).to(dtype))
            scale_dtype = self.options.dtype or dtype
            scales = [None if s is None else nn.Parameter(s.to(scale_dtype)) for s in fit.scales]
            for part, values, part_dtype in (("motifs", [motifs], dtype), ("scales", scales, scale_dtype)):
                if any(v is not None and not torch.isfinite(v).all() for v in values):
                    raise ValueError(
                        f"the {part} fitted to {group[0]}{' ...' if len(group) > 1 else ''} overflow {part_dtype}: "
                        "its weights are too large for it; keep them in float32"
                    )
            for name, matrix, mosaic, scale in zip(group, originals, fit.mosaics, scales):
                approx = reconstruct(
                    motifs.double(), mosaic, matrix.shape[1], None if scale is None else scale.double()
                )
                fitted[name] = FitResult(motifs, mosaic, scale, relative_error(matrix, approx))
        return fitted

    # -- the steps of a conversion -----------------------------------------------------------------

    def _swap_in(
        self, fitted: dict[str, FitResult], moments: Optional[dict[str, torch.Tensor]]
    ) -> dict[str, MoMosLayer]:
        """Replace each fitted module by its MoMos layer; in the `"projected"`/`"ste"` modes a layer keeps its
        input moment, since later projections refit in the same metric."""
        config, layers = self.config, {}
        for name, fit in fitted.items():
            layers[name] = replace_with_momos(
                self.model,
                name,
                motifs=fit.motifs,
                mosaic=fit.mosaic,
                scale=fit.scale,
                zero_motif=config.zero_motif,
                motif_bits=config.motif_bits,
            )
            if moments is not None and config.train_mode != "motifs":
                layers[name].input_moment = moments[name]
        return layers

    def _convert_sequentially(
        self,
        calibration_data: Optional[Iterable[dict[str, Any]]],
        matrices: dict[str, torch.Tensor],
        originals: dict[str, nn.Module],
        ties: dict[str, str],
    ) -> tuple[dict[str, FitResult], dict[str, MoMosLayer]]:
        """Data-aware conversion block by block (see `momos_hf.convert.calibration`): each block of the model's
        stack is calibrated on the outputs of the blocks already converted, holding one block's input moments
        at a time; the targets outside the stack (embeddings, heads) are calibrated last, on the converted
        model."""
        if calibration_data is None:
            raise ValueError(
                f"fit={self.config.fit!r} needs calibration_data: an iterable of model-input dicts "
                "(e.g. tokenized batches)"
            )
        if self.config.motif_scope == "global":
            raise ValueError(
                "sequential calibration fits one block at a time; motif_scope='global' fits one "
                "dictionary for all layers at once: use sequential=False"
            )
        model, batches = self.model, list(calibration_data)
        stack_name = block_stack(model, list(matrices))
        if stack_name is None:
            raise ValueError(
                f"sequential calibration needs the targets inside a stack of blocks (an nn.ModuleList); "
                f"{type(model).__name__} has none holding them: use sequential=False"
            )
        stack = model.get_submodule(stack_name)
        fitted: dict[str, FitResult] = {}
        layers: dict[str, MoMosLayer] = {}
        store = ActivationStore(self.options.activation_budget_bytes, self.options.offload_folder)
        by_block = [[n for n in matrices if n.startswith(f"{stack_name}.{i}.")] for i in range(len(stack))]
        measured = [
            {n: originals[n] for n in names if layer_class_for(originals[n]).multiplies_input} for names in by_block
        ]
        saved, reused = None, 0
        if self.options.resume_folder is not None:
            settings = {"config": self.config.to_dict(), "model": type(model).__name__, "targets": list(matrices)}
            saved = BlockResults(self.options.resume_folder, conversion_key(settings, model, batches))
        try:
            blocks = block_by_block(model, stack, batches, store, measured)
            for i, seen in tqdm(blocks, desc="MoMos blocks", unit="block", total=sum(map(bool, measured))):
                moments = {n: seen.get(n, torch.eye(matrices[n].shape[1])) for n in by_block[i]}
                block_fit = None
                if saved is not None:
                    block_fit = saved.load(i, {n: self._expected_fit(n, matrices) for n in by_block[i]})
                    reused += block_fit is not None
                if block_fit is None:
                    block_fit = self.fit({n: matrices[n] for n in by_block[i]}, moments, False, list(matrices))
                    if saved is not None:
                        saved.save(i, block_fit)
                fitted.update(block_fit)
                layers.update(self._swap_in(block_fit, moments))
            if saved is not None:
                logger.warning(f"MoMos: reused {reused} of {sum(map(bool, measured))} blocks from {saved.folder}")
            rest = [n for n in matrices if n not in fitted]
            if rest:
                involved = {n: originals[n] for n in originals if n in rest or ties.get(n) in rest}
                moments = self._calibrate(batches, involved, ties)
                rest_fit = self.fit({n: matrices[n] for n in rest}, moments, False, list(matrices))
                fitted.update(rest_fit)
                layers.update(self._swap_in(rest_fit, moments))
        except BaseException:  # a failed conversion leaves the model as it was
            for name in layers:
                model.set_submodule(name, originals[name])
            raise
        finally:
            store.close()
        return fitted, layers

    def _calibrate(
        self,
        calibration_data: Optional[Iterable[dict[str, Any]]],
        originals: dict[str, nn.Module],
        ties: dict[str, str],
    ) -> dict[str, torch.Tensor]:
        """Each fitted matrix's input moment: its own, or for an embedding the moment of the head tied to it,
        or the identity (the weight-space metric) for an embedding nothing multiplies by."""
        if calibration_data is None:
            raise ValueError(
                f"fit={self.config.fit!r} needs calibration_data: an iterable of model-input dicts "
                "(e.g. tokenized batches)"
            )
        names = [name for name, module in originals.items() if layer_class_for(module).multiplies_input]
        collected = input_moments(self.model, names, calibration_data)
        for follower, leader in ties.items():
            if leader not in collected and follower in collected:
                collected[leader] = collected[follower]
        return {
            name: collected.get(name, torch.eye(layer_class_for(module).matrix_of(module).shape[1]))
            for name, module in originals.items()
            if name not in ties
        }

    def _expected_fit(self, name: str, matrices: dict[str, torch.Tensor]) -> tuple:
        """What a saved fit of `name` must be: `(out, in, k, s, scale, dtype)`, as `fit` would make it."""
        dtype = self.config.torch_motif_dtype or matrices[name].dtype
        return (*matrices[name].shape, self._num_motifs([name], matrices), self.config.s, self.config.scale, dtype)

    def _groups(self, names: list[str]) -> list[list[str]]:
        return [names] if self.config.motif_scope == "global" else [[n] for n in names]

    def _num_motifs(self, group: list[str], matrices: dict[str, torch.Tensor]) -> int:
        s = self.config.s
        n_blocks = sum(matrices[n].shape[0] * num_blocks_per_row(matrices[n].shape[1], s) for n in group)
        k = self.config.num_motifs(n_blocks)
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
        config = self.config
        for group in self._groups(list(matrices)):
            k = self._num_motifs(group, matrices)
            dictionary = config.dictionary_format(matrices[group[0]].dtype)
            scale_bits = torch.finfo(dictionary.dtype).bits if config.scale else 0
            dense = sum(matrices[n].numel() * matrices[n].element_size() * 8 for n in group)
            momos = sum(  # the dictionary is counted with the group's first matrix
                sum(description_bits(*matrices[n].shape, k, config.s, None if i else dictionary, scale_bits))
                for i, n in enumerate(group)
            )
            if momos > dense:
                raise ValueError(
                    f"with k={k}, s={config.s} the MoMos form of {group[0]}{' ...' if len(group) > 1 else ''} takes "
                    f"{momos / 8:,.0f} bytes, more than its {dense / 8:,.0f} dense bytes: use fewer motifs (k), "
                    "longer blocks (s), or motif_scope='global'"
                )


def _rms(matrices: list[torch.Tensor]) -> float:
    """Root mean square of all values (1 when they are all zero), in float64 so that no square overflows."""
    total = sum(float(m.double().square().sum()) for m in matrices)
    count = sum(m.numel() for m in matrices)
    return math.sqrt(total / count) if total > 0 else 1.0
