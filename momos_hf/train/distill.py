"""Fine-tuning after conversion: the converted model learns to predict what the dense model predicted.

As AQLM's global fine-tuning and PV-tuning's continuous step: with the mosaics fixed, the motifs, row scales
and normalisation weights are trained to minimise `KL(dense || converted)` of the next-token distributions on
the calibration windows. The dense model's distributions are recorded before conversion (`teacher_targets`)
as their `top` most likely tokens plus one bucket for all the others, so no second model is held during
training and the record costs `8 * top` bytes a token (64: 34 MB for 65k tokens). The loss (`top_kl`) is
the exact KL of those `(top + 1)`-way distributions: a lower bound of the full KL that it reaches as the
teacher's tail vanishes.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils.logging import tqdm

from ..convert.calibration import attention_mask_of, batch_on
from ..layer import momos_layers

DEFAULT_FINETUNE_LR = 1e-3  # SmolLM2 at 2 bits, 64 steps: 1.42x dense at 1e-3, 1.62x at 1e-4


@dataclass
class TeacherTargets:
    """The dense model's next-token distributions on a list of windows: per window `ids[t, top]` (int32) of its
    most likely tokens and their log-probabilities `logprobs[t, top]` (float32), with each window's inputs."""

    inputs: list[dict[str, torch.Tensor]]
    ids: list[torch.Tensor]
    logprobs: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.inputs)


def windows_of(batches: Iterable[Mapping[str, Any]]) -> list[dict[str, torch.Tensor]]:
    """Batches of model inputs split into one-window inputs (tensors keep a batch dimension of 1)."""
    windows = []
    for batch in batches:
        tensors = {key: value for key, value in batch.items() if torch.is_tensor(value)}
        if not tensors:
            raise ValueError(f"a calibration batch holds no tensors (keys {sorted(batch)}): pass tokenized batches")
        size = next(iter(tensors.values())).shape[0]
        windows += [{key: value[i : i + 1] for key, value in tensors.items()} for i in range(size)]
    return windows


@torch.no_grad()
def teacher_targets(model: nn.Module, batches: Iterable[Mapping[str, Any]], top: int = 64) -> TeacherTargets:
    """Run `model` (the dense one, before conversion) over `batches` one window at a time and keep, at every
    position, its `top` most likely next tokens and their log-probabilities."""
    if isinstance(top, bool) or not isinstance(top, numbers.Integral):
        raise TypeError(f"top must be a whole number of tokens, got {top!r}")
    if top < 1:
        raise ValueError(f"top must be >= 1 token, got {top}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    targets = TeacherTargets([], [], [])
    try:
        for window in tqdm(windows_of(batches), desc="MoMos teacher", unit="window"):
            mask = attention_mask_of(window)
            if mask is not None and not mask.any():
                continue  # all padding: nothing to learn from
            logprobs = F.log_softmax(_logits(model, batch_on(window, device)).float(), dim=-1)
            values, ids = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
            targets.inputs.append(window)
            targets.ids.append(ids.to(torch.int32).cpu())
            targets.logprobs.append(values.cpu())
    finally:
        model.train(was_training)
    return targets


def top_kl(
    student_logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Mean over positions (where `mask` is true) of `KL(teacher || student)` over the teacher's top tokens
    `ids[t, top]` (log-probabilities `logprobs[t, top]`) and one bucket holding every other token."""
    student = F.log_softmax(student_logits.float(), dim=-1).gather(-1, ids.long())
    teacher_rest = _log_rest(logprobs)
    student_rest = _log_rest(student)
    per_position = (logprobs.exp() * (logprobs - student)).sum(-1) + teacher_rest.exp() * (teacher_rest - student_rest)
    if mask is not None:
        per_position = per_position[mask.bool()]
    return per_position.mean()


def _logits(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The `[t, vocab]` logits of a one-window batch."""
    logits = getattr(model(**inputs), "logits", None)
    if logits is None:
        raise ValueError(
            f"{type(model).__name__} gives no logits: fine-tuning to the dense model needs a model with "
            "a language-model head (AutoModelForCausalLM, ...ForMaskedLM)"
        )
    return logits[0]


def _log_rest(logprobs: torch.Tensor) -> torch.Tensor:
    """`log(1 - sum(exp(logprobs)))`: the log-probability of every token outside the top ones."""
    return torch.log1p(-logprobs.logsumexp(-1).exp().clamp(max=1 - 1e-6))


def tuned_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What fine-tuning trains: every MoMos dictionary and row scale, and the weights and biases of the
    normalisation layers (LayerNorm, RMSNorm, ...); each parameter once."""
    params: dict[int, nn.Parameter] = {}
    for layer in momos_layers(model).values():
        for param in (layer.motifs, layer.scale):
            if param is not None:
                params[id(param)] = param
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            for param in module.parameters(recurse=False):
                params[id(param)] = param
    return list(params.values())


def finetune_to_teacher(
    model: nn.Module,
    targets: TeacherTargets,
    steps: Optional[int] = None,
    lr: float = DEFAULT_FINETUNE_LR,
    progress: bool = True,
) -> list[float]:
    """Train `tuned_parameters(model)` (a converted model, or its `MoMosModel`) for `steps` steps of one window
    each (default: one pass over `targets`) to minimise `top_kl` against the teacher, with AdamW and a cosine
    learning rate from `lr` to 0. Training runs in float32 (the updates are smaller than a bfloat16 step) in
    eval mode (no dropout, as the teacher ran); every parameter ends in its original dtype. Returns the losses."""
    model = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    steps = len(targets) if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be a whole number of steps, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"the fine-tuning learning rate must be a number, got {lr!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"the fine-tuning learning rate must be a positive number, got {lr}")
    if steps < 1 or len(targets) == 0:
        raise ValueError(
            f"fine-tuning needs at least one step and one window, got steps={steps}, {len(targets)} windows"
        )
    latent = [name for name, layer in momos_layers(model).items() if layer.latent is not None]
    if latent:
        raise ValueError(
            f"{latent[0]} trains a dense latent weight (train_mode {momos_layers(model)[latent[0]].train_mode!r}): "
            "fine-tuning towards the dense model trains motifs and scales, in train_mode 'motifs'"
        )
    device = next(model.parameters()).device
    dtypes = _cast_floats(model, {})
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    model.eval().requires_grad_(False)
    params = tuned_parameters(model)
    start = [param.detach().clone() for param in params]
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    losses = []
    try:
        bar = tqdm(range(steps), desc="MoMos fine-tune", unit="step", disable=not progress)
        for step in bar:
            i = step % len(targets)
            inputs = batch_on(targets.inputs[i], device)
            logits = _logits(model, inputs)
            mask = attention_mask_of(inputs)
            loss = top_kl(
                logits, targets.ids[i].to(device), targets.logprobs[i].to(device), None if mask is None else mask[0]
            )
            if not torch.isfinite(loss):
                with torch.no_grad():
                    for param, value in zip(params, start):
                        param.copy_(value)
                raise ValueError(
                    f"fine-tuning diverged (loss {float(loss.detach())} at step {step}); the model is as it was "
                    f"before it: use a smaller learning rate than {lr}"
                )
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            losses.append(loss.detach().item())
            bar.set_postfix(kl=f"{losses[-1]:.4f}")
    finally:
        _cast_floats(model, dtypes)
        for name, param in model.named_parameters():
            param.requires_grad_(trainable[name])
        model.train(was_training)
    return losses


@torch.no_grad()
def _cast_floats(model: nn.Module, dtypes: dict[str, torch.dtype]) -> dict[str, torch.dtype]:
    """Cast every floating-point parameter and buffer to its dtype in `dtypes` (float32 where absent); return
    the dtypes they had. (Transformers refuses `.float()` on a model that carries a quantizer, as MoMos models do.)"""
    before = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor is not None and tensor.is_floating_point():
            before[name] = tensor.dtype
            tensor.data = tensor.data.to(dtypes.get(name, torch.float32))
    for layer in momos_layers(model).values():
        layer.clear_weight_cache()
    return before
