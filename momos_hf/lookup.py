"""Lookup-table product: `x @ W_hat^T` straight from motifs and mosaic, without the dense `W_hat`.

Each input row is cut into `nb` chunks of `s` values; every chunk is dotted with all `k` motifs once,
giving a table `T[nb, k]` per row (`in * k` multiply-adds). Output `o` is then the sum over `j` of
`T[j, mosaic[o, j]]`: `out * nb = out * in / s` additions instead of `out * in` multiply-adds, and
only the small integer mosaic is read instead of a dense matrix. That wins when few rows share the
weight (decoding); `MoMosLinear` picks it by shape (see `use_lookup`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

LOOKUP_MAX_TOKENS = 32  # measured on 2 CPU cores, 512-4096 features (benchmarks/inference.py)
MIN_TABLE_WIDTH = 4  # embedding_bag is slow on one-value rows: pad the table to at least 4 columns


def use_lookup(tokens: int) -> bool:
    """The automatic rule: lookup for at most 32 rows, else reconstruct the weight and multiply. Below
    32 rows the lookup measured faster than reconstructing at every size from 512 to 4096."""
    return tokens <= LOOKUP_MAX_TOKENS


def lookup_linear(x: torch.Tensor, motifs: torch.Tensor, mosaic: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`x[..., in] @ W_hat^T` with `W_hat = motifs[mosaic]` (times row `scale`), as `[..., out]`."""
    k, s = motifs.shape
    out_features, nb = mosaic.shape
    rows = x.reshape(-1, x.shape[-1])
    tokens = rows.shape[0]
    rows = F.pad(rows, (0, nb * s - rows.shape[1]))  # padded weights are zero-padded inputs' partners
    table = torch.einsum("tjs,ks->jkt", rows.view(tokens, nb, s), motifs.to(rows.dtype))
    table = F.pad(table.reshape(nb * k, tokens), (0, max(tokens, MIN_TABLE_WIDTH) - tokens))
    # Row (j, m) of the table is chunk j dotted with motif m, so block (o, j) reads row j * k + mosaic[o, j].
    offsets = torch.arange(0, nb * k, k, dtype=torch.int32, device=mosaic.device)
    y = F.embedding_bag(mosaic.to(torch.int32) + offsets, table, mode="sum")[:, :tokens].T
    if scale is not None:
        y = y * scale.to(y.dtype)
    return y.reshape(*x.shape[:-1], out_features)
