"""Complexity tracking during training: compressibility, BDM and entropy of the weights, every N steps.

`complexity_snapshot` measures a model's weights as it uses them (MoMos layers through their mosaic);
`ComplexityTracker` calls it on a schedule from a plain loop (`track`), the finetune recipe, or
`transformers.Trainer` (it is a `TrainerCallback`), and keeps its own cost under a budget.
"""

from __future__ import annotations

import functools
import math
import numbers
import time
import warnings
from typing import Any, Callable, Optional

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

from ..layer import MoMosLayer, full_tensor
from ..report.complexity import (
    BDM_2D_WIDTH,
    bdm_of_signs,
    complexity_report,
    compression_ratios,
    histogram_entropy,
)

logger = logging.get_logger(__name__)

DEFAULT_MAX_VALUES = 2**16  # 256 KiB of float32: lzma, bz2 and BDM each take about 0.1 s on it


def effective_weights(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter as the model uses it: MoMos layers give their constrained weight (and bias), the
    others their own parameters; a shared dictionary or latent weight is not counted separately. Sharded
    (FSDP 2) parameters are gathered whole, so every rank must call this together."""
    tensors = []
    for module in model.modules():
        if isinstance(module, MoMosLayer):  # a tied layer's matrix is its leader's: counted once
            matrix = [module.mosaic_weight()] if module.leader is None else []
            tensors += matrix + [
                p for name, p in module.named_parameters(recurse=False) if name not in ("motifs", "scale", "latent")
            ]
        else:
            tensors += list(module.parameters(recurse=False))
    return [full_tensor(t).detach() for t in tensors]


def sample_values(tensors: list[torch.Tensor], max_values: int) -> torch.Tensor:
    """At most `max_values` values: the same leading share of every tensor (contiguous, so blocks and
    rows stay whole), all of them when they fit."""
    total = sum(t.numel() for t in tensors)
    share = min(1.0, max_values / max(total, 1))
    parts = [t.flatten()[: max(1, math.floor(t.numel() * share))] for t in tensors if t.numel()]
    return torch.cat([p.float().cpu() for p in parts])


@torch.no_grad()
def complexity_snapshot(model: nn.Module, max_values: int = DEFAULT_MAX_VALUES) -> dict[str, float]:
    """Complexity figures of `model`'s weights (see `sample_values` for what is measured):
    `description_length_bits`; compression ratios (`gzip`, `bz2`, `lzma`, `zstd`) of their float32 bytes;
    BDM of their sign bits in 1-D and 2-D (bits per sign; `None`, with a warning once, when `pybdm` is not
    installed; 2-D only from `4 * BDM_2D_WIDTH` values); the Shannon entropy of their histogram (bits per
    value); and the mean motif-usage entropy of MoMos layers (if any)."""
    values = sample_values(effective_weights(model), max_values)
    figures: dict[str, Optional[float]] = {"values": float(values.numel())}
    if any(isinstance(m, MoMosLayer) for m in model.modules()):
        report = complexity_report(model, max_bytes=0)
        figures["description_length_bits"] = float(report.total_bits)
        figures["motif_usage_entropy"] = sum(l.usage_entropy for l in report.layers) / len(report.layers)
    else:
        figures["description_length_bits"] = float(sum(p.numel() * p.element_size() * 8 for p in model.parameters()))
    figures.update({f"{name}_ratio": ratio for name, ratio in compression_ratios(values.numpy().tobytes()).items()})
    for ndim in (1, 2):
        if ndim == 2 and values.numel() < 4 * BDM_2D_WIDTH:  # too few signs for one row of 4x4 blocks
            continue
        bdm = bdm_of_signs(values, ndim)
        if bdm is None:
            _warn_bdm_missing()
        figures[f"bdm{ndim}d_bits_per_sign"] = None if bdm is None else bdm / values.numel()
    figures["histogram_entropy"] = histogram_entropy(values)
    return figures


@functools.cache  # once per process: every measurement would repeat it
def _warn_bdm_missing() -> None:
    warnings.warn(
        "pybdm is not installed: the BDM figures (bdm1d_bits_per_sign, bdm2d_bits_per_sign) are None; "
        'pip install "momos-hf[bdm]" to measure them',
        stacklevel=3,
    )


class ComplexityTracker(TrainerCallback):
    """Measure `complexity_snapshot` every `every` steps and keep the history.

    Plain loops call `track(model, step, loss)` after each step; `Trainer` runs it as a callback (the loss
    is the last one Trainer logged). The budget: a due measurement (a multiple of `every`) is skipped when,
    counted at the cost of the dearest one so far, it would bring the time spent measuring above
    `max_overhead` of the wall time since the first call. So after the first measurement (the reference,
    always taken) the overhead stays within the budget unless a measurement costs more than every one before
    it (the budget is then restored by waiting), and tracking stays cheap whatever the model size
    (`max_overhead` is a fraction in [0, 1], 0 taking the reference only; `None`: every due step is
    measured); `overhead` says what it cost. `clock` (seconds) is
    injectable, so the schedule can be tested without depending on how fast the machine is.
    """

    def __init__(
        self,
        every: int = 100,
        max_values: int = DEFAULT_MAX_VALUES,
        max_overhead: Optional[float] = 0.1,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, numbers.Integral):
            raise TypeError(f"every must be a whole number of steps, got {every!r}")
        if every < 1:
            raise ValueError(f"every must be >= 1 step, got {every}")
        if isinstance(max_values, bool) or not isinstance(max_values, numbers.Integral):
            raise TypeError(f"max_values must be a whole number of values, got {max_values!r}")
        if max_values < 1:
            raise ValueError(f"max_values must be >= 1, got {max_values}")
        if max_overhead is not None:
            if isinstance(max_overhead, bool) or not isinstance(max_overhead, numbers.Real):
                raise TypeError(f"max_overhead must be a fraction of the wall time or None, got {max_overhead!r}")
            if not 0 <= max_overhead <= 1:
                raise ValueError(f"max_overhead must be a fraction of the wall time in [0, 1], got {max_overhead}")
        self.every = every
        self.max_values = max_values
        self.max_overhead = max_overhead
        self.clock = clock
        self.history: list[dict[str, Any]] = []
        self.seconds = 0.0
        self._start: Optional[float] = None
        self._dearest = 0.0  # the longest measurement so far, the predicted cost of the next one

    def track(self, model: nn.Module, step: int, loss: Optional[float] = None) -> Optional[dict[str, Any]]:
        """Measure if `step` is due (the first call always is); returns the new history row, else `None`."""
        now = self.clock()
        if self._start is None:
            self._start = now
        elif step % self.every or self._over_budget(now):
            return None
        figures = complexity_snapshot(model, self.max_values)
        cost = self.clock() - now
        self.seconds += cost
        self._dearest = max(self._dearest, cost)
        row = {"step": step, "loss": loss, **figures}
        self.history.append(row)
        return row

    def _over_budget(self, now: float) -> bool:
        """Whether measuring now would bring the overhead above `max_overhead`."""
        if self.max_overhead is None:
            return False
        return self.seconds + self._dearest > self.max_overhead * (now - self._start + self._dearest)

    @property
    def overhead(self) -> float:
        """Fraction of the wall time since the first `track` call spent measuring."""
        elapsed = 0.0 if self._start is None else self.clock() - self._start
        return self.seconds / elapsed if elapsed > 0 else 0.0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.track(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
        self.track(model, state.global_step, losses[-1] if losses else None)

    def on_train_end(self, args, state, control, **kwargs):
        logger.info(f"complexity tracking: {len(self.history)} measurements, {self.overhead:.1%} of training time")
