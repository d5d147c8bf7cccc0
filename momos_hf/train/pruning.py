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

import torch
from torch import nn

# Hard-concrete constants of Louizos et al.: temperature and the stretch interval (gamma, zeta) around [0, 1].
BETA, GAMMA, ZETA = 2 / 3, -0.1, 1.1


def sparse_description_bits(numel: int, kept: int, value_bits: int = 32) -> float:
    """Bits of `kept` values out of `numel`: the mask's enumerative code `log2 C(numel, kept)` plus the values."""
    if not 0 <= kept <= numel:
        raise ValueError(f"kept must be in [0, {numel}], got {kept}")
    log_binomial = math.lgamma(numel + 1) - math.lgamma(kept + 1) - math.lgamma(numel - kept + 1)
    return log_binomial / math.log(2) + kept * value_bits


def kept_for_bits(numel: int, bits: float, value_bits: int = 32) -> int:
    """The most values of `numel` that can be kept within `bits` of description length (bisection: the
    length grows with `kept` up to far past any useful density)."""
    low, high = 0, numel
    while low < high:
        mid = (low + high + 1) // 2
        if sparse_description_bits(numel, mid, value_bits) <= bits:
            low = mid
        else:
            high = mid - 1
    return low


def top_masks(scores: list[torch.Tensor], kept: int) -> list[torch.Tensor]:
    """Boolean masks keeping the `kept` highest scores over all tensors together (ties broken by position)."""
    flat = torch.cat([s.detach().flatten().float() for s in scores])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat, kept, sorted=False).indices] = True
    return [part.reshape(s.shape) for part, s in zip(keep.split([s.numel() for s in scores]), scores)]


def magnitude_masks(tensors: list[torch.Tensor], kept: int) -> list[torch.Tensor]:
    """Global magnitude pruning: keep the `kept` largest `|value|` over all tensors."""
    return top_masks([t.abs() for t in tensors], kept)


@torch.no_grad()
def apply_masks(tensors: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    """Zero every pruned value in place (after each optimizer step, so pruned values stay pruned)."""
    for tensor, mask in zip(tensors, masks):
        tensor.mul_(mask.to(tensor.dtype))


class HardConcreteGate(nn.Module):
    """A `torch.nn.utils.parametrize` parametrization multiplying a tensor by hard-concrete gates `z` in [0, 1].

    Training samples `z = clamp(sigmoid((log u - log(1-u) + log_alpha) / beta) * (zeta - gamma) + gamma, 0, 1)`;
    evaluation uses the noise-free gate. `open_probability()` is each gate's chance of being non-zero, whose
    sum is the expected l0 norm the training penalty pays for; `log_alpha` ranks values for hard pruning.
    """

    def __init__(self, shape: torch.Size, keep: float = 0.9, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.log_alpha = nn.Parameter(torch.full(shape, math.log(keep / (1 - keep))))
        self.generator = generator

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training:
            u = torch.rand(self.log_alpha.shape, generator=self.generator).clamp_(1e-6, 1 - 1e-6)
            gate = torch.sigmoid((u.log() - (-u).log1p() + self.log_alpha) / BETA)
        else:
            gate = torch.sigmoid(self.log_alpha)
        return weight * (gate * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)

    def open_probability(self) -> torch.Tensor:
        return torch.sigmoid(self.log_alpha - BETA * math.log(-GAMMA / ZETA))
