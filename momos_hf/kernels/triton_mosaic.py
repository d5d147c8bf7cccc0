"""MoMos products as Triton kernels (GPU; tested on CPU under `TRITON_INTERPRET=1`). None writes the dense weight
`W = motifs[mosaic]` to memory: every kernel decodes the tiles it needs in registers from the mosaic and the
dictionary, which is small enough (`k * s` values) to stay in cache.

- `lookup` (decode, few rows): the table `T[row, j, m]` = input chunk `j` dotted with motif `m` is one batched
  matmul (`rows * in * k` multiply-adds); `_lookup_kernel` then sums `T[row, j, mosaic[o, j]]` over `j` for a
  tile of outputs, reading the mosaic as stored (one byte per block for k <= 256) and the table by gathers
  that hit the L2 cache (`nb * k` floats per row). Row scales are applied in its epilogue. The table is not
  built inside the kernel because every tile of outputs would build all of it again.
- `matmul` (prefill and training, many rows): a tiled GEMM, `x` tiles times weight tiles decoded by
  `_weight_tile`.
- backward (both): `_input_grad_kernel` (`dy * scale @ W`, weight tiles decoded again) and `_motif_grad_kernel`
  (tiles of `dy^T x` scattered into the motifs they came from with atomic adds, and summed against the weight
  for the scales' gradient), so fine-tuning in `motifs` mode never holds `W` or its gradient either.

Any `k` (mosaics of uint8, uint16 or int32), any `s` (a row's last block is padded), float16/bfloat16/float32
inputs and motifs, dictionaries shared by several layers. Accumulation is float32.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

LOOKUP_CONFIGS = [
    triton.Config({"BLOCK_O": o, "BLOCK_J": j}, num_warps=w)
    for o, j, w in ((64, 32, 4), (128, 32, 4), (32, 64, 2), (128, 64, 8))
]
MATMUL_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
    for m, n, k, w, st in ((16, 64, 64, 4, 3), (64, 64, 32, 4, 3), (128, 128, 32, 8, 3), (128, 64, 64, 4, 4))
]


def tuned(configs: list[triton.Config], key: list[str], **options):
    """Autotune over `configs` on a device; under `TRITON_INTERPRET=1` there is no device to time them on,
    so the first config runs (tests cover the kernels' logic, not their speed)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return triton.heuristics({name: (lambda args, v=value: v) for name, value in configs[0].kwargs.items()})
    return triton.autotune(configs=configs, key=key, **options)


@triton.jit
def _codes(mosaic_ptr, outs, cols, out_features, in_features, nb, S: tl.constexpr):
    """Motif index of weight entry (o, c): mosaic[o, c // S]; entries outside the matrix read 0 and are masked."""
    mask = (outs[:, None] < out_features) & (cols[None, :] < in_features)
    codes = tl.load(mosaic_ptr + outs[:, None].to(tl.int64) * nb + cols[None, :] // S, mask=mask, other=0)
    return codes.to(tl.int64), mask


@triton.jit
def _weight_tile(motifs_ptr, mosaic_ptr, outs, cols, out_features, in_features, nb, S: tl.constexpr):
    """`W[outs, cols]` (unscaled, the motifs' dtype) decoded from the mosaic: entry (o, c) is motif
    mosaic[o, c // S] at position c % S; zero outside the matrix."""
    codes, mask = _codes(mosaic_ptr, outs, cols, out_features, in_features, nb, S)
    return tl.load(motifs_ptr + codes * S + cols[None, :] % S, mask=mask, other=0.0)


@tuned(LOOKUP_CONFIGS, key=["out_features", "nb", "k"])
@triton.jit
def _lookup_kernel(
    table_ptr,
    mosaic_ptr,
    scale_ptr,
    y_ptr,
    out_features,
    nb,
    k,
    HAS_SCALE: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    row = tl.program_id(1)
    outs = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    table = table_ptr + row.to(tl.int64) * nb * k
    acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for j0 in range(0, nb, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        mask = (outs[:, None] < out_features) & (js[None, :] < nb)
        codes = tl.load(mosaic_ptr + outs[:, None].to(tl.int64) * nb + js[None, :], mask=mask, other=0).to(tl.int64)
        acc += tl.sum(tl.load(table + js[None, :].to(tl.int64) * k + codes, mask=mask, other=0.0), axis=1)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + outs, mask=outs < out_features, other=0.0).to(tl.float32)
    tl.store(y_ptr + row.to(tl.int64) * out_features + outs, acc.to(y_ptr.dtype.element_ty), mask=outs < out_features)


@tuned(MATMUL_CONFIGS, key=["out_features", "in_features"])
@triton.jit
def _matmul_kernel(
    x_ptr,
    motifs_ptr,
    mosaic_ptr,
    scale_ptr,
    y_ptr,
    rows,
    out_features,
    in_features,
    nb,
    S: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    ms = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    outs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, in_features, BLOCK_K):
        cols = c0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + ms[:, None].to(tl.int64) * in_features + cols[None, :],
            mask=(ms[:, None] < rows) & (cols[None, :] < in_features),
            other=0.0,
        )
        w = _weight_tile(motifs_ptr, mosaic_ptr, outs, cols, out_features, in_features, nb, S)
        acc = tl.dot(x.to(DOT), tl.trans(w.to(DOT)), acc, input_precision=PRECISION)
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + outs, mask=outs < out_features, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + ms[:, None].to(tl.int64) * out_features + outs[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=(ms[:, None] < rows) & (outs[None, :] < out_features),
    )


@tuned(MATMUL_CONFIGS, key=["out_features", "in_features"])
@triton.jit
def _input_grad_kernel(
    dy_ptr,
    motifs_ptr,
    mosaic_ptr,
    scale_ptr,
    dx_ptr,
    rows,
    out_features,
    in_features,
    nb,
    S: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dx[rows, in] = (dy * scale)[rows, out] @ W[out, in]; here BLOCK_K tiles the input features."""
    ms = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, out_features, BLOCK_N):
        outs = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(
            dy_ptr + ms[:, None].to(tl.int64) * out_features + outs[None, :],
            mask=(ms[:, None] < rows) & (outs[None, :] < out_features),
            other=0.0,
        )
        if HAS_SCALE:
            dy = (
                dy.to(tl.float32)
                * tl.load(scale_ptr + outs, mask=outs < out_features, other=0.0).to(tl.float32)[None, :]
            ).to(dy.dtype)
        w = _weight_tile(motifs_ptr, mosaic_ptr, outs, cols, out_features, in_features, nb, S)
        acc = tl.dot(dy.to(DOT), w.to(DOT), acc, input_precision=PRECISION)
    tl.store(
        dx_ptr + ms[:, None].to(tl.int64) * in_features + cols[None, :],
        acc.to(dx_ptr.dtype.element_ty),
        mask=(ms[:, None] < rows) & (cols[None, :] < in_features),
    )


@tuned(MATMUL_CONFIGS, key=["out_features", "in_features"], reset_to_zero=["dmotifs_ptr", "dscale_ptr"])
@triton.jit
def _motif_grad_kernel(
    dy_ptr,
    x_ptr,
    motifs_ptr,
    mosaic_ptr,
    scale_ptr,
    dmotifs_ptr,
    dscale_ptr,
    rows,
    out_features,
    in_features,
    nb,
    S: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The weight gradient `G = dy^T x` one [BLOCK_N, BLOCK_K] tile at a time, never whole: entry (o, c) goes to
    motif mosaic[o, c // S], position c % S (times scale[o]), and `sum_c G * W` to scale[o]'s gradient."""
    outs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    grad = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, rows, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)
        dy = tl.load(
            dy_ptr + ms[:, None].to(tl.int64) * out_features + outs[None, :],
            mask=(ms[:, None] < rows) & (outs[None, :] < out_features),
            other=0.0,
        )
        x = tl.load(
            x_ptr + ms[:, None].to(tl.int64) * in_features + cols[None, :],
            mask=(ms[:, None] < rows) & (cols[None, :] < in_features),
            other=0.0,
        )
        grad = tl.dot(tl.trans(dy.to(DOT)), x.to(DOT), grad, input_precision=PRECISION)
    codes, mask = _codes(mosaic_ptr, outs, cols, out_features, in_features, nb, S)
    scale = (
        tl.load(scale_ptr + outs, mask=outs < out_features, other=0.0).to(tl.float32)
        if HAS_SCALE
        else tl.full((BLOCK_N,), 1.0, tl.float32)
    )
    tl.atomic_add(dmotifs_ptr + codes * S + cols[None, :] % S, grad * scale[:, None], mask=mask)
    if HAS_SCALE:
        w = tl.load(motifs_ptr + codes * S + cols[None, :] % S, mask=mask, other=0.0).to(tl.float32)
        tl.atomic_add(dscale_ptr + outs, tl.sum(grad * w, axis=1), mask=outs < out_features)


def _dot(dtype: torch.dtype) -> dict:
    """Tile dtype and precision of `tl.dot`: the inputs' dtype, IEEE float32 for float32 inputs (torch's
    default for matmul; tf32's setting is moot for 16-bit inputs). The interpreter's `tl.dot` gives garbage
    for bfloat16 tiles (seen with triton 3.9), so there they are multiplied in float32."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    tile = torch.float32 if interpreted and dtype == torch.bfloat16 else dtype
    return {
        "DOT": getattr(tl, str(tile).removeprefix("torch.")),
        "PRECISION": "ieee" if tile == torch.float32 else "tf32",
    }


def _forward(
    x: torch.Tensor,
    motifs: torch.Tensor,
    mosaic: torch.Tensor,
    scale: Optional[torch.Tensor],
    in_features: int,
    kernel: str,
) -> torch.Tensor:
    k, s = motifs.shape
    out_features, nb = mosaic.shape
    rows = x.shape[0]
    y = torch.empty(rows, out_features, device=x.device, dtype=x.dtype)
    scale_arg = scale if scale is not None else y  # never read without HAS_SCALE
    if kernel == "lookup":
        chunks = torch.nn.functional.pad(x, (0, nb * s - in_features)).view(rows, nb, s).float()
        table = torch.matmul(chunks, motifs.float().T).contiguous()  # [rows, nb, k]
        grid = lambda meta: (triton.cdiv(out_features, meta["BLOCK_O"]), rows)
        _lookup_kernel[grid](table, mosaic, scale_arg, y, out_features, nb, k, HAS_SCALE=scale is not None)
    else:
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(out_features, meta["BLOCK_N"]))
        _matmul_kernel[grid](
            x,
            motifs,
            mosaic,
            scale_arg,
            y,
            rows,
            out_features,
            in_features,
            nb,
            S=s,
            HAS_SCALE=scale is not None,
            **_dot(x.dtype),
        )
    return y


class MosaicProduct(torch.autograd.Function):
    """`x[rows, in] @ (scale * motifs[mosaic])^T` by a Triton kernel, with gradients for `x`, `motifs` and
    `scale` computed by Triton kernels too."""

    @staticmethod
    def forward(ctx, x, motifs, mosaic, scale, in_features, kernel):
        ctx.save_for_backward(x, motifs, mosaic, scale)
        ctx.in_features = in_features
        return _forward(x, motifs, mosaic, scale, in_features, kernel)

    @staticmethod
    def backward(ctx, dy):
        x, motifs, mosaic, scale = ctx.saved_tensors
        k, s = motifs.shape
        out_features, nb = mosaic.shape
        rows, in_features = x.shape
        dy = dy.contiguous()
        has_scale, dot = scale is not None, _dot(dy.dtype)
        dx = dmotifs = dscale = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(in_features, meta["BLOCK_K"]))
            _input_grad_kernel[grid](
                dy,
                motifs,
                mosaic,
                scale if has_scale else dy,
                dx,
                rows,
                out_features,
                in_features,
                nb,
                S=s,
                HAS_SCALE=has_scale,
                **dot,
            )
        if ctx.needs_input_grad[1] or (has_scale and ctx.needs_input_grad[3]):
            dmotifs = torch.zeros(k, s, device=x.device, dtype=torch.float32)
            dscale = torch.zeros(out_features, device=x.device, dtype=torch.float32)
            grid = lambda meta: (triton.cdiv(out_features, meta["BLOCK_N"]), triton.cdiv(in_features, meta["BLOCK_K"]))
            _motif_grad_kernel[grid](
                dy,
                x,
                motifs,
                mosaic,
                scale if has_scale else dy,
                dmotifs,
                dscale,
                rows,
                out_features,
                in_features,
                nb,
                S=s,
                HAS_SCALE=has_scale,
                **dot,
            )
            dmotifs = dmotifs.to(motifs.dtype) if ctx.needs_input_grad[1] else None
            dscale = dscale.to(scale.dtype) if has_scale and ctx.needs_input_grad[3] else None
        return dx, dmotifs, None, dscale, None, None


def triton_product(
    x: torch.Tensor,
    motifs: torch.Tensor,
    mosaic: torch.Tensor,
    scale: Optional[torch.Tensor],
    in_features: int,
    kernel: str,
) -> torch.Tensor:
    """`x[..., in] @ W_hat^T` by the Triton `kernel` ("lookup" or "matmul"; module docstring), differentiable."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    y = MosaicProduct.apply(rows, motifs.contiguous(), mosaic.contiguous(), scale, in_features, kernel)
    return y.reshape(*x.shape[:-1], mosaic.shape[0])
