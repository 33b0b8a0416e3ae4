"""``LanguageModelModule``: the LightningModule for next-token prediction.

It knows nothing of quantization (the QAT callback prepares ``self.model`` in ``setup()``, as for
classifiers). Batches are ``(ids, targets)`` of shape ``(B, T)`` (:class:`qat.data.TextDataModule`);
the model is qat's ``gpt`` or any Hugging Face causal LM (called through
:func:`qat.export.lm_io.logits_of`). Logged: ``train/loss``; ``val/loss``, ``val/ppl``,
``val/acc`` (next-token top-1 accuracy) and the same for ``test/``. Perplexity is torchmetrics'
``exp(mean NLL)`` over all tokens of the epoch.

Example:
    >>> from functools import partial
    >>> module = LanguageModelModule(
    ...     create_model("gpt"), optimizer=partial(torch.optim.AdamW, lr=3e-3)
    ... )
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from qat.export.lm_io import logits_of
from qat.lit.optim import ConfiguresOptimizers, OptimizerFactory, SchedulerFactory

__all__ = ["LanguageModelModule"]


class LanguageModelModule(ConfiguresOptimizers, LightningModule):
    """Next-token cross-entropy with perplexity and top-1 accuracy.

    Args:
        model: the network: ``ids (B, T) → logits (B, T, V)``.
        optimizer: ``optimizer(params) -> Optimizer`` (a Hydra partial).
        scheduler: ``scheduler(optimizer) -> LRScheduler`` or None (run length filled in).
        scheduler_interval: ``"step"`` or ``"epoch"``.
        label_smoothing: cross-entropy label smoothing of the training loss.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "step",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(
                f"scheduler_interval={scheduler_interval!r} is invalid: allowed: step, epoch"
            )
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"])
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.label_smoothing = float(label_smoothing)
        self.val_ppl, self.test_ppl = Perplexity(), Perplexity()
        self.val_acc, self.test_acc = MeanMetric(), MeanMetric()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model, ids)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, targets = batch[0], batch[1]
        logits = self(ids)
        loss = F.cross_entropy(
            logits.flatten(0, -2).float(), targets.flatten(), label_smoothing=self.label_smoothing
        )
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def _evaluate(self, batch: Any, stage: str) -> None:
        ids, targets = batch[0], batch[1]
        logits = self(ids).float()
        loss = F.cross_entropy(logits.flatten(0, -2), targets.flatten())
        ppl = self.val_ppl if stage == "val" else self.test_ppl
        acc = self.val_acc if stage == "val" else self.test_acc
        ppl.update(logits, targets)
        acc.update((logits.argmax(-1) == targets).float().mean(), weight=targets.numel())
        self.log(f"{stage}/loss", loss, on_epoch=True, sync_dist=True)
        self.log(f"{stage}/ppl", ppl, on_epoch=True, prog_bar=True)
        self.log(f"{stage}/acc", acc, on_epoch=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")
