"""Pieces of MoMos-aware training shared by the recipe, `transformers.Trainer` and plain loops:
the projection schedule, keeping ranks in agreement, and distillation from the dense model."""

from __future__ import annotations

import hashlib
import math
import numbers
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback
from transformers.utils import logging

from ..checkpoint.save import sync_directory
from ..checkpoint.verify import safetensors_header
from ..layer import MoMosLayer, assign_, full_tensor, momos_layers
from ..model import MoMosModel

logger = logging.get_logger(__name__)

# The latent weights of the `projected`/`ste` modes, kept beside each Trainer checkpoint (whose model file is
# the compact MoMos checkpoint, without them) so that a resumed run continues exactly where it stopped.
LATENT_FILE = "momos_latent.safetensors"


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
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}"
        )
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
    shapes = [tuple(s.shape) for s in student_hidden], [tuple(t.shape) for t in teacher_hidden]
    if not student_hidden or shapes[0] != shapes[1]:
        raise ValueError(f"student and teacher hidden states must have the same, non-empty, shapes: got {shapes}")
    losses = [F.mse_loss(s.float(), t.float()) for s, t in zip(student_hidden, teacher_hidden)]
    return torch.stack(losses).mean()


def _latent_layers(model: Any) -> dict[str, MoMosLayer]:
    """The layers that own a latent weight (tied layers follow their leader's)."""
    layers = unwrap(model).momos_layers().items()
    return {name: layer for name, layer in layers if layer.latent is not None and layer.leader is None}


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _save_latents(model: Any, folder: Path, step: int, projected_at: Optional[int], write: bool) -> None:
    """Write the latent weights into the checkpoint `folder` Trainer has just written, with what identifies
    it (step, MoMos state digest), the last projection step and a checksum. Every rank calls this (sharded
    latents are gathered); only the one that `write`s saves, through a rename, so a crash leaves no half file."""
    layers = _latent_layers(model)
    if not layers:
        return
    latents = {f"{name}.latent": full_tensor(layer.latent).detach().cpu() for name, layer in layers.items()}
    metadata = {
        "step": str(step),
        "projected_at": "" if projected_at is None else str(projected_at),
        "momos_state": momos_state_digest(model),
        "sha256": _tensors_digest(latents),
    }
    if not write:
        return
    if not folder.is_dir():
        logger.warning(f"no checkpoint folder {folder}: the latent weights of step {step} are not saved")
        return
    temporary = folder / f".{LATENT_FILE}.tmp"
    safetensors.torch.save_file(latents, temporary, metadata)
    with open(temporary, "rb") as f:
        os.fsync(f.fileno())
    os.replace(temporary, folder / LATENT_FILE)
    sync_directory(folder)


def _restore_latents(model: Any, folder: Path, step: int) -> Optional[int]:
    """Load the latent weights saved beside the checkpoint Trainer resumed from (step `step`, in `folder`),
    after checking that they belong to it and are whole; returns the step last projected before it. Without
    such a file they restart from the mosaic (with a warning: the run then differs from an uninterrupted one);
    a damaged one is refused."""
    layers = _latent_layers(model)
    if not layers:
        return None
    path = folder / LATENT_FILE
    digest = momos_state_digest(model)  # on every rank: sharded tensors are gathered
    metadata = safetensors_header(path).get("__metadata__", {}) if path.is_file() else {}
    if metadata.get("step") != str(step) or metadata.get("momos_state") != digest:
        logger.warning(
            f"{folder} holds no latent weights of the checkpoint resumed from (step {step}): they restart from the "
            "saved mosaic, so the run differs from an uninterrupted one (resume from a checkpoint in output_dir "
            "to continue exactly)"
        )
        for layer in layers.values():
            assign_(layer.latent, layer.mosaic_weight(layer.latent.dtype))
        return None
    latents = safetensors.torch.load_file(path)
    expected = {f"{name}.latent": layer.latent for name, layer in layers.items()}
    if {name: (t.shape, t.dtype) for name, t in latents.items()} != {
        name: (t.shape, t.dtype) for name, t in expected.items()
    }:
        raise ValueError(f"{path} does not hold this model's latent weights (names, shapes or dtypes differ)")
    if _tensors_digest(latents) != metadata.get("sha256"):
        raise ValueError(f"{path} is corrupted: its latent weights do not match their checksum")
    for name, latent in expected.items():
        assign_(latent, latents[name].to(latent.device))
    projected_at = metadata.get("projected_at", "")
    return int(projected_at) if projected_at.isdigit() else None


class MoMosCallback(TrainerCallback):
    """The `ProjectionSchedule` of the `projected`/`ste` train modes for `transformers.Trainer`.

    Give Trainer the converted Transformers model (`mm.base_model`): Trainer saves only a bare state dict of
    models that are not Transformers models, so the wrapper is refused here, while
    `mm.base_model.save_pretrained` (what Trainer's checkpoints and `save_model` call) writes the compact
    MoMos checkpoint. The latent weights, which that checkpoint does not hold, are saved beside it in each
    Trainer checkpoint (`momos_latent.safetensors`) with the schedule's last projection step, and restored
    when Trainer resumes from a checkpoint of its `output_dir`, so a resumed run ends as an uninterrupted one.
    Resumed from a checkpoint elsewhere (or one without that file), the latent weights restart from the saved
    mosaic, with a warning.
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
        if state.global_step > 0:  # resumed: Trainer restored the MoMos state, the latent weights are ours
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            self.schedule.last_step = _restore_latents(model, folder, state.global_step)
            # Saved at an epoch's last step before that epoch's end projected: Trainer resumes in the next epoch,
            # so that projection is due now.
            if float(state.epoch).is_integer() and self.schedule.last_step != state.global_step:
                self.schedule.epoch_end(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.schedule.step_end(state.global_step)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.schedule.epoch_end(state.global_step)

    def on_save(self, args, state, control, model=None, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        _save_latents(model, folder, state.global_step, self.schedule.last_step, args.should_save)

    def on_train_end(self, args, state, control, **kwargs):
        self.schedule.train_end(state.global_step)
