"""Pieces of MoMos-aware training shared by the recipe, `transformers.Trainer` and plain loops:
the projection schedule, keeping ranks in agreement, and distillation from the dense model."""

from __future__ import annotations

import hashlib
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

from ..layer import assign_, full_tensor, momos_layers
from ..model import MoMosModel


def unwrap(model: Any) -> MoMosModel:
    """The `MoMosModel` inside DDP/FSDP/Accelerate wrappers, or a `MoMosModel` around a Transformers model
    that holds MoMos layers (as `Trainer(model=mm.base_model)` trains), wrapped as it is."""
    while not isinstance(model, MoMosModel) and hasattr(model, "module"):
        model = model.module
    if isinstance(model, MoMosModel):
        return model
    if isinstance(model, torch.nn.Module) and momos_layers(model):
        return MoMosModel(model)
    raise TypeError(f"expected a model with MoMos layers (get_momos_model), got {type(model).__name__}")


class ProjectionSchedule:
    """When the `projected`/`ste` train modes project (from the model's `MoMosConfig`): every `project_every`
    optimizer steps, or at each epoch end when it is 0, and once more when training ends unless that step
    was just projected, so that the model finishes in MoMos form. In `motifs` mode it never projects. One
    schedule serves the recipe, `MoMosCallback` and plain loops: call `step_end`, `epoch_end` and
    `train_end`; each returns whether it projected. `seconds` is what projecting has cost."""

    def __init__(self, model: Any, clock: Callable[[], float] = time.perf_counter) -> None:
        config = unwrap(model).momos_config
        self.model, self.clock = model, clock
        self.every, self.active = config.project_every, config.train_mode != "motifs"
        self.last_step: Optional[int] = None
        self.seconds = 0.0

    def step_end(self, step: int) -> bool:
        return self._project(step) if self.every and step > 0 and step % self.every == 0 else False

    def epoch_end(self, step: int) -> bool:
        return self._project(step) if self.every == 0 else False

    def train_end(self, step: int) -> bool:
        return self._project(step) if self.last_step != step else False

    def _project(self, step: int) -> bool:
        if not self.active:
            return False
        start = self.clock()
        project_in_sync(self.model)
        self.seconds += self.clock() - start
        self.last_step = step
        return True


@torch.no_grad()
def project_in_sync(model: Any) -> None:
    """Project on every rank, then copy rank 0's motifs, mosaics, scales and latent weights to the others.

    The fit is deterministic for equal weights and seed, so the copy only guards against floating-point
    drift between ranks; it costs one broadcast of the (small) MoMos state.
    """
    mm = unwrap(model)
    mm.project()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for layer in mm.momos_layers().values():
        tensors = [layer.motifs, layer.mosaic_packed] + [t for t in (layer.scale, layer.latent) if t is not None]
        for tensor in tensors:
            if not isinstance(tensor, DTensor):  # sharded (FSDP) parameters were scattered from rank 0 already
                dist.broadcast(tensor.data, src=0)
        layer.unpack_mosaic()


def momos_state_digest(model: Any) -> str:
    """sha256 of every MoMos layer's motifs, packed mosaic and scale: equal digests mean equal MoMos state."""
    digest = hashlib.sha256()
    for name, layer in unwrap(model).momos_layers().items():
        digest.update(name.encode())
        for tensor in (layer.motifs, layer.mosaic_packed, layer.scale):
            if tensor is not None:
                digest.update(full_tensor(tensor).detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def trainable_digest(model: Any) -> str:
    """sha256 of every trainable parameter (an adapter's, say), by name: equal digests mean equal training state."""
    while hasattr(model, "module"):  # DDP and Accelerate wrappers
        model = model.module
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(full_tensor(param).detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """KL(teacher || student) of the softened token distributions, times `temperature**2` (Hinton et al.),
    averaged over the positions where `mask` is true (all when `None`)."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
    if mask is not None:
        per_position = per_position[mask.bool()]
    return per_position.mean() * temperature**2


def hidden_state_loss(
    student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """Mean squared error between student and teacher hidden states, averaged over layers."""
    losses = [F.mse_loss(s.float(), t.float()) for s, t in zip(student_hidden, teacher_hidden)]
    return torch.stack(losses).mean()


class MoMosCallback(TrainerCallback):
    """The `ProjectionSchedule` of the `projected`/`ste` train modes for `transformers.Trainer`.

    Give Trainer the converted Transformers model (`mm.base_model`): Trainer saves only a bare state dict of
    models that are not Transformers models, so the wrapper is refused here, while
    `mm.base_model.save_pretrained` (what Trainer's checkpoints and `save_model` call) writes the compact
    MoMos checkpoint. When Trainer resumes, the latent weights (which checkpoints do not hold) restart from
    the saved mosaic.
    """

    def __init__(self) -> None:
        self.schedule: Optional[ProjectionSchedule] = None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if isinstance(model, MoMosModel):
            raise ValueError(
                "give Trainer the converted model, mm.base_model, not the MoMosModel wrapper: Trainer "
                "would save the wrapper as a bare state dict that no from_pretrained can load"
            )
        if args.push_to_hub:
            raise ValueError(
                "Trainer's push_to_hub uploads its whole output folder (training_args.bin holds the hub "
                "token), public unless hub_private_repo: push the model with model.push_to_hub or "
                "`momos-hf push` instead, which upload the checkpoint privately"
            )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.schedule = ProjectionSchedule(model)
        if state.global_step > 0:  # resumed: checkpoints hold no latent weights, so restart them from the mosaic
            for layer in unwrap(model).momos_layers().values():
                if layer.latent is not None and layer.leader is None:
                    assign_(layer.latent, layer.mosaic_weight(layer.latent.dtype))

    def on_step_end(self, args, state, control, **kwargs):
        self.schedule.step_end(state.global_step)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.schedule.epoch_end(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.schedule.train_end(state.global_step)
