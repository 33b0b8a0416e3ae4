"""The divergence guard: the training loss watched around each schedule step.

A schedule step (a bit-width step, the BN or observer freeze; :meth:`qat.Schedule.steps_at`)
changes the network under the optimizer. When the mean training loss of the first
``schedule.divergence_window`` batches after it exceeds ``schedule.divergence_factor`` times the
mean of the last ``divergence_window`` batches before it (and by at least :data:`MIN_JUMP`),
:class:`qat.lit.QATCallback` acts as ``schedule.on_divergence`` says: ``warn`` (a warning with
the layers the step hurt most), ``rollback`` (the model and optimizer restored from before the
step, and the step skipped for the rest of the run) or ``stop`` (:class:`DivergenceError`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch import Trainer
from torch import nn

from qat.quant.diagnostics import locate_non_finite, quantization_stats
from qat.quant.distributed import first_bad_rank, rank_phrase
from qat.quant.quantizer import NonFiniteError
from qat.quant.schedule import Phase

__all__ = [
    "MIN_JUMP",
    "DivergenceError",
    "DivergenceGuard",
    "Snapshot",
    "check_finite_loss",
    "describe_steps",
    "divergence_message",
]

#: A loss must also rise by at least this much (nats) to count: near zero, a ratio is noise.
MIN_JUMP = 0.1


class DivergenceError(RuntimeError):
    """The training loss jumped after a schedule step and ``schedule.on_divergence=stop``."""


def describe_steps(steps: dict[str, tuple]) -> str:
    """``{"bn_freeze": (), "weight_bits": (8, 6)}`` → ``"the BN freeze and weights 8 → 6 bits"``."""
    words = {
        "bn_freeze": lambda _: "the BN freeze",
        "observer_freeze": lambda _: "the observer freeze",
        "weight_bits": lambda b: f"weights {b[0]} → {b[1]} bits",
        "act_bits": lambda b: f"activations {b[0]} → {b[1]} bits",
    }
    return " and ".join(words[k](v) for k, v in steps.items())


@dataclass
class Snapshot:
    """The model's and the optimizers' state just before a step (for ``rollback``)."""

    model: dict[str, torch.Tensor]
    optimizers: list[dict[str, Any]]

    @classmethod
    def take(cls, model: nn.Module, trainer: Trainer) -> Snapshot:
        return cls(
            model={k: v.detach().clone() for k, v in model.state_dict().items()},
            optimizers=[copy.deepcopy(opt.state_dict()) for opt in trainer.optimizers],
        )

    def restore(self, model: nn.Module, trainer: Trainer) -> None:
        model.load_state_dict(self.model)
        for opt, state in zip(trainer.optimizers, self.optimizers, strict=True):
            opt.load_state_dict(state)


@dataclass
class DivergenceGuard:
    """Running means of the training loss before and after the latest step.

    Args:
        factor: ``schedule.divergence_factor``.
        window: ``schedule.divergence_window``.
    """

    factor: float
    window: int
    #: Steps a rollback skipped for the rest of the run (checkpointed): the freezes by name
    #: (``None``), a bit-width step by the width it held (``{"weight_bits": 8}``).
    skipped: dict[str, int | None] = field(default_factory=dict)
    steps: dict[str, tuple] = field(default_factory=dict)
    epoch: int | None = None
    reference: float | None = None
    snapshot: Snapshot | None = None
    _recent: deque = field(default_factory=deque)
    _after: list[float] = field(default_factory=list)

    def arm(self, steps: dict[str, tuple], epoch: int, snapshot: Snapshot | None) -> None:
        """A step happened at the start of ``epoch``: compare what follows with what preceded."""
        full = len(self._recent) == self.window
        self.steps, self.epoch, self.snapshot = steps, epoch, snapshot
        self.reference = sum(self._recent) / self.window if full else None
        self._after = []

    def disarm(self) -> None:
        self.steps, self.epoch, self.reference, self.snapshot, self._after = (
            {},
            None,
            None,
            None,
            [],
        )

    def pending(self, steps: dict[str, tuple]) -> dict[str, tuple]:
        """``steps`` without those a rollback skipped."""
        return {k: v for k, v in steps.items() if k not in self.skipped}

    def skip(self) -> None:
        """Skip the armed steps from now on (after a rollback)."""
        for key, value in self.steps.items():
            self.skipped[key] = value[0] if value else None

    def adjust(self, phase: Phase) -> Phase:
        """``phase`` with the skipped freezes undone."""
        if not self.skipped:
            return phase
        return dataclasses.replace(
            phase,
            bn_frozen=phase.bn_frozen and "bn_freeze" not in self.skipped,
            observers_frozen=phase.observers_frozen and "observer_freeze" not in self.skipped,
        )

    def held_bits(self, role: str, bits: int) -> int:
        """``bits`` for ``role``, no lower than a skipped bit-width step held it."""
        held = self.skipped.get("weight_bits" if role == "weight" else "act_bits")
        return bits if held is None else max(bits, held)

    @property
    def armed(self) -> bool:
        return bool(self.steps) and self.reference is not None

    def observe(self, loss: float) -> float | None:
        """Record one training loss; the mean of the latest window when one is to be judged.

        The same on every rank (batch counts are), so the judgement can be collective.
        """
        self._recent.append(loss)
        while len(self._recent) > self.window:
            self._recent.popleft()
        if not self.armed:
            return None
        self._after.append(loss)
        if len(self._after) < self.window:
            return None
        return sum(self._after[-self.window :]) / self.window

    def jumped(self, mean: float) -> bool:
        """True when ``mean`` (from :meth:`observe`) is a divergence from the reference."""
        assert self.reference is not None
        return mean > self.factor * self.reference and mean - self.reference >= MIN_JUMP


def divergence_message(
    guard: DivergenceGuard, mean: float, model: nn.Module, batch: torch.Tensor | None
) -> str:
    """What jumped, after which step, and the layers with the lowest SQNR on ``batch``."""
    worst = ""
    if batch is not None:
        stats = quantization_stats(model, batch)
        low = sorted(stats.items(), key=lambda kv: kv[1]["sqnr_db"])[:4]
        worst = "; lowest SQNR: " + ", ".join(
            f"{n} {v['sqnr_db']:.1f} dB (clip {100 * v['clip_rate']:.1f}%)" for n, v in low
        )
    return (
        f"QAT: the training loss rose from {guard.reference:.3f} to {mean:.3f} within "
        f"{guard.window} batches of {describe_steps(guard.steps)} at epoch {guard.epoch}{worst}"
    )


def check_finite_loss(
    trainer: Trainer,
    loss: torch.Tensor,
    model: nn.Module,
    batch: tuple[int, int, torch.Tensor | None] | None,
    phase: str,
) -> None:
    """Raise :class:`qat.NonFiniteError` naming where a non-finite training loss started.

    Collective under DDP: every rank stops at the same step, none is left waiting in the
    gradient all-reduce for a rank that has raised. ``batch`` is ``(epoch, index, input)``.
    """
    bad_rank = first_bad_rank(not bool(torch.isfinite(loss.detach()).all()), loss.device)
    if bad_rank is None:
        return
    epoch, batch_idx, x = batch or (trainer.current_epoch, None, None)
    if bad_rank == trainer.global_rank:
        where = locate_non_finite(model, x)
    else:
        where = "see that rank's error for where it started"
    raise NonFiniteError(
        f"non-finite training loss{rank_phrase(bad_rank)} at epoch {epoch}, batch "
        f"{batch_idx} (phase {phase}): {where}; lower the learning rate, check the input "
        "data, or resume from the last good checkpoint"
    )
