"""Scalar post-training quantizers that MoMos is compared against: RTN, HQQ and GPTQ.

Each quantizer maps a weight W[out, in] to its dequantized form (same shape and dtype, computed in
float32), with one scale and one offset per group of `group` consecutive input columns of a row.
`quantize_model` applies one of them in place to named nn.Linear / Conv1D modules of a model and
returns the bits per weight it would take to store them.

Grid (RTN and GPTQ): asymmetric min-max over the group, levels lo + s*k for k = 0 .. 2^bits - 1 with
s = (hi - lo) / (2^bits - 1); lo and s are kept as floats (they are paid for as fp16 in
bits_per_weight), so the group's min and max are levels. The GPTQ reference rounds the zero-point to an
integer and widens the range to include 0; we do not, so that RTN, GPTQ and HQQ share one storage model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

METHODS = ("rtn", "hqq", "gptq")

# -----------------------------------------------------------------------------
# storage cost


def bits_per_weight(bits: int, group: int, meta_bits: int = 16) -> float:
    """Codes plus one scale and one zero-point per group: bits + 2 * meta_bits / group."""
    return bits + 2 * meta_bits / group


# What hqq 0.2.8 stores per weight code (hqq/core/quantize.py, Quantizer.bit_to_packing and
# hqq/core/bitpack.py): 3 bits are packed 10 to an int32 ("3bit_32"), 5 and 6 bits are not bit-packed
# but kept one per uint8 ("8bit_u8", marked "todo: bitpacking"); 1, 2, 4, 8 bits pack exactly.
_HQQ_CODE_BITS = {1: 1.0, 2: 2.0, 3: 3.2, 4: 4.0, 5: 8.0, 6: 8.0, 8: 8.0}


def hqq_bits_per_weight(bits: int, group: int) -> float:
    """Bits per weight that hqq's default HQQLinear stores: packed codes + fp16 scale + fp16 zero per group.

    Counts: the packed code tensor W_q (see _HQQ_CODE_BITS: 3 bits cost 3.2) and, per group, one scale and
    one zero in compute_dtype=float16 (BaseQuantizeConfig defaults quant_scale=quant_zero=False, and
    HQQLinear ignores them anyway as deprecated; the 4-bit zero is rounded to an integer but still stored
    as fp16). Not counted: at 3 bits the group count is padded to a multiple of 10 (<= 9 groups a layer).
    """
    if bits not in _HQQ_CODE_BITS:
        raise ValueError(f"hqq does not support bits={bits}: choose from {sorted(_HQQ_CODE_BITS)}")
    return _HQQ_CODE_BITS[bits] + 2 * 16 / group


# -----------------------------------------------------------------------------
# the min-max grid shared by RTN and GPTQ


def _grid(w: Tensor, maxq: int) -> tuple[Tensor, Tensor]:
    """Per-row min-max grid of w[rows, cols]: offset lo[rows, 1] and step s[rows, 1]."""
    lo = w.amin(dim=1, keepdim=True)
    s = (w.amax(dim=1, keepdim=True) - lo) / maxq
    s = torch.where(s > 0, s, torch.ones_like(s))  # constant row: any step works, k = 0 gives lo exactly
    return lo, s


def _snap(w: Tensor, lo: Tensor, s: Tensor, maxq: int) -> Tensor:
    """Nearest grid level: lo + s * clamp(round((w - lo) / s), 0, maxq)."""
    return lo + s * torch.clamp(torch.round((w - lo) / s), 0, maxq)


def _check(weight: Tensor, bits: int, group: int) -> None:
    if weight.dim() != 2 or bits < 1 or group < 1:
        raise ValueError(
            f"need a 2-D weight, bits >= 1 and group >= 1; got shape {tuple(weight.shape)}, bits={bits}, group={group}"
        )


# -----------------------------------------------------------------------------
# quantizers


def quantize_rtn(weight: Tensor, bits: int, group: int) -> Tensor:
    """Round-to-nearest on the per-group min-max grid; the last group of a row may be shorter."""
    _check(weight, bits, group)
    w, maxq = weight.float(), 2**bits - 1
    out = torch.empty_like(w)
    for c in range(0, w.shape[1], group):
        lo, s = _grid(w[:, c : c + group], maxq)
        out[:, c : c + group] = _snap(w[:, c : c + group], lo, s, maxq)
    return out.to(weight.dtype)


def quantize_hqq(weight: Tensor, bits: int, group: int) -> Tensor:
    """HQQ (Badri & Shaji 2023) through the hqq package, with its default HQQLinear settings, axis=1.

    Quantizer.quantize is what HQQLinear.quantize calls; we skip bit-packing (it needs the group count
    to be a multiple of 10, 2, 4 or 8 depending on bits) and round scale and zero to fp16 as HQQLinear
    stores them, then dequantize as hqq does: W = (W_q - zero) * scale, here in float32.
    """
    try:
        from hqq.core.quantize import BaseQuantizeConfig, Quantizer
    except ImportError as e:
        raise ImportError("quantize_hqq needs the hqq package: pip install hqq") from e
    _check(weight, bits, group)
    rows, cols = weight.shape
    if cols % group or bits not in _HQQ_CODE_BITS:
        raise ValueError(
            f"hqq needs bits in {sorted(_HQQ_CODE_BITS)} and in_features % group == 0; got bits={bits}, in={cols}, "
            f"group={group}"
        )
    params = BaseQuantizeConfig(nbits=bits, group_size=group, axis=1)[
        "weight_quant_params"
    ]  # optimize=True, round_zero at 4 bits
    codes, meta = Quantizer.quantize(weight.float(), **params, bitpack=False, device=weight.device)
    scale, zero = meta["scale"].half().float(), meta["zero"].half().float()
    return ((codes.float() - zero) * scale).reshape(rows, cols).to(weight.dtype)


@torch.no_grad()
def quantize_gptq(
    weight: Tensor, moment: Tensor, bits: int, group: int, damping: float = 0.01, block_size: int = 128
) -> Tensor:
    """GPTQ (Frantar et al. 2022): quantize columns left to right, each time moving the rounding error
    onto the columns not yet quantized so as to minimise ||X (W - Q)^T||^2, with H = X^T X / rows.

    Column c is rounded to q, then with U the upper Cholesky factor of H^-1 (row c of U is the optimal
    update given columns < c are fixed): err = (w_c - q) / U[c, c];  W[:, j] -= err * U[c, j] for j > c.
    Updates are applied lazily: inside a block of `block_size` columns at once, to later blocks once per
    block (same result, fewer memory passes). A group's grid is taken from its columns' current,
    error-compensated values when its first column comes up (static_groups=False, no act-order).
    """
    _check(weight, bits, group)
    W, maxq = weight.float().clone(), 2**bits - 1
    H = moment.to(W.device, torch.float32).clone()
    cols = W.shape[1]
    if H.shape != (cols, cols):
        raise ValueError(
            f"moment must be [{cols}, {cols}] for a weight with {cols} input columns; got {tuple(H.shape)}"
        )
    dead = H.diagonal() == 0  # inputs that never fire: any weight is as good, the reference pins it to 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(damping * H.diagonal().mean())  # damping keeps H^-1 well conditioned
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    Q = torch.zeros_like(W)
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        W1, E1 = W[:, b0:b1].clone(), torch.zeros(W.shape[0], b1 - b0, device=W.device)
        for i in range(b1 - b0):
            c = b0 + i
            if c % group == 0:
                g1 = min(c + group, cols)
                cur = W1[:, i : g1 - b0]
                if g1 > b1:  # group runs past this block: give its later columns this block's pending updates
                    cur = torch.cat([cur, W[:, b1:g1] - E1[:, :i] @ U[b0:c, b1:g1]], dim=1)
                lo, s = _grid(cur, maxq)
            q = _snap(W1[:, i : i + 1], lo, s, maxq)[:, 0]
            Q[:, c] = q
            E1[:, i] = (W1[:, i] - q) / U[c, c]
            W1[:, i + 1 :] -= E1[:, i : i + 1] * U[c, c + 1 : b1]
        W[:, b1:] -= E1 @ U[b0:b1, b1:]  # the lazy batch update of all later blocks
    return Q.to(weight.dtype)


# -----------------------------------------------------------------------------
# models


@torch.no_grad()
def quantize_model(
    model: nn.Module, names: list[str], method: str, bits: int, group: int, moments: dict[str, Tensor] | None = None
) -> float:
    """Replace, in place, the weight of each named nn.Linear / Conv1D by its dequantized form.

    Conv1D (GPT-2) stores its weight as [in, out]; it is transposed so groups run along inputs as for
    nn.Linear. A weight tied to another parameter changes with it. Returns total bits / total weights
    over the named modules (codes plus fp16 scale and zero per group, as stored by `method`).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    modules = {name: model.get_submodule(name) for name in names}
    for name, module in modules.items():  # check everything before changing anything
        if not isinstance(module, (nn.Linear, Conv1D)):
            raise ValueError(f"{name} is a {type(module).__name__}, not nn.Linear or Conv1D")
        if method == "gptq" and (moments is None or name not in moments):
            raise ValueError(f"gptq needs moments[{name!r}] (the layer's input second moment X^T X / rows)")
    total_bits = total_weights = 0.0
    for name, module in modules.items():
        transposed = isinstance(module, Conv1D)
        w = module.weight.t() if transposed else module.weight
        if method == "rtn":
            q = quantize_rtn(w, bits, group)
        elif method == "hqq":
            q = quantize_hqq(w, bits, group)
        else:
            q = quantize_gptq(w, moments[name], bits, group)
        module.weight.copy_(q.t() if transposed else q)
        rows, cols = w.shape
        if method == "hqq":
            total_bits += rows * cols * hqq_bits_per_weight(bits, group)
        else:  # count a short last group as a whole group
            total_bits += rows * cols * bits + rows * math.ceil(cols / group) * 2 * 16
        total_weights += rows * cols
    return total_bits / total_weights


def quantize_model_sequentially(
    model: nn.Module, names: list[str], bits: int, group: int, batches: list[dict]
) -> float:
    """GPTQ as its reference runs it: block by block through the model's stack of blocks, each block's layers
    quantized with moments measured on the outputs of the blocks already quantized (momos_hf's
    `block_by_block`, the calibration MoMos's sequential conversion uses). Returns the bits per weight."""
    from momos_hf.convert.calibration import ActivationStore, block_by_block
    from momos_hf.convert.targets import block_stack

    stack_name = block_stack(model, names)
    if stack_name is None or any(not n.startswith(f"{stack_name}.") for n in names):
        raise ValueError("sequential GPTQ needs every named layer inside one stack of blocks")
    stack = model.get_submodule(stack_name)
    by_block = [
        {n: model.get_submodule(n) for n in names if n.startswith(f"{stack_name}.{i}.")} for i in range(len(stack))
    ]
    store = ActivationStore(budget_bytes=2**31)
    total_bits = total_weights = 0.0
    try:
        for i, moments in block_by_block(model, stack, batches, store, by_block):
            weights = sum(m.weight.numel() for m in by_block[i].values())
            total_bits += weights * quantize_model(model, list(by_block[i]), "gptq", bits, group, moments)
            total_weights += weights
    finally:
        store.close()
    return total_bits / total_weights
