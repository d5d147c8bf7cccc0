"""MoMos layers: modules whose weight matrix `W[out, in]` is `motifs[mosaic]` (times a scale per row), one
class per kind of module they replace, and `LayerSpec`, the record a checkpoint keeps of each.

- `motifs[k, s]`: trainable parameter, possibly the same object in several layers (a shared dictionary).
- `mosaic[out, ceil(in / s)]`: integer buffer of the smallest dtype that holds `k` (uint8 for k <= 256), what
  forward reads; `mosaic_packed` (ceil(log2 k) bits per block) is what state dicts and checkpoints carry.
- `scale[out]`: optional trainable parameter.
- `latent`: optional dense `[out, in]` weight for the `"projected"` and `"ste"` training modes
  (`enable_latent`); forward then uses it directly (`projected`) or through the mosaic with a
  straight-through gradient (`ste`). Checkpoints never store it.

Adding a module type: subclass `MoMosLayer`, set `kind` and `replaces`, give `matrix_of` and
`module_layout` (the module's weight as the `[out, in]` matrix MoMos fits, and back) where the weight is not
already that matrix, `_from_module` (the rest of the module's state: bias, ...), `empty_module`, `forward`,
and `input_rows` where data-aware fits should calibrate on something else than the input's last dimension;
then add the class to `LAYER_TYPES`. Conversion, checkpoints, loading and merging handle it from there.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers.pytorch_utils import Conv1D

from .kernels.products import PRODUCTS, select_product
from .mosaic import (
    DictionaryFormat,
    description_bits,
    fake_quantize_motifs,
    index_bits,
    index_dtype,
    num_blocks_per_row,
    reconstruct,
)
from .packing import pack_indices, packed_size, unpack_indices

MODULE_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
MAX_K = 2**31 - 1  # mosaics are int32 at most
OPTIONAL_FIELDS = ("fit_error", "dictionary")  # of LayerSpec: left out of config.json when not known


def full_tensor(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The whole value of a parameter that FSDP 2 has sharded (a DTensor outside forward), else itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def assign_(param: torch.Tensor, value: torch.Tensor) -> None:
    """`param.copy_(value)` that also fills a sharded DTensor (rank 0's value is scattered to all ranks)."""
    if isinstance(param, DTensor):
        value = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)
    param.copy_(value)


@dataclass(frozen=True)
class LayerSpec:
    """What a checkpoint records of one MoMos layer, and all the loader needs to rebuild it.

    `kind` names the layer class (`LAYER_TYPES`); `in_features`/`out_features` are the shape of the fitted
    matrix; `motifs` names the layer that stores this one's dictionary (itself, unless shared); `mosaic` the
    layer that stores its mosaic and scale (itself, unless it is tied to another, as an LM head to its input
    embeddings); `fit_error` is the relative weight error of the fit (absent when unknown); `dictionary` is the
    storage format of its dictionary (`None`: not recorded, as in format versions 1 and 2)."""

    kind: str
    in_features: int
    out_features: int
    k: int
    s: int
    scale: bool
    motifs: str
    mosaic: str
    fit_error: Optional[float] = None
    dictionary: Optional[DictionaryFormat] = None

    @classmethod
    def from_dict(cls, name: str, values: Any) -> "LayerSpec":
        """Validate one `quantization_config.layers` entry; errors name the layer and the field."""
        where = f"quantization_config.layers[{name!r}]"
        if not isinstance(name, str) or not MODULE_NAME.fullmatch(name):
            raise ValueError(f"{where}: {name!r} is not a module name")
        if not isinstance(values, dict):
            raise ValueError(f"{where} must be an object, got {type(values).__name__}")
        required = {"kind", "in_features", "out_features", "k", "s", "scale", "motifs", "mosaic"}
        missing, unknown = required - set(values), set(values) - required - {"fit_error", "dictionary"}
        if missing or unknown:
            raise ValueError(
                f"{where} lacks {sorted(missing)}" if missing else f"{where} has unknown fields {sorted(unknown)}"
            )
        if values["kind"] not in LAYER_TYPES:
            raise ValueError(f"{where}.kind must be one of {sorted(LAYER_TYPES)}, got {values['kind']!r}")
        for field, upper in (("in_features", None), ("out_features", None), ("k", MAX_K), ("s", None)):
            value = values[field]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1 or (upper and value > upper):
                raise ValueError(f"{where}.{field} must be an integer in [1, {upper or 'inf'}], got {value!r}")
        if not isinstance(values["scale"], bool):
            raise ValueError(f"{where}.scale must be true or false, got {values['scale']!r}")
        for field in ("motifs", "mosaic"):
            if not isinstance(values[field], str) or not MODULE_NAME.fullmatch(values[field]):
                raise ValueError(f"{where}.{field} must name a MoMos layer, got {values[field]!r}")
        error = values.get("fit_error")
        if error is not None and (
            not isinstance(error, (int, float)) or isinstance(error, bool) or not math.isfinite(error)
        ):
            raise ValueError(f"{where}.fit_error must be a finite number, got {error!r}")
        try:
            dictionary = None if values.get("dictionary") is None else DictionaryFormat.from_dict(values["dictionary"])
        except ValueError as err:
            raise ValueError(f"{where}.dictionary: {err}") from None
        return cls(**{**values, "dictionary": dictionary})

    def to_dict(self) -> dict[str, Any]:
        values = {**asdict(self), "dictionary": None if self.dictionary is None else self.dictionary.to_dict()}
        return {key: value for key, value in values.items() if value is not None or key not in OPTIONAL_FIELDS}

    @property
    def num_blocks(self) -> int:
        return self.out_features * num_blocks_per_row(self.in_features, self.s)

    def description_bits(self, name: str, scale_bits: int) -> tuple[int, int, int]:
        """Bits of what layer `name` stores itself (0 for what another layer stores), by
        `momos_hf.mosaic.description_bits`: its mosaic, its dictionary (in its recorded format) and its scales
        of `scale_bits` each."""
        if self.mosaic != name:  # tied to another layer: its mosaic, scales and dictionary are stored there
            return 0, 0, 0
        if self.motifs == name and self.dictionary is None:
            raise ValueError(f"layer {name!r} records no dictionary format to count its bits by")
        return description_bits(
            self.out_features,
            self.in_features,
            self.k,
            self.s,
            self.dictionary if self.motifs == name else None,
            scale_bits if self.scale else 0,
        )


class MoMosLayer(nn.Module):
    """Base of the MoMos layers: the state every kind shares and the mosaic weight they all compute.

    Forward never needs the dense weight in memory where a product exists for the call (see
    `momos_hf.kernels.products`; `product` overrides the automatic choice). With `weight_cache_enabled` the layer
    keeps its reconstructed weight instead (throughput at the cost of dense memory); the cache follows
    in-place changes to motifs and scale, and to the mosaic through `set_mosaic`.
    """

    kind: ClassVar[str]
    replaces: ClassVar[type[nn.Module]]
    multiplies_input: ClassVar[bool] = True  # the matrix multiplies the input (data-aware fits calibrate on it)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        motifs: nn.Parameter,
        mosaic: torch.Tensor,
        scale: Optional[nn.Parameter] = None,
        zero_motif: bool = False,
    ) -> None:
        super().__init__()
        k, s = motifs.shape
        expected = (out_features, num_blocks_per_row(in_features, s))
        if tuple(mosaic.shape) != expected:
            raise ValueError(
                f"mosaic shape {tuple(mosaic.shape)} does not fit a {out_features}x{in_features} layer with s={s}; "
                f"expected {expected}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.zero_motif = zero_motif
        self.motif_bits: Optional[int] = None  # q-bit motifs (MoMosConfig.motif_bits): fake-quantised in forward
        self.motifs = motifs
        self.register_buffer("mosaic", mosaic.to(index_dtype(k)), persistent=False)
        packed_bytes = packed_size(mosaic.numel(), index_bits(k))
        self.register_buffer("mosaic_packed", torch.empty(packed_bytes, dtype=torch.uint8, device=mosaic.device))
        self._needs_unpack = mosaic.device.type == "meta"  # a skeleton whose weights are yet to load
        if not self._needs_unpack:
            self.set_mosaic(mosaic)
        self.scale = scale
        self.latent: Optional[nn.Parameter] = None
        self.fit_error: Optional[float] = None  # relative error of the conversion against the dense weight
        # The calibration inputs' second moment `X^T X / tokens`, kept for data-aware refits (projected/ste).
        self.register_buffer("input_moment", None, persistent=False)
        self.train_mode = "motifs"
        self.product: Optional[str] = None  # a name in momos_hf.kernels.products.PRODUCTS; None: chosen per call
        self._leader: tuple = ()
        self.weight_cache_enabled = False
        self._weight_cache: Optional[tuple[tuple, torch.Tensor]] = None  # (versions it was built from, weight)
        self._checked_mosaic: tuple = ()  # (the mosaic tensor, its version) when `checked_mosaic` last checked it
        self.register_load_state_dict_post_hook(lambda module, _: module.unpack_mosaic())

    # -- what each kind defines -------------------------------------------------------------------

    @staticmethod
    def matrix_of(module: nn.Module) -> torch.Tensor:
        """`module`'s weight as the `[out, in]` matrix MoMos fits (its weight itself, unless overridden)."""
        return module.weight

    def module_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        """The `[out, in]` matrix in the replaced module's weight layout (the inverse of `matrix_of`)."""
        return matrix

    def empty_module(self) -> nn.Module:
        """A module of the replaced type and shape, built on the meta device (merge fills its weight)."""
        raise NotImplementedError

    @staticmethod
    def input_rows(module: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The rows `[t, in]` that `module`'s matrix multiplies for input `x` (what data-aware fitting
        calibrates on), `None` where the matrix does not multiply its input (an embedding's lookups)."""
        return x.reshape(-1, x.shape[-1])

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        motifs: nn.Parameter,
        mosaic: torch.Tensor,
        scale: Optional[nn.Parameter] = None,
        zero_motif: bool = False,
    ) -> "MoMosLayer":
        """The MoMos layer for `module`: its shape and remaining state (bias, ...) around a dictionary and
        mosaic (fitted ones, or empty ones on the meta device when loading)."""
        out_features, in_features = cls.matrix_of(module).shape
        device = cls.matrix_of(module).device
        return cls._from_module(module, in_features, out_features, motifs, mosaic.to(device), scale, zero_motif)

    @classmethod
    def _from_module(cls, module, in_features, out_features, motifs, mosaic, scale, zero_motif) -> "MoMosLayer":
        raise NotImplementedError

    def merge(self, dtype: Optional[torch.dtype] = None) -> nn.Module:
        """A module of the replaced type holding the mosaic weight, in `dtype` (default: the motifs')."""
        with torch.no_grad():
            weight = self.module_layout(self.mosaic_weight(dtype)).contiguous()
        with torch.device("meta"):  # shapes only: the parameters are replaced right below
            module = self.empty_module()
        module.weight = nn.Parameter(weight)
        if hasattr(module, "bias"):
            module.bias = self.bias
        return module

    @property
    def weight(self) -> torch.Tensor:
        """The weight in the replaced module's layout, for code that reads it (rebuilt on every read)."""
        return self.module_layout(self.mosaic_weight())

    # -- shared ------------------------------------------------------------------------------------

    @property
    def leader(self) -> Optional["MoMosLayer"]:
        """The layer this one is tied to (an LM head to its input embeddings), `None` if it is not tied."""
        return self._leader[0] if self._leader else None

    def tie_to(self, leader: "MoMosLayer") -> None:
        """Share `leader`'s motifs and scale (the same parameters) and hold a copy of its mosaic: the two
        layers then use one matrix, as tied embeddings do. `MoMosModel.project` and loading keep the copy."""
        if (leader.out_features, leader.in_features, leader.s) != (self.out_features, self.in_features, self.s):
            raise ValueError("a MoMos layer can only be tied to one of the same shape and block size")
        self.motifs, self.scale = leader.motifs, leader.scale
        self.set_mosaic(leader.mosaic)
        self._leader = (leader,)  # a tuple, so that the leader is not registered as a submodule

    @property
    def k(self) -> int:
        return self.motifs.shape[0]

    @property
    def s(self) -> int:
        return self.motifs.shape[1]

    @property
    def bits_per_weight(self) -> float:
        """Bits of the mosaic per weight, `ceil(log2 k) / s` (the dictionary and scales are extra)."""
        return index_bits(self.k) / self.s

    def spec(self, motifs_owner: str, mosaic_owner: str) -> LayerSpec:
        """The checkpoint's record of this layer, naming the layers that store its motifs and its mosaic."""
        return LayerSpec(
            self.kind,
            self.in_features,
            self.out_features,
            self.k,
            self.s,
            self.scale is not None,
            motifs_owner,
            mosaic_owner,
            self.fit_error,
            self.dictionary_format,
        )

    @property
    def dictionary_format(self) -> DictionaryFormat:
        """The storage format of this layer's dictionary: its motifs' dtype, and q bits under `motif_bits`."""
        return DictionaryFormat(self.motifs.dtype, self.motif_bits)

    @torch.no_grad()
    def set_mosaic(self, mosaic: torch.Tensor) -> None:
        """Replace the mosaic (`[out, ceil(in / s)]`, values in `0..k-1`) and its packed copy."""
        if tuple(mosaic.shape) != tuple(self.mosaic.shape):
            raise ValueError(f"mosaic shape {tuple(mosaic.shape)} != {tuple(self.mosaic.shape)}")
        self.check_indices(mosaic)
        self.mosaic = mosaic.to(device=self.mosaic.device, dtype=index_dtype(self.k))
        self.mosaic_packed = pack_indices(self.mosaic, index_bits(self.k)).to(self.mosaic.device)
        self._weight_cache = None

    def check_indices(self, mosaic: torch.Tensor) -> None:
        """Every index in `0..k-1`: the compiled products read motifs at these offsets unchecked."""
        if not mosaic.numel():
            return
        values = mosaic.long() if mosaic.dtype == torch.uint16 else mosaic  # torch has no min/max for uint16
        low, high = (int(v) for v in torch.aminmax(values))
        if low < 0 or high >= self.k:
            raise ValueError(f"mosaic holds indices {low}..{high} but the layer has k={self.k} motifs")

    @torch.no_grad()
    def unpack_mosaic(self) -> None:
        """Rebuild `mosaic` from `mosaic_packed` (after loading a checkpoint), checking every index."""
        count = self.mosaic.numel()
        mosaic = unpack_indices(self.mosaic_packed, index_bits(self.k), count)
        self.check_indices(mosaic)
        self.mosaic = mosaic.reshape(self.mosaic.shape).to(device=self.mosaic_packed.device, dtype=index_dtype(self.k))
        self._needs_unpack = False
        self._weight_cache = None

    def effective_motifs(self) -> torch.Tensor:
        """The motifs forward uses: motif 0 is exactly zero under `zero_motif`, whatever training did, and
        every value is on the q-bit grid under `motif_bits` (straight-through gradient)."""
        if self._needs_unpack:  # Transformers' weight init may read `.weight` before loading finishes
            self.unpack_mosaic()
        motifs = full_tensor(self.motifs)
        if self.zero_motif:
            motifs = torch.cat([torch.zeros_like(motifs[:1]), motifs[1:]])
        if self.motif_bits is not None:
            motifs = fake_quantize_motifs(motifs, self.motif_bits)
        return motifs

    def mosaic_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The `[out, in]` matrix the mosaic stands for, in `dtype` (default: the motifs'), computed in the
        wider of the two so that it is rounded once (autograd flows to motifs and scale)."""
        motifs, scale = self.effective_motifs(), full_tensor(self.scale)
        dtype = dtype or motifs.dtype
        wide = torch.promote_types(motifs.dtype, dtype)
        weight = reconstruct(motifs.to(wide), self.mosaic, self.in_features, None if scale is None else scale.to(wide))
        return weight.to(dtype)

    def clear_weight_cache(self) -> None:
        """Forget the cached weight (after the motifs or scale were replaced rather than changed in place)."""
        self._weight_cache = None

    def cached_weight(self) -> torch.Tensor:
        """`mosaic_weight()` without autograd, rebuilt only when motifs, scale or mosaic changed."""
        versions = (self.motifs._version, None if self.scale is None else self.scale._version)
        if self._weight_cache is None or self._weight_cache[0] != versions:
            with torch.no_grad():
                self._weight_cache = (versions, self.mosaic_weight())
        return self._weight_cache[1]

    def enable_latent(self, train_mode: str, weight: Optional[torch.Tensor] = None) -> None:
        """Give the layer a trainable dense latent weight (`weight`, default the mosaic weight)."""
        if train_mode not in ("projected", "ste"):
            raise ValueError(f"a latent weight serves train_mode 'projected' or 'ste', not {train_mode!r}")
        with torch.no_grad():
            start = self.mosaic_weight() if weight is None else weight.to(self.motifs.dtype)
        self.latent = nn.Parameter(start.detach().clone())
        self.train_mode = train_mode

    def matrix(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The `[out, in]` matrix forward multiplies by when it is not computed from the mosaic on the fly:
        the latent (`projected`), the mosaic weight with the latent's straight-through gradient (`ste`), or
        the cached weight (inference without autograd). `None` when a product runs from the mosaic."""
        if self.latent is not None:
            if self.train_mode == "projected":
                return self.latent.to(dtype)
            with torch.no_grad():
                mosaic_weight = self.mosaic_weight(dtype)
            return mosaic_weight + (self.latent - self.latent.detach()).to(dtype)  # exactly the mosaic weight
        if self.weight_cache_enabled and not torch.is_grad_enabled():
            return self.cached_weight().to(dtype)
        return None

    def multiply(self, x: torch.Tensor) -> torch.Tensor:
        """`x[..., in] @ W^T` by the matrix forward uses, or by a product from the mosaic."""
        matrix = self.matrix(x.dtype)
        if matrix is not None:
            return F.linear(x, matrix)
        motifs, scale = self.effective_motifs(), full_tensor(self.scale)
        product = self.product or select_product(x, motifs, scale, self.out_features)
        return PRODUCTS[product](x, motifs, self.checked_mosaic(), scale, self.in_features)

    def checked_mosaic(self) -> torch.Tensor:
        """`mosaic`, checked (shape, dtype, every index in `0..k-1`) once per tensor and in-place version: it can
        be assigned or edited directly, and the compiled products read motifs at its offsets unchecked. (An
        inference tensor has no version counter: it is checked once, as it can be edited in place only under
        `torch.inference_mode`.)"""
        mosaic, checked = self.mosaic, self._checked_mosaic
        version = None if mosaic.is_inference() else mosaic._version
        if not checked or checked[0] is not mosaic or checked[1] != version:
            expected = (self.out_features, num_blocks_per_row(self.in_features, self.s))
            if tuple(mosaic.shape) != expected or mosaic.dtype != index_dtype(self.k):
                raise ValueError(
                    f"mosaic is {mosaic.dtype} {tuple(mosaic.shape)}, the layer needs "
                    f"{index_dtype(self.k)} {expected}: replace it with set_mosaic"
                )
            self.check_indices(mosaic)
            self._checked_mosaic = (mosaic, version)
        return mosaic

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, s={self.s}, "
            f"bits_per_weight={self.bits_per_weight:.3g}, scale={self.scale is not None}"
        )


class MoMosLinear(MoMosLayer):
    """Replaces `nn.Linear`: `y = x @ W^T + b`."""

    kind = "linear"
    replaces = nn.Linear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        motifs: nn.Parameter,
        mosaic: torch.Tensor,
        scale: Optional[nn.Parameter] = None,
        bias: Optional[nn.Parameter] = None,
        zero_motif: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, motifs, mosaic, scale, zero_motif)
        self.bias = bias

    @classmethod
    def _from_module(cls, module, in_features, out_features, motifs, mosaic, scale, zero_motif):
        return cls(in_features, out_features, motifs, mosaic, scale, module.bias, zero_motif)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.multiply(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def empty_module(self) -> nn.Module:
        return nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bias={self.bias is not None}"


class MoMosConv1D(MoMosLinear):
    """Replaces GPT-2's `Conv1D`, a linear layer whose weight is stored `[in, out]`: the matrix is its
    transpose, and `weight` and `merge()` give that layout back."""

    kind = "conv1d"
    replaces = Conv1D

    @staticmethod
    def matrix_of(module: nn.Module) -> torch.Tensor:
        return module.weight.T

    def module_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.T

    def empty_module(self) -> nn.Module:
        return Conv1D(self.out_features, self.in_features)


class MoMosEmbedding(MoMosLayer):
    """Replaces `nn.Embedding` (weight `[num_embeddings, embedding_dim]`): a token's vector is its mosaic
    row of motifs, gathered directly (no dense table is built)."""

    kind = "embedding"
    replaces = nn.Embedding
    multiplies_input = False

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        motifs: nn.Parameter,
        mosaic: torch.Tensor,
        scale: Optional[nn.Parameter] = None,
        padding_idx: Optional[int] = None,
        zero_motif: bool = False,
    ) -> None:
        super().__init__(embedding_dim, num_embeddings, motifs, mosaic, scale, zero_motif)
        self.padding_idx = padding_idx

    @staticmethod
    def input_rows(module: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        return None

    @classmethod
    def _from_module(cls, module, in_features, out_features, motifs, mosaic, scale, zero_motif):
        if module.max_norm is not None or module.scale_grad_by_freq or module.sparse:
            raise ValueError("MoMos replaces embeddings without max_norm, scale_grad_by_freq or sparse gradients")
        return cls(out_features, in_features, motifs, mosaic, scale, module.padding_idx, zero_motif)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        motifs = self.effective_motifs()
        matrix = self.matrix(motifs.dtype)
        if matrix is not None:
            return F.embedding(ids, matrix, self.padding_idx)
        rows = motifs[self.mosaic[ids].long()].flatten(-2)[..., : self.in_features]
        scale = full_tensor(self.scale)
        return rows if scale is None else rows * scale[ids].unsqueeze(-1).to(rows.dtype)

    def empty_module(self) -> nn.Module:
        return nn.Embedding(self.out_features, self.in_features, self.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.out_features}, {self.in_features}, k={self.k}, s={self.s}, scale={self.scale is not None}"


class MoMosConv2d(MoMosLayer):
    """Replaces `nn.Conv2d` (weight `[out, in / groups, kh, kw]`): the matrix is the weight with each output
    channel's filter flattened; forward convolves with the mosaic weight."""

    kind = "conv2d"
    replaces = nn.Conv2d
    CONV_OPTIONS = ("in_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")

    def __init__(
        self,
        conv: dict[str, Any],
        motifs: nn.Parameter,
        mosaic: torch.Tensor,
        scale: Optional[nn.Parameter] = None,
        bias: Optional[nn.Parameter] = None,
        zero_motif: bool = False,
    ) -> None:
        kh, kw = conv["kernel_size"]
        super().__init__(
            conv["in_channels"] // conv["groups"] * kh * kw, mosaic.shape[0], motifs, mosaic, scale, zero_motif
        )
        self.conv = dict(conv)
        # nn.Conv2d's own rule for padding modes other than zeros (the padding is applied before convolving)
        self.reversed_padding = nn.Conv2d(
            1, 1, conv["kernel_size"], padding=conv["padding"], dilation=conv["dilation"], device="meta"
        )._reversed_padding_repeated_twice
        self.bias = bias

    @staticmethod
    def matrix_of(module: nn.Module) -> torch.Tensor:
        return module.weight.flatten(1)

    @staticmethod
    def input_rows(module: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        if module.groups != 1 or isinstance(module.padding, str):
            raise ValueError(
                "data-aware fitting supports convolutions with groups=1 and numeric padding; use fit='kmeans'"
            )
        if module.padding_mode != "zeros":
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0 if module.padding_mode != "zeros" else module.padding
        patches = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)  # [b, in * kh * kw, l]
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])

    @classmethod
    def _from_module(cls, module, in_features, out_features, motifs, mosaic, scale, zero_motif):
        return cls(
            {name: getattr(module, name) for name in cls.CONV_OPTIONS}, motifs, mosaic, scale, module.bias, zero_motif
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        matrix = self.matrix(x.dtype)
        weight = self.module_layout(self.mosaic_weight(x.dtype) if matrix is None else matrix)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        conv = self.conv
        if conv["padding_mode"] != "zeros":  # as nn.Conv2d: pad explicitly, then convolve without padding
            padded = F.pad(x, self.reversed_padding, mode=conv["padding_mode"])
            return F.conv2d(padded, weight, bias, conv["stride"], 0, conv["dilation"], conv["groups"])
        return F.conv2d(x, weight, bias, conv["stride"], conv["padding"], conv["dilation"], conv["groups"])

    def module_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.reshape(
            self.out_features, self.conv["in_channels"] // self.conv["groups"], *self.conv["kernel_size"]
        )

    def empty_module(self) -> nn.Module:
        options = {name: self.conv[name] for name in self.CONV_OPTIONS if name != "in_channels"}
        return nn.Conv2d(self.conv["in_channels"], self.out_features, bias=self.bias is not None, **options)


LAYER_TYPES: dict[str, type[MoMosLayer]] = {
    cls.kind: cls for cls in (MoMosLinear, MoMosConv1D, MoMosEmbedding, MoMosConv2d)
}


def layer_class_for(module: nn.Module) -> Optional[type[MoMosLayer]]:
    """The MoMos class that replaces `module`, `None` if none does. Exact types only: a subclass (say an
    embedding that scales its output) may compute something a MoMos layer would silently drop."""
    return next((cls for cls in LAYER_TYPES.values() if type(module) is cls.replaces), None)


def replace_with_momos(
    model: nn.Module,
    name: str,
    *,
    motifs: nn.Parameter,
    mosaic: torch.Tensor,
    scale: Optional[nn.Parameter] = None,
    zero_motif: bool = False,
    motif_bits: Optional[int] = None,
) -> MoMosLayer:
    """Swap module `name` of `model` for its MoMos layer around `motifs`, `mosaic` and `scale` (fitted ones
    at conversion, empty ones on the meta device when loading): the one place a module is replaced."""
    module = model.get_submodule(name)
    cls = layer_class_for(module)
    if cls is None:
        raise ValueError(
            f"{name} is a {type(module).__name__}, which MoMos does not replace; it replaces "
            f"{', '.join(c.replaces.__name__ for c in LAYER_TYPES.values())}"
        )
    layer = cls.from_module(module, motifs, mosaic, scale, zero_motif)
    layer.motif_bits = motif_bits
    model.set_submodule(name, layer)
    return layer


def momos_layers(model: nn.Module) -> dict[str, MoMosLayer]:
    """Every MoMos layer of `model` by full name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, MoMosLayer)}


def cast_parameters(model: nn.Module, dtype: torch.dtype, motif_dtype: Optional[torch.dtype]) -> None:
    """Cast every parameter (not the buffers, as loading in that dtype leaves them) in place."""
    motif_ids = {id(layer.motifs) for layer in momos_layers(model).values()}
    for param in model.parameters():
        param.data = param.data.to(motif_dtype if motif_dtype is not None and id(param) in motif_ids else dtype)


def untouched_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the model's first floating-point parameter outside its MoMos layers (its storage dtype)."""
    momos = {id(p) for layer in momos_layers(model).values() for p in layer.parameters()}
    return next((p.dtype for p in model.parameters() if p.is_floating_point() and id(p) not in momos), None)
