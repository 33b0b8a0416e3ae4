"""Optimizer and LR scheduler from the config's factories, shared by the LightningModules.

The optimizer and scheduler come from the config as Hydra partials (``_partial_: true``). Learned
quantizer ranges (LSQ step sizes, PACT clips) get no weight decay, and a scheduler's run length
(``T_max`` / ``total_steps`` / ``total_iters``) is filled in from the Trainer when not given.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from qat.quant.quantizer import FakeQuantizer

__all__ = ["ConfiguresOptimizers", "OptimizerFactory", "SchedulerFactory"]

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]

#: Scheduler arguments that mean "length of the run"; filled in from the Trainer when the
#: config leaves them out, in steps or epochs depending on ``scheduler_interval``.
_LENGTH_ARGS = ("T_max", "total_steps", "total_iters")


class ConfiguresOptimizers:
    """``configure_optimizers`` from ``self.optimizer_factory`` / ``self.scheduler_factory``
    (and ``self.scheduler_interval``), for a LightningModule."""

    optimizer_factory: OptimizerFactory | None
    scheduler_factory: SchedulerFactory | None
    scheduler_interval: str

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ValueError(f"{type(self).__name__} needs an optimizer factory to train")
        optimizer = self.optimizer_factory(self._param_groups())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, **self._length_kwargs())
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval},
        }

    def _param_groups(self) -> list[dict[str, Any]]:
        """All trainable parameters; learned quantizer ranges (LSQ step sizes, PACT clips)
        without weight decay, which would otherwise shrink them towards zero."""
        quant_ids = {
            id(p)
            for m in self.modules()
            if isinstance(m, FakeQuantizer)
            for p in m.parameters(recurse=False)
        }
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if id(p) not in quant_ids]}]
        quant = [p for p in params if id(p) in quant_ids]
        if quant:
            groups.append({"params": quant, "weight_decay": 0.0})
        return groups

    def _length_kwargs(self) -> dict[str, int]:
        """Fill in the scheduler's run length (steps or epochs) when the config left it out."""
        factory = self.scheduler_factory
        given = set(getattr(factory, "keywords", {}) or {})
        target = getattr(factory, "func", factory)
        try:
            params = inspect.signature(target).parameters
        except (TypeError, ValueError):
            return {}
        for name in _LENGTH_ARGS:
            if name in params and name not in given:
                if self.scheduler_interval == "step":
                    length = int(self.trainer.estimated_stepping_batches)
                else:
                    length = int(self.trainer.max_epochs or 1)
                return {name: max(1, length)}
        return {}
