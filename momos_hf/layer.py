"""`MoMosLinear`: the module that replaces an `nn.Linear` or a GPT-2 `Conv1D` by motifs and a mosaic."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers.pytorch_utils import Conv1D

from .fitting import index_bits, index_dtype, num_blocks_per_row, reconstruct
from .lookup import lookup_linear, use_lookup
from .packing import pack_indices, packed_size, unpack_indices

LinearLike = Union[nn.Linear, Conv1D]
MODULE_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
MAX_K = 2**31 - 1  # mosaics are int32 at most


@dataclass(frozen=True)
class LayerSpec:
    """What a checkpoint records of one MoMos layer, and all the loader needs to rebuild it.

    `motifs` names the layer whose `motifs` tensor this one uses (itself, unless the dictionary is shared);
    `fit_error` is the relative weight error of the fit (absent when unknown)."""

    in_features: int
    out_features: int
    k: int
    s: int
    scale: bool
    conv1d: bool
    motifs: str
    fit_error: Optional[float] = None

    @classmethod
    def from_dict(cls, name: str, values: Any) -> "LayerSpec":
        """Validate one `quantization_config.layers` entry; errors name the layer and the field."""
        where = f"quantization_config.layers[{name!r}]"
        if not isinstance(name, str) or not MODULE_NAME.fullmatch(name):
            raise ValueError(f"{where}: {name!r} is not a module name")
        if not isinstance(values, dict):
            raise ValueError(f"{where} must be an object, got {type(values).__name__}")
        required = {"in_features", "out_features", "k", "s", "scale", "conv1d", "motifs"}
        missing, unknown = required - set(values), set(values) - required - {"fit_error"}
        if missing or unknown:
            raise ValueError(f"{where} lacks {sorted(missing)}" if missing else f"{where} has unknown fields {sorted(unknown)}")
        for field, upper in (("in_features", None), ("out_features", None), ("k", MAX_K), ("s", None)):
            value = values[field]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1 or (upper and value > upper):
                raise ValueError(f"{where}.{field} must be an integer in [1, {upper or 'inf'}], got {value!r}")
        for field in ("scale", "conv1d"):
            if not isinstance(values[field], bool):
                raise ValueError(f"{where}.{field} must be true or false, got {values[field]!r}")
        if not isinstance(values["motifs"], str) or not MODULE_NAME.fullmatch(values["motifs"]):
            raise ValueError(f"{where}.motifs must name a MoMos layer, got {values['motifs']!r}")
        error = values.get("fit_error")
        if error is not None and (not isinstance(error, (int, float)) or isinstance(error, bool) or not math.isfinite(error)):
            raise ValueError(f"{where}.fit_error must be a finite number, got {error!r}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        if self.fit_error is None:
            del values["fit_error"]
        return values

    @property
    def num_blocks(self) -> int:
        return self.out_features * num_blocks_per_row(self.in_features, self.s)


def full_tensor(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The whole value of a parameter that FSDP 2 has sharded (a DTensor outside forward), else itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


@torch.no_grad()
def assign_(param: torch.Tensor, value: torch.Tensor) -> None:
    """`param.copy_(value)` that also fills a sharded DTensor (rank 0's value is scattered to all ranks)."""
    if isinstance(param, DTensor):
        value = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)
    param.copy_(value)


class MoMosLinear(nn.Module):
    """A linear layer whose weight is `motifs[mosaic]`, optionally times a scale per output row.

    - `motifs[k, s]`: trainable parameter, possibly the same object in several layers (global scope).
    - `mosaic[out, ceil(in / s)]`: integer buffer of the smallest dtype that holds `k` (uint8 for k <= 256).
    - `scale[out]`: optional trainable parameter.
    - `bias[out]`: the original layer's bias, kept as it was.
    - `latent`: optional dense `[out, in]` weight for the `"projected"` and `"ste"` training modes
      (`enable_latent`); forward then uses it directly (`projected`) or through the mosaic with a
      straight-through gradient (`ste`). Checkpoints never store it.

    The weight is stored as `[out, in]` whatever the original layer was; `conv1d=True` remembers that it
    replaced a GPT-2 `Conv1D` (weight `[in, out]`), so `weight` and `merge()` give that layout back.
    Rows are padded internally to a multiple of `s`; the padding is cut before any product.

    Forward never needs the dense weight in memory: up to 32 input rows it uses the lookup-table product
    (`momos_hf.lookup`), beyond that it reconstructs the weight for one matmul and frees it. With
    `cache_weight = True` it keeps the reconstructed weight instead (throughput at the cost of dense
    memory); the cache follows in-place changes to motifs, scale and mosaic.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        motifs: nn.Parameter,
        mosaic: torch.Tensor,
        scale: Optional[nn.Parameter] = None,
        bias: Optional[nn.Parameter] = None,
        zero_motif: bool = False,
        conv1d: bool = False,
    ) -> None:
        super().__init__()
        k, s = motifs.shape
        expected = (out_features, num_blocks_per_row(in_features, s))
        if tuple(mosaic.shape) != expected:
            raise ValueError(f"mosaic shape {tuple(mosaic.shape)} does not fit a {out_features}x{in_features} layer with s={s}; expected {expected}")
        self.in_features = in_features
        self.out_features = out_features
        self.zero_motif = zero_motif
        self.conv1d = conv1d
        self.motifs = motifs
        # `mosaic` is what forward reads; `mosaic_packed` (ceil(log2 k) bits per block) is what state
        # dicts and checkpoints carry. `set_mosaic` keeps them in step; loading refills `mosaic`.
        self.register_buffer("mosaic", mosaic.to(index_dtype(k)), persistent=False)
        packed_bytes = packed_size(mosaic.numel(), index_bits(k))
        self.register_buffer("mosaic_packed", torch.empty(packed_bytes, dtype=torch.uint8, device=mosaic.device))
        self._needs_unpack = mosaic.device.type == "meta"  # a skeleton whose weights are yet to load
        if not self._needs_unpack:
            self.set_mosaic(mosaic)
        self.scale = scale
        self.bias = bias
        self.latent: Optional[nn.Parameter] = None
        self.fit_error: Optional[float] = None  # relative weight error of the last fit, when known
        # Calibration inputs' second moment `X^T X / tokens`, kept for data-aware refits in projected/ste modes.
        self.register_buffer("input_moment", None, persistent=False)
        self.train_mode = "motifs"
        self.cache_weight = False
        self._cached: Optional[tuple[tuple, torch.Tensor]] = None  # (versions it was built from, weight)
        self.register_load_state_dict_post_hook(lambda module, _: module.unpack_mosaic())

    @classmethod
    def from_module(
        cls,
        module: LinearLike,
        motifs: nn.Parameter,
        mosaic: torch.Tensor,
        scale: Optional[torch.Tensor] = None,
        zero_motif: bool = False,
    ) -> "MoMosLinear":
        """Wrap `module`'s shape and bias around a fitted dictionary and mosaic."""
        conv1d = isinstance(module, Conv1D)
        in_features, out_features = module.weight.shape if conv1d else module.weight.shape[::-1]
        device = module.weight.device
        scale_param = None if scale is None else nn.Parameter(scale.to(device=device, dtype=motifs.dtype))
        return cls(in_features, out_features, motifs, mosaic.to(device), scale_param, module.bias, zero_motif, conv1d)

    def spec(self, motifs_owner: str) -> LayerSpec:
        """The checkpoint's record of this layer; `motifs_owner` names the layer that stores its motifs."""
        return LayerSpec(self.in_features, self.out_features, self.k, self.s, self.scale is not None, self.conv1d,
                         motifs_owner, self.fit_error)

    @torch.no_grad()
    def set_mosaic(self, mosaic: torch.Tensor) -> None:
        """Replace the mosaic (`[out, ceil(in / s)]`, values in `0..k-1`) and its packed copy."""
        if tuple(mosaic.shape) != tuple(self.mosaic.shape):
            raise ValueError(f"mosaic shape {tuple(mosaic.shape)} != {tuple(self.mosaic.shape)}")
        self.mosaic = mosaic.to(device=self.mosaic.device, dtype=index_dtype(self.k))
        self.mosaic_packed = pack_indices(self.mosaic, index_bits(self.k)).to(self.mosaic.device)
        self._cached = None

    @torch.no_grad()
    def unpack_mosaic(self) -> None:
        """Rebuild `mosaic` from `mosaic_packed` (after loading a checkpoint), checking every index."""
        count = self.mosaic.numel()
        mosaic = unpack_indices(self.mosaic_packed, index_bits(self.k), count)
        if count and int(mosaic.max()) >= self.k:
            raise ValueError(f"mosaic holds index {int(mosaic.max())} but the layer has only k={self.k} motifs")
        self.mosaic = mosaic.reshape(self.mosaic.shape).to(device=self.mosaic_packed.device, dtype=index_dtype(self.k))
        self._needs_unpack = False
        self._cached = None

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

    def effective_motifs(self) -> torch.Tensor:
        """The motifs forward uses: motif 0 is exactly zero under `zero_motif`, whatever training did."""
        if self._needs_unpack:  # Transformers' weight init may read `.weight` before loading finishes
            self.unpack_mosaic()
        motifs = full_tensor(self.motifs)
        if self.zero_motif:
            motifs = torch.cat([torch.zeros_like(motifs[:1]), motifs[1:]])
        return motifs

    def dense_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The constrained weight `[out, in]` in `dtype` (default: the motifs' dtype), computed in the wider
        of the two so that it is rounded once (autograd flows to motifs and scale)."""
        motifs, scale = self.effective_motifs(), full_tensor(self.scale)
        dtype = dtype or motifs.dtype
        wide = torch.promote_types(motifs.dtype, dtype)
        weight = reconstruct(motifs.to(wide), self.mosaic, self.in_features, None if scale is None else scale.to(wide))
        return weight.to(dtype)

    def cached_weight(self) -> torch.Tensor:
        """`dense_weight()` without autograd, rebuilt only when motifs, scale or mosaic changed."""
        versions = (self.motifs._version, None if self.scale is None else self.scale._version)
        if self._cached is None or self._cached[0] != versions:
            with torch.no_grad():
                self._cached = (versions, self.dense_weight())
        return self._cached[1]

    @property
    def weight(self) -> torch.Tensor:
        """The weight in the original layer's layout (`[in, out]` for `Conv1D`), for code that reads it."""
        weight = self.dense_weight()
        return weight.T if self.conv1d else weight

    def enable_latent(self, train_mode: str, weight: Optional[torch.Tensor] = None) -> None:
        """Give the layer a trainable dense latent weight (`weight`, default the mosaic weight)."""
        if train_mode not in ("projected", "ste"):
            raise ValueError(f"a latent weight serves train_mode 'projected' or 'ste', not {train_mode!r}")
        with torch.no_grad():
            start = self.dense_weight() if weight is None else weight.to(self.motifs.dtype)
        self.latent = nn.Parameter(start.detach().clone())
        self.train_mode = train_mode

    def training_weight(self) -> torch.Tensor:
        """The weight forward uses: the mosaic weight, the latent (`projected`), or the mosaic weight with
        the latent's straight-through gradient (`ste`)."""
        if self.latent is None:
            return self.dense_weight()
        if self.train_mode == "projected":
            return self.latent
        with torch.no_grad():
            mosaic_weight = self.dense_weight()
        return mosaic_weight + (self.latent - self.latent.detach())  # exactly the mosaic weight in value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.latent is not None:
            weight = self.training_weight()
        elif self.cache_weight and not torch.is_grad_enabled():
            weight = self.cached_weight()
        elif use_lookup(x.numel() // x.shape[-1]):
            y = lookup_linear(x, self.effective_motifs(), self.mosaic, full_tensor(self.scale))
            return y if bias is None else y + bias
        else:
            weight = self.dense_weight(x.dtype)
        return nn.functional.linear(x, weight.to(x.dtype), bias)

    def merge(self, dtype: Optional[torch.dtype] = None) -> LinearLike:
        """A plain `nn.Linear` (or `Conv1D`) holding the constrained weight in `dtype` (default: the motifs')."""
        with torch.no_grad():
            weight = self.dense_weight(dtype)
        with torch.device("meta"):  # shapes only: both parameters are replaced right below
            if self.conv1d:
                layer = Conv1D(self.out_features, self.in_features)
            else:
                layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        layer.weight = nn.Parameter(weight.T.contiguous() if self.conv1d else weight)
        layer.bias = self.bias
        return layer

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, s={self.s}, "
            f"bits_per_weight={self.bits_per_weight:.3g}, scale={self.scale is not None}, "
            f"bias={self.bias is not None}{', conv1d=True' if self.conv1d else ''}"
        )
