"""``ClassifierModule``: the LightningModule around any image classifier.

It knows nothing of quantization: :class:`qat.lit.QATCallback` swaps ``self.model``'s
layers in ``setup()`` and runs the schedule. Optimizer and LR scheduler come from the config as
Hydra partials (``_partial_: true``), so their arguments live in YAML.

Example:
    >>> from functools import partial
    >>> from qat.models import create_model
    >>> module = ClassifierModule(
    ...     create_model("resnet20", num_classes=10, in_channels=1),
    ...     optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9),
    ...     scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR),  # T_max filled in
    ... )
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from qat.lit.distill import check_distillation, kd_loss
from qat.lit.optim import ConfiguresOptimizers, OptimizerFactory, SchedulerFactory
from qat.quant.numerics import runtime_numerics


class ClassifierModule(ConfiguresOptimizers, LightningModule):
    """Cross-entropy classification with top-1 accuracy for train / val / test.

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``.

    Args:
        model: the network (float; the QAT callback prepares it in place).
        num_classes: classes, for the accuracy metrics (default: ``model.num_classes``).
        optimizer: ``optimizer(params) -> Optimizer`` (a Hydra partial).
        scheduler: ``scheduler(optimizer) -> LRScheduler`` or None. ``T_max`` / ``total_steps`` /
            ``total_iters`` are filled in from the Trainer when not given.
        scheduler_interval: ``"step"`` or ``"epoch"``.
        label_smoothing: cross-entropy label smoothing.
        channels_last: run convolutions in channels-last memory format (faster on x86 CPUs).
        teacher: a trained network to distil from (Hinton et al. 2015), typically the float
            model QAT starts from. Kept in eval mode and out of the checkpoint, the optimizer
            and the exported model.
        distill_weight: weight ``w`` of the distillation term in the training loss
            ``(1 - w) * CE + w * T² * KL(teacher ‖ student)`` at temperature ``T``; 0: off.
        distill_temperature: ``T``, the softmax temperature of both networks in that term.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        num_classes: int | None = None,
        scheduler_interval: str = "step",
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        teacher: nn.Module | None = None,
        distill_weight: float = 0.0,
        distill_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        check_distillation(
            distill_weight,
            distill_temperature,
            teacher,
            "network to distil from (in train.py: init_from=<float checkpoint>, the teacher)",
        )
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(
                f"scheduler_interval={scheduler_interval!r} is invalid: allowed: step, epoch"
            )
        num_classes = num_classes or getattr(model, "num_classes", None)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(
                f"num_classes={num_classes!r} is invalid: pass an int >= 2 (the model has no "
                "num_classes attribute to take it from)"
            )
        # The network and the factories are not hyperparameters: the run's Hydra config holds
        # them, and pickling a partial into every checkpoint would tie checkpoints to code.
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler", "teacher"])
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.num_classes = num_classes
        self.scheduler_interval = scheduler_interval
        self.label_smoothing = float(label_smoothing)
        self.channels_last = channels_last
        self.distill_weight = float(distill_weight)
        self.distill_temperature = float(distill_temperature)
        # In a tuple, not an attribute: nn.Module would register it, putting its weights in
        # every checkpoint, the optimizer, DDP's gradient sync and `.train()`.
        self._teacher: tuple[nn.Module, ...] = ()
        if teacher is not None and self.distill_weight > 0:
            self._teacher = (teacher.eval().requires_grad_(False),)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def setup(self, stage: str) -> None:
        # Runs after Callback.setup (the QAT swap), before the optimizer exists: `.to()` keeps
        # parameter identity, so it is safe either way.
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
            for teacher in self._teacher:
                teacher.to(memory_format=torch.channels_last)

    def on_fit_start(self) -> None:
        for teacher in self._teacher:
            teacher.to(self.device).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def _step(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loss, logits, y = self._loss(batch)
        return loss, logits.argmax(dim=1), y

    def _loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch[0], batch[1]
        logits = self(x)
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing), logits, y

    def distill_loss(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``T² · KL(teacher ‖ student)`` at temperature ``T`` (:func:`kd_loss`)."""
        (teacher,) = self._teacher
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            target = teacher(x).float()
        return kd_loss(logits, target, self.distill_temperature)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, logits, y = self._loss(batch)
        if self._teacher:
            kd = self.distill_loss(logits, batch[0])
            self.log("train/ce_loss", loss, on_step=False, on_epoch=True)
            self.log("train/distill_loss", kd, on_step=False, on_epoch=True)
            loss = (1.0 - self.distill_weight) * loss + self.distill_weight * kd
        self.train_acc(logits.argmax(dim=1), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, preds, y = self._step(batch)
        self.val_acc(preds, y)
        self.log("val/loss", loss, on_epoch=True, prog_bar=False, sync_dist=True)
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        # The test metrics are the ones the exported integer models are held to: exact sums and
        # the runtimes' requantization (see qat.runtime_numerics).
        with runtime_numerics(self.model):
            loss, preds, y = self._step(batch)
        self.test_acc(preds, y)
        self.log("test/loss", loss, on_epoch=True, sync_dist=True)
        self.log("test/acc", self.test_acc, on_epoch=True, prog_bar=True)
