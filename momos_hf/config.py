"""`MoMosConfig`: what to convert and how, validated, with a JSON round trip (PEFT's config shape)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from .fit.methods import FIT_METHODS, NEEDS_INPUT_MOMENTS
from .mosaic import DictionaryFormat

__all__ = ["FITS", "MOTIF_DTYPES", "SCOPES", "TRAIN_MODES", "MoMosConfig"]

CONFIG_NAME = "momos_config.json"

FITS = tuple(FIT_METHODS)
WEIGHT_SPACE_FITS = tuple(name for name in FITS if name not in NEEDS_INPUT_MOMENTS)
TRAIN_MODES = ("motifs", "projected", "ste")
SCOPES = ("layer", "global")
MOTIF_DTYPES = ("float32", "bfloat16", "float16")
# The settings that decide what the MoMos layers hold; the others say how the model trains.
FIT_FIELDS = (
    "k",
    "capacity",
    "s",
    "target_modules",
    "motif_scope",
    "fit",
    "kmeans_iters",
    "zero_motif",
    "scale",
    "motif_dtype",
    "motif_bits",
    "constrain_vectors",
    "seed",
)
MOTIF_BITS = range(2, 17)


@dataclass
class MoMosConfig:
    """Settings of a Mosaic-of-Motifs conversion.

    Each target weight matrix `W[out, in]` is cut along `in` into blocks of `s` values; every block is
    replaced by one of `k` shared motifs. The mosaic costs `ceil(log2 k) / s` bits per weight
    (`k=256, s=16`: 0.5 bits/weight).

    Args:
        k: number of motifs per dictionary (default 256). Give `k` or `capacity`, not both.
        capacity: the paper's fraction of blocks kept as motifs: `k = max(1, min(int(capacity * m), m))`
            with `m` the number of blocks the dictionary serves.
        s: block size (values per block).
        target_modules: which modules to convert. `None` (default): every `nn.Linear` / GPT-2 `Conv1D`
            inside the model's repeated transformer blocks, i.e. the attention and MLP projections, never
            the embeddings or the LM head. A list of names matches a module whose full name equals an
            entry or ends with `"." + entry`; a string is a regular expression matched against full
            names, or, when it matches none, a single name (`"q_proj"`, as PEFT users write it);
            `"all-linear"` takes every linear layer except the output embeddings (LM head).
        motif_scope: `"layer"`: one dictionary per layer; `"global"`: one dictionary shared by all targets,
            as in the paper.
        fit: the fit method, used at conversion and by every `project()` refit (`momos_hf.fit.methods`):
            `"sample"`: the paper's `k` randomly sampled existing blocks; `"kmeans"`: k-means++ start
            (random blocks when `k > 4096`) refined by `kmeans_iters` Lloyd steps; `"data-aware"`:
            minimise each layer's output error on calibration inputs (`get_momos_model(...,
            calibration_data=...)`): importance-weighted k-means, assignment with GPTQ-style error
            feedback, then motifs solved exactly for that mosaic (see `momos_hf.fit.data_aware`).
        kmeans_iters: Lloyd steps for `fit="kmeans"` and `"data-aware"`.
        zero_motif: pin motif 0 to the all-zero block (block sparsity).
        scale: learn one scale per output row; motifs are fitted to the rows divided by their RMS.
        motif_dtype: storage dtype of the motifs (`None`: the dtype of the converted weights).
        motif_bits: the paper's `q`: motifs on a symmetric grid of `2**q - 1` levels spanning each dictionary's
            largest absolute value (zero exact), fake-quantised in every forward pass (gradients pass straight
            through), snapped onto the grid at every fit, stored in checkpoints as q-bit codes plus the step,
            and counted so in the description length. `None` (default): motifs are stored and counted at their
            storage width.
        constrain_vectors: put every 1-D parameter of the model (biases, norm weights and biases; not the
            `modules_to_save`) on the same dictionary as the target matrices, as the paper's code does for all
            trainable tensors: each vector is cut into blocks of `s` and snapped onto its mosaic at conversion
            and at every `project()`. Needs `motif_scope="global"`, `train_mode="projected"`, no row scales
            and a weight-space fit; a training-time setting (such models are not saved as MoMos checkpoints).
        seed: seed of every random choice of the fit, so a conversion is reproducible.
        modules_to_save: modules (same matching as a list `target_modules`; one name may be given as a
            string) kept dense and trainable.
        train_mode: how the model trains.
            `"motifs"` (default): the mosaic is frozen; motifs, scales and `modules_to_save` train, the rest
            is frozen (PEFT-like: few trainable parameters, always in MoMos form). For adapting a converted
            model cheaply.
            `"projected"` (the paper): every layer keeps a dense latent weight that trains freely with the
            rest of the model; `project()` refits motifs and mosaic to it and snaps it onto the mosaic.
            For training from scratch, and for recovering a pretrained model's quality.
            `"ste"`: the forward pass uses the mosaic weight while gradients pass straight through to the
            dense latent weight; `project()` refits motifs and mosaic to the latent weight. The model is in
            MoMos form at every step, so what is evaluated during training is what will be saved.
        project_every: optimizer steps between projections in `"projected"` and `"ste"` modes (0: at each
            epoch end, as the paper). Training ends with a projection either way.
    """

    k: Optional[int] = None
    s: int = 16
    capacity: Optional[float] = None
    target_modules: Optional[Union[list[str], str]] = None
    motif_scope: str = "layer"
    fit: str = "kmeans"
    kmeans_iters: int = 15
    zero_motif: bool = False
    scale: bool = False
    motif_dtype: Optional[str] = None
    motif_bits: Optional[int] = None
    constrain_vectors: bool = False
    seed: int = 0
    modules_to_save: Optional[list[str]] = None
    train_mode: str = "motifs"
    project_every: int = 0

    def __post_init__(self) -> None:
        if self.capacity is not None:
            if self.k is not None:
                raise ValueError(f"give either k ({self.k}) or capacity ({self.capacity}), not both")
            if not _is_number(self.capacity) or not 0.0 < self.capacity <= 1.0:
                raise ValueError(
                    f"capacity must be in (0, 1] (a fraction of the blocks, as a number), got {self.capacity!r}"
                )
        elif self.k is None:
            self.k = 256
        elif not _is_int(self.k) or self.k < 1:
            raise ValueError(f"k must be an integer >= 1 (number of motifs), got {self.k!r}")
        if not _is_int(self.s) or self.s < 1:
            raise ValueError(f"s must be an integer >= 1 (values per block), got {self.s!r}")
        _check_choice("motif_scope", self.motif_scope, SCOPES)
        _check_choice("fit", self.fit, FITS)
        _check_choice("train_mode", self.train_mode, TRAIN_MODES)
        for name in ("zero_motif", "scale", "constrain_vectors"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.zero_motif and self.k == 1:
            raise ValueError(
                "zero_motif=True needs k >= 2: with k=1 the only motif is zero and every layer becomes zero"
            )
        if not _is_int(self.project_every) or self.project_every < 0:
            raise ValueError(
                f"project_every must be an integer >= 0 (0: at each epoch end), got {self.project_every!r}"
            )
        if self.motif_dtype is not None:
            _check_choice("motif_dtype", self.motif_dtype, MOTIF_DTYPES)
        if self.motif_bits is not None and (not _is_int(self.motif_bits) or self.motif_bits not in MOTIF_BITS):
            raise ValueError(
                f"motif_bits must be an integer in [2, 16] (bits per motif value) or None, got {self.motif_bits!r}"
            )
        if self.constrain_vectors:
            needs = {"motif_scope": "global", "train_mode": "projected", "scale": False}
            wrong = [
                f"{name}={getattr(self, name)!r}" for name, value in needs.items() if getattr(self, name) != value
            ]
            wrong += [] if self.fit in WEIGHT_SPACE_FITS else [f"fit={self.fit!r}"]
            if wrong:
                raise ValueError(
                    f"constrain_vectors=True needs motif_scope='global', train_mode='projected', scale=False and "
                    f"fit in {list(WEIGHT_SPACE_FITS)}; got {', '.join(wrong)}"
                )
        if not _is_int(self.kmeans_iters) or self.kmeans_iters < 0:
            raise ValueError(f"kmeans_iters must be an integer >= 0, got {self.kmeans_iters!r}")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        self.target_modules = _names_or_pattern("target_modules", self.target_modules)
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            try:
                re.compile(self.target_modules)
            except re.error as err:
                raise ValueError(f"target_modules {self.target_modules!r} is not a valid regex: {err}") from err
        if isinstance(self.modules_to_save, str):  # one name, as PEFT accepts it
            self.modules_to_save = [self.modules_to_save]
        self.modules_to_save = _names_or_pattern("modules_to_save", self.modules_to_save)

    def num_motifs(self, n_blocks: int) -> int:
        """`k` for a dictionary serving `n_blocks` blocks (resolves `capacity`)."""
        if self.k is not None:
            return self.k
        return max(1, min(int(self.capacity * n_blocks), n_blocks))

    @property
    def torch_motif_dtype(self) -> Optional[torch.dtype]:
        return None if self.motif_dtype is None else getattr(torch, self.motif_dtype)

    def dictionary_format(self, weight_dtype: torch.dtype) -> DictionaryFormat:
        """The storage format of a dictionary fitted to weights of `weight_dtype`: motifs in `motif_dtype`
        (default: the weights' dtype), as q-bit codes under `motif_bits`."""
        return DictionaryFormat(self.torch_motif_dtype or weight_dtype, self.motif_bits)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MoMosConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown MoMosConfig fields {unknown}; valid fields: {sorted(known)}")
        return cls(**values)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_string(cls, text: str) -> "MoMosConfig":
        return cls.from_dict(json.loads(text))

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        """Write `momos_config.json` into `directory` (atomically: temporary name, then rename)."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CONFIG_NAME)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        os.replace(tmp, path)

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike]) -> "MoMosConfig":
        path = os.path.join(directory, CONFIG_NAME)
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_json_string(f.read())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        except OSError as err:
            raise ValueError(f"cannot read {path}: {err.strerror or err}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _names_or_pattern(name: str, value: Any) -> Optional[Union[list[str], str]]:
    """`None`, a string, or a list of strings (tuples and sets become sorted lists)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value):
        return sorted(value) if isinstance(value, set) else list(value)
    raise ValueError(f"{name} must be a string or a list of module names, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
