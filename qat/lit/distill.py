"""Distillation from a frozen float teacher, shared by the classifier and the language model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["check_distillation", "kd_loss"]


def check_distillation(
    distill_weight: float, distill_temperature: float, teacher: nn.Module | None, hint: str
) -> None:
    """Raise one clear ``ValueError`` for a bad weight or temperature, or a weight without a
    teacher (``hint`` says where the teacher comes from)."""
    if isinstance(distill_weight, bool) or not 0.0 <= float(distill_weight) <= 1.0:
        raise ValueError(
            f"distill_weight={distill_weight!r} is invalid: a weight in [0, 1] (0: no distillation)"
        )
    if isinstance(distill_temperature, bool) or not float(distill_temperature) > 0.0:
        raise ValueError(
            f"distill_temperature={distill_temperature!r} is invalid: a temperature > 0"
        )
    if distill_weight > 0 and teacher is None:
        raise ValueError(f"distill_weight={distill_weight} needs a teacher {hint}")


def kd_loss(logits: torch.Tensor, target: torch.Tensor, t: float) -> torch.Tensor:
    """``T² · KL(teacher ‖ student)`` over the last dimension, mean over the rest (T² keeps the
    gradient scale of the soft targets independent of ``T``)."""
    kl = F.kl_div(
        F.log_softmax(logits.float().flatten(0, -2) / t, dim=-1),
        F.log_softmax(target.float().flatten(0, -2) / t, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return kl * t * t
