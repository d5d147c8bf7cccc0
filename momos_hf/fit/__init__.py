"""Fitting a dictionary and its mosaics to weight matrices: pure tensor math, no modules, no I/O.

`weight_space` (k-means and the paper's sampled motifs), `data_aware` (the output error on calibration inputs),
`methods` (the table `MoMosConfig.fit` names)."""

from .data_aware import fit_data_aware
from .methods import FIT_METHODS, NEEDS_INPUT_MOMENTS, FitResult
from .weight_space import FitOptions, MosaicFit, fit_weight_space

__all__ = [
    "FIT_METHODS",
    "NEEDS_INPUT_MOMENTS",
    "FitOptions",
    "FitResult",
    "MosaicFit",
    "fit_data_aware",
    "fit_weight_space",
]
