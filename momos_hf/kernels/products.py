"""Products `x @ W_hat^T` of an input with a MoMos weight `W_hat = motifs[mosaic]` (times a scale per row),
and the choice of product per call. Pure functions: no modules.

Every product has one signature, `product(x[..., in], motifs[k, s], mosaic[out, nb], scale[out] | None,
in_features) -> y[..., out]`, so a new kernel is one function and one entry in `PRODUCTS` (and a line in
`select_product` if it should be picked automatically). A layer's `product` attribute overrides the choice.

- `reconstruct`: build `W_hat` (one gather), one matmul, free it. The dense fallback; any device, dtype, shape.
- `lookup`: each input row is cut into `nb` chunks of `s` values; every chunk is dotted with all `k` motifs
  once, giving a table `T[nb, k]` per row (`in * k` multiply-adds). Output `o` is then the sum over `j` of
  `T[j, mosaic[o, j]]`: `out * nb = out * in / s` additions instead of `out * in` multiply-adds, and only the
  small integer mosaic is read instead of a dense matrix. That wins when few rows share the weight (decoding).
- `compiled_lookup`: the same lookup as one compiled C++/OpenMP function (`momos_hf.kernels.cpu`): CPU inference.
- `triton_lookup`, `triton_matmul`: Triton kernels that decode the weight in registers, with a backward
  (`momos_hf.kernels.triton_mosaic`; `pip install momos-hf[triton]`). Not picked automatically yet: they have
  not been timed on a GPU; a layer or model opts in with `product` / `set_product`.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..mosaic import reconstruct
from .cpu import compiled_lookup_product, library

Product = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], int], torch.Tensor]

# The lookup's table costs `rows * in * k`, reconstruction `out * in` and the matmul: the lookup is picked while
# rows * k <= LOOKUP_TABLE_RATIO * out_features (measured on 2 CPU cores, benchmarks/inference.py)
LOOKUP_TABLE_RATIO = 8
MIN_TABLE_WIDTH = 4  # embedding_bag is slow on one-value rows: pad the table to at least 4 columns


def reconstruct_product(
    x: torch.Tensor, motifs: torch.Tensor, mosaic: torch.Tensor, scale: Optional[torch.Tensor], in_features: int
) -> torch.Tensor:
    """`x @ W_hat^T` through the reconstructed weight (computed in the wider of the two dtypes, rounded once)."""
    wide = torch.promote_types(motifs.dtype, x.dtype)
    weight = reconstruct(motifs.to(wide), mosaic, in_features, None if scale is None else scale.to(wide))
    return F.linear(x, weight.to(x.dtype))


def lookup_product(
    x: torch.Tensor, motifs: torch.Tensor, mosaic: torch.Tensor, scale: Optional[torch.Tensor], in_features: int
) -> torch.Tensor:
    """`x @ W_hat^T` from a table of input chunks times motifs, summed by the mosaic (no dense `W_hat`). In
    float32 at least, the result rounded once to `x`'s dtype: the sums come before the row scale, so in a 16-bit
    dtype they overflow where the scaled result does not (inf, and NaN where the scale is 0)."""
    k, s = motifs.shape
    out_features, nb = mosaic.shape
    rows = x.reshape(-1, x.shape[-1]).to(torch.promote_types(x.dtype, torch.float32))
    tokens = rows.shape[0]
    rows = F.pad(rows, (0, nb * s - rows.shape[1]))  # padded weights are zero-padded inputs' partners
    table = torch.einsum("tjs,ks->jkt", rows.view(tokens, nb, s), motifs.to(rows.dtype))
    table = F.pad(table.reshape(nb * k, tokens), (0, max(tokens, MIN_TABLE_WIDTH) - tokens))
    # Row (j, m) of the table is chunk j dotted with motif m, so block (o, j) reads row j * k + mosaic[o, j].
    offsets = torch.arange(0, nb * k, k, dtype=torch.int32, device=mosaic.device)
    y = F.embedding_bag(mosaic.to(torch.int32) + offsets, table, mode="sum")[:, :tokens].T
    if scale is not None:
        y = y * scale.to(y.dtype)
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)


def triton_kernel(kernel: str) -> Product:
    """The Triton kernel `kernel` ("lookup" or "matmul"), imported at first call: triton is optional and slow
    to import."""

    def product(x, motifs, mosaic, scale, in_features):
        from .triton_mosaic import triton_product

        return triton_product(x, motifs, mosaic, scale, in_features, kernel)

    product.__doc__ = f"`x @ W_hat^T` by the Triton `{kernel}` kernel (`momos_hf.kernels.triton_mosaic`)."
    return product


PRODUCTS: dict[str, Product] = {
    "reconstruct": reconstruct_product,
    "lookup": lookup_product,
    "compiled_lookup": compiled_lookup_product,
    "triton_lookup": triton_kernel("lookup"),
    "triton_matmul": triton_kernel("matmul"),
}


def select_product(x: torch.Tensor, motifs: torch.Tensor, scale: Optional[torch.Tensor], out_features: int) -> str:
    """The product for this call, by device, dtype and shape.

    CPU, while `rows * k <= LOOKUP_TABLE_RATIO * out_features` (few rows, a small table): the lookup, compiled
    where no gradient is needed, the input is float32/16-bit (it computes in float32) and a compiler built it,
    else the torch-op lookup. Everything else, and every other device: reconstruction (the Triton kernels are
    not picked until they are timed on a GPU)."""
    rows = x.numel() // max(x.shape[-1], 1)
    if x.device.type != "cpu" or rows * motifs.shape[0] > LOOKUP_TABLE_RATIO * out_features:
        return "reconstruct"
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, motifs, scale))
    if not needs_grad and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and library() is not None:
        return "compiled_lookup"
    return "lookup"
