"""Training MoMos models: the projection schedule and Trainer callback (`schedule`), complexity tracking
(`tracking`), fine-tuning towards a dense teacher (`distill`), pruning baselines at equal description length
(`pruning`)."""

from .distill import DEFAULT_FINETUNE_LR, finetune_to_teacher, teacher_targets
from .pruning import (
    HardConcreteGate,
    apply_masks,
    kept_for_bits,
    magnitude_masks,
    sparse_description_bits,
    top_masks,
)
from .schedule import (
    MoMosCallback,
    ProjectionSchedule,
    distillation_loss,
    hidden_state_loss,
    momos_state_digest,
    trainable_digest,
)
from .tracking import ComplexityTracker, complexity_snapshot

__all__ = [
    "DEFAULT_FINETUNE_LR",
    "ComplexityTracker",
    "HardConcreteGate",
    "MoMosCallback",
    "ProjectionSchedule",
    "apply_masks",
    "complexity_snapshot",
    "distillation_loss",
    "finetune_to_teacher",
    "hidden_state_loss",
    "kept_for_bits",
    "magnitude_masks",
    "momos_state_digest",
    "sparse_description_bits",
    "teacher_targets",
    "top_masks",
    "trainable_digest",
]
