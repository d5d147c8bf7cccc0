"""The fit methods: how one dictionary and the mosaics of the matrices it serves are chosen.

Every method has one signature, `fit(matrices, input_moments, options) -> MosaicFit` (`input_moments` is
`None` for methods that do not read calibration statistics), and `FIT_METHODS` maps the names
`MoMosConfig.fit` accepts to them. A new method is one function and one entry here (and one in
`NEEDS_INPUT_MOMENTS` if it reads calibration statistics); conversion, `project()`, the CLI and the recipe
pick it up by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .data_aware import fit_data_aware
from .weight_space import FitOptions, MosaicFit, fit_weight_space

FitMethod = Callable[[list[torch.Tensor], Optional[list[torch.Tensor]], FitOptions], MosaicFit]


def fit_sampled(matrices: list[torch.Tensor], moments: Optional[list[torch.Tensor]], options: FitOptions) -> MosaicFit:
    """The paper's dictionary: `k` existing blocks drawn at random, every block assigned to the nearest."""
    return fit_weight_space(matrices, options, sampled=True)


def fit_kmeans(matrices: list[torch.Tensor], moments: Optional[list[torch.Tensor]], options: FitOptions) -> MosaicFit:
    """k-means++ start refined by Lloyd steps: the least squared weight error."""
    return fit_weight_space(matrices, options)


FIT_METHODS: dict[str, FitMethod] = {"sample": fit_sampled, "kmeans": fit_kmeans, "data-aware": fit_data_aware}
NEEDS_INPUT_MOMENTS = frozenset({"data-aware"})


@dataclass
class FitResult:
    """One layer's fitted form: its dictionary (shared by the layers fitted with it), mosaic, row scales (or
    `None`) and relative weight error (`momos_hf.mosaic.relative_error`)."""

    motifs: nn.Parameter
    mosaic: torch.Tensor
    scale: Optional[nn.Parameter]
    error: float
