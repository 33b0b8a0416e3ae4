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
from qat.lit.distill import check_distillation, kd_loss
from qat.lit.lora import add_lora, lora_layers, merge_lora
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
        teacher: the frozen float model to distil from (QAD: quantization-aware distillation,
            as NVIDIA's and torchao's LLM recipes do); with ``model=hf`` the pretrained model.
        distill_weight: weight ``w`` of the distillation term: the loss is
            ``(1 - w) * CE + w * T² * KL(teacher ‖ student)``, the KL over the vocabulary at
            every position, averaged over positions; 0: off, 1: distillation only.
        distill_temperature: ``T``, the softmax temperature of both models in that term.
        lora_rank: LoRA QAT (:mod:`qat.lit.lora`): rank of the adapters put on the quantized
            linear layers once the QAT callback has swapped them in; the base model is frozen
            and the adapters are merged into the weights when training ends. 0: off.
        lora_alpha: the adapters' scale is ``lora_alpha / lora_rank``.
        lora_targets: shell patterns of the layers adapted (null: all but the output layer).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "step",
        label_smoothing: float = 0.0,
        teacher: nn.Module | None = None,
        distill_weight: float = 0.0,
        distill_temperature: float = 1.0,
        lora_rank: int = 0,
        lora_alpha: float = 16.0,
        lora_targets: list[str] | None = None,
    ) -> None:
        super().__init__()
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError(
                f"scheduler_interval={scheduler_interval!r} is invalid: allowed: step, epoch"
            )
        check_distillation(distill_weight, distill_temperature, teacher, "model")
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler", "teacher"])
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.label_smoothing = float(label_smoothing)
        self.distill_weight = float(distill_weight)
        self.distill_temperature = float(distill_temperature)
        # In a tuple, not an attribute: nn.Module would register it, putting its weights in
        # every checkpoint, the optimizer and `.train()`.
        self._teacher: tuple[nn.Module, ...] = ()
        if teacher is not None and self.distill_weight > 0:
            self._teacher = (teacher.eval().requires_grad_(False),)
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0:
            raise ValueError(f"lora_rank={lora_rank!r} is invalid: an int >= 0 (0: no adapters)")
        self.lora_rank, self.lora_alpha = lora_rank, float(lora_alpha)
        self.lora_targets = list(lora_targets) if lora_targets else None
        self.val_ppl, self.test_ppl = Perplexity(), Perplexity()
        self.val_acc, self.test_acc = MeanMetric(), MeanMetric()

    def setup(self, stage: str) -> None:
        # After the QAT callback's setup (the layers are QLinear now), before the optimizer.
        if stage == "fit" and self.lora_rank and not lora_layers(self.model):
            add_lora(self.model, self.lora_rank, self.lora_alpha, self.lora_targets)

    def on_fit_end(self) -> None:
        # Test, checkpoints written from here on and export see plain, merged weights.
        merge_lora(self.model)

    def on_fit_start(self) -> None:
        for teacher in self._teacher:
            teacher.to(self.device).eval()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model, ids)

    def distill_loss(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``T² · KL(teacher ‖ student)`` over the vocabulary, mean over positions."""
        (teacher,) = self._teacher
        with torch.no_grad():
            target = logits_of(teacher, ids)
        return kd_loss(logits, target, self.distill_temperature)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, targets = batch[0], batch[1]
        logits = self(ids)
        loss = F.cross_entropy(
            logits.flatten(0, -2).float(), targets.flatten(), label_smoothing=self.label_smoothing
        )
        if self._teacher:
            kd = self.distill_loss(logits, ids)
            self.log("train/ce_loss", loss, on_step=False, on_epoch=True)
            self.log("train/distill_loss", kd, on_step=False, on_epoch=True)
            loss = (1.0 - self.distill_weight) * loss + self.distill_weight * kd
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
