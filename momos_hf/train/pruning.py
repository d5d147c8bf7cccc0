"""Pruning baselines measured by description length: magnitude pruning and l0-regularised gates.

A pruned set of `n` values of which `nnz` are kept is described by which ones are kept and their values:

    DL = log2 C(n, nnz) + nnz * b_value   bits,

the first term being the length of the mask's enumerative code (never more than the `n` bits of a bitmap,
far less when the mask is sparse). `kept_for_bits` inverts it, so a pruned model can be given exactly the
description length of a MoMos one. The l0 method is the hard-concrete gate of Louizos et al. (2018): every
value gets a learnable keep logit, training samples stretched-sigmoid gates and pays for their expected
number of open gates, and hard pruning then keeps the values whose gates are most open.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional

import torch
from torch import nn

# Hard-concrete constants of Louizos et al.: temperature and the stretch interval (gamma, zeta) around [0, 1].
BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a whole number of values, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _check_value_bits(value_bits: float) -> None:
    if isinstance(value_bits, bool) or not isinstance(value_bits, numbers.Real):
        raise TypeError(f"value_bits must be a number, got {value_bits!r}")
    if not 0 <= value_bits < math.inf:
        raise ValueError(f"value_bits must be a finite number >= 0, got {value_bits}")


def sparse_description_bits(numel: int, kept: int, value_bits: float = 32) -> float:
    """Bits of `kept` values out of `numel`: the mask's enumerative code `log2 C(numel, kept)` plus the values."""
    _check_count("numel", numel)
    _check_count("kept", kept)
    _check_value_bits(value_bits)
    if kept > numel:
        raise ValueError(f"kept must be in [0, {numel}], got {kept}")
    log_binomial = math.lgamma(numel + 1) - math.lgamma(kept + 1) - math.lgamma(numel - kept + 1)
    return log_binomial / math.log(2) + kept * value_bits


def _last_true(holds: Callable[[int], bool], low: int, high: int) -> int:
    """The largest `k` in [low, high] with `holds(k)`, given that it holds at `low` and once false stays false."""
    while low < high:
        mid = (low + high + 1) // 2
        if holds(mid):
            low = mid
        else:
            high = mid - 1
    return low


def kept_for_bits(numel: int, bits: float, value_bits: float = 32) -> int:
    """The most values of `numel` that can be kept within `bits` of description length."""
    _check_count("numel", numel)
    _check_value_bits(value_bits)
    if isinstance(bits, bool) or not isinstance(bits, numbers.Real):
        raise TypeError(f"bits must be a number, got {bits!r}")
    if not bits >= 0:
        raise ValueError(f"bits must be a number >= 0, got {bits}")
    if sparse_description_bits(numel, numel, value_bits) <= bits:
        return int(numel)
    # The length rises with kept while one more value costs more than it saves on the mask, i.e. while
    # log2((numel - k + 1) / k) + value_bits > 0, then falls to its value at numel, which exceeds `bits`
    # here: so every count past the peak is too long, and up to the peak the length only grows.
    peak = _last_true(lambda k: k == 0 or math.log2(numel - k + 1) - math.log2(k) + value_bits > 0, 0, numel)
    return int(_last_true(lambda k: sparse_description_bits(numel, k, value_bits) <= bits, 0, peak))


def top_masks(scores: list[torch.Tensor], kept: int) -> list[torch.Tensor]:
    """Boolean masks keeping the `kept` highest scores over all tensors together; among equal scores the
    earlier ones (in list order, then flattened position) are kept. NaN scores are refused."""
    if not scores:
        raise ValueError("scores is empty: there is nothing to keep")
    if not all(isinstance(s, torch.Tensor) for s in scores):
        raise TypeError("scores must be a list of tensors")
    flat = torch.cat([s.detach().flatten() for s in scores])
    _check_count("kept", kept)
    if kept > flat.numel():
        raise ValueError(f"kept must be in [0, {flat.numel()}] (the number of scores), got {kept}")
    if flat.isnan().any():
        raise ValueError(f"scores hold {int(flat.isnan().sum())} NaN values, which cannot be ranked")
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if kept:
        threshold = torch.kthvalue(flat, flat.numel() - kept + 1).values  # the kept-th largest score
        keep = flat > threshold
        ties = (flat == threshold).nonzero().flatten()
        keep[ties[: kept - int(keep.sum())]] = True
    return [part.reshape(s.shape) for part, s in zip(keep.split([s.numel() for s in scores]), scores)]


def magnitude_masks(tensors: list[torch.Tensor], kept: int) -> list[torch.Tensor]:
    """Global magnitude pruning: keep the `kept` largest `|value|` over all tensors (ties and NaN as `top_masks`)."""
    return top_masks([t.abs() for t in tensors], kept)


@torch.no_grad()
def apply_masks(tensors: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    """Zero every pruned value in place (after each optimizer step, so pruned values stay pruned)."""
    if len(tensors) != len(masks):
        raise ValueError(f"got {len(tensors)} tensors but {len(masks)} masks")
    for i, (tensor, mask) in enumerate(zip(tensors, masks)):
        if mask.dtype != torch.bool or mask.shape != tensor.shape:
            raise ValueError(
                f"mask {i} must be a bool tensor of its tensor's shape {tuple(tensor.shape)}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
    for tensor, mask in zip(tensors, masks):
        tensor.mul_(mask.to(tensor.dtype))


def _uniform_noise(shape: torch.Size, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """Uniform noise in (0, 1) on `device`, drawn on `generator`'s device when one is given (so that a seeded
    CPU generator gives the same gates whatever device the weights are on)."""
    source = device if generator is None else generator.device
    return torch.rand(shape, generator=generator, device=source).to(device).clamp_(1e-6, 1 - 1e-6)


class HardConcreteGate(nn.Module):
    """A `torch.nn.utils.parametrize` parametrization multiplying a tensor by hard-concrete gates `z` in [0, 1].

    Training samples `z = clamp(sigmoid((log u - log(1-u) + log_alpha) / beta) * (zeta - gamma) + gamma, 0, 1)`;
    evaluation uses the noise-free gate. `open_probability()` is each gate's chance of being non-zero, whose
    sum is the expected l0 norm the training penalty pays for; `log_alpha` ranks values for hard pruning.
    """

    def __init__(self, shape: torch.Size, keep: float = 0.9, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
            raise TypeError(f"keep must be a number, got {keep!r}")
        if not 0 < keep < 1:  # a gate certain to be open or shut has an infinite logit: nothing left to learn
            raise ValueError(f"keep must be strictly between 0 and 1, got {keep}")
        self.log_alpha = nn.Parameter(torch.full(shape, math.log(keep / (1 - keep))))
        self.generator = generator

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training:
            u = _uniform_noise(self.log_alpha.shape, self.generator, weight.device)
            gate = torch.sigmoid((u.log() - (-u).log1p() + self.log_alpha) / BETA)
        else:
            gate = torch.sigmoid(self.log_alpha)
        # The gate stays float32 (log_alpha trains there); the weight keeps its own dtype, as parametrize requires.
        return weight * (gate * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0).to(weight.dtype)

    def open_probability(self) -> torch.Tensor:
        return torch.sigmoid(self.log_alpha - BETA * math.log(-GAMMA / ZETA))
