"""The mosaic form as pure functions: blocks, reconstruction, index widths, q-bit motif grids. No modules, no I/O.

Shapes: a weight matrix `W[out, in]` is cut along `in` into `nb = ceil(in / s)` blocks per row (the last
one zero-padded), giving `blocks[out * nb, s]`. A dictionary is `motifs[k, s]`; a mosaic is an integer map
`mosaic[out, nb]` with values in `0..k-1`; the constrained weight is `motifs[mosaic]` with padding dropped.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def index_bits(k: int) -> int:
    """Bits of one mosaic entry: `ceil(log2 k)` (0 when there is a single motif)."""
    return max(0, math.ceil(math.log2(k)))


def motif_grid(motifs: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's q-bit motifs: each value's code in `0 .. 2**bits - 2` on a symmetric grid of `2**bits - 1`
    levels, and the grid's step, the dictionary's largest `|value|` over `2**(bits-1) - 1` (float32; zero
    stays exact, so does a zero motif)."""
    levels = 2 ** (bits - 1) - 1
    step = motifs.detach().abs().amax().float() / levels
    codes = torch.round(motifs.detach().float() / (step if step > 0 else 1.0)).clamp_(-levels, levels) + levels
    return codes.to(torch.int64), step


def grid_values(codes: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """The float32 values of q-bit codes (the inverse of `motif_grid`)."""
    return (codes.float() - (2 ** (bits - 1) - 1)) * step.float()


def quantize_motifs(motifs: torch.Tensor, bits: int) -> torch.Tensor:
    """`motifs` rounded onto their q-bit grid (see `motif_grid`), in their dtype."""
    return grid_values(*motif_grid(motifs, bits), bits).to(motifs.dtype)


def fake_quantize_motifs(motifs: torch.Tensor, bits: int) -> torch.Tensor:
    """`quantize_motifs` in the forward pass, the identity in the backward pass (straight-through)."""
    return motifs + (quantize_motifs(motifs.detach(), bits) - motifs.detach())


def dictionary_bits(k: int, s: int, value_bits: int, motif_bits: Optional[int] = None) -> int:
    """Bits of a dictionary `motifs[k, s]`: each value at its storage width `value_bits`, or at `motif_bits`
    plus the grid's float32 step when the motifs are quantised."""
    return k * s * value_bits if motif_bits is None else k * s * motif_bits + 32


def index_dtype(k: int) -> torch.dtype:
    """Smallest integer dtype that holds every index `0..k-1`."""
    if k <= 2**8:
        return torch.uint8
    if k <= 2**16:
        return torch.uint16
    return torch.int32


def num_blocks_per_row(in_features: int, s: int) -> int:
    return -(-in_features // s)


def to_blocks(weight: torch.Tensor, s: int) -> torch.Tensor:
    """`W[out, in]` -> `blocks[out * nb, s]`, zero-padding each row to a multiple of `s`."""
    out_features, in_features = weight.shape
    pad = num_blocks_per_row(in_features, s) * s - in_features
    return torch.nn.functional.pad(weight, (0, pad)).reshape(-1, s)


def padding_weights(out_features: int, in_features: int, s: int) -> Optional[torch.Tensor]:
    """Per-value weights `[out * nb, s]` that are 0 on padding and 1 elsewhere; `None` without padding."""
    if in_features % s == 0:
        return None
    nb = num_blocks_per_row(in_features, s)
    row = torch.zeros(nb * s)
    row[:in_features] = 1.0
    return row.reshape(nb, s).repeat(out_features, 1)


def reconstruct(
    motifs: torch.Tensor, mosaic: torch.Tensor, in_features: int, scale: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """`motifs[k, s]`, `mosaic[out, nb]` (and optional row scales `[out]`) -> `W_hat[out, in]`."""
    out_features = mosaic.shape[0]
    # index_select with int32 indices: measured 1.7x faster than `motifs[mosaic.long()]` on CPU
    weight = motifs.index_select(0, mosaic.reshape(-1).to(torch.int32)).reshape(out_features, -1)[:, :in_features]
    if scale is not None:
        weight = weight * scale.unsqueeze(1)
    return weight


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """`||W - W_hat||^2 / ||W - mean(W)||^2`, the relative squared error of the weights (1.0: as bad as their
    mean)."""
    weight, approx = weight.double(), approx.double()
    denom = (weight - weight.mean()).square().sum()
    return float((weight - approx).square().sum() / denom.clamp(min=1e-30))
