"""``EpochSeed``: reseed every epoch, so a resumed run replays the epochs of the uninterrupted one."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn


class EpochSeed(Callback):
    """Reseed torch / numpy / random at every epoch, so a resumed run replays the same epochs.

    Lightning does not checkpoint the global RNG, so after a ``ckpt_path=`` resume the sampler
    shuffle, augmentations and dropout would differ from the uninterrupted run. Seeding with
    ``seed + epoch`` right before each epoch's data iterator is created makes epoch ``k`` the
    same whether or not the run was interrupted. Exact with ``num_workers=0``; persistent loader
    workers keep their own RNG across epochs.

    Where: Lightning creates the first epoch's iterator early (in ``configure_optimizers`` when
    a scheduler asks for ``estimated_stepping_batches``, else at fit-loop start), after
    ``setup()`` and after a checkpoint's callback state is loaded, and later epochs' iterators
    right after ``on_train_epoch_start``. So the first epoch of a ``fit`` is seeded in
    ``setup()`` (fresh) or ``load_state_dict()`` (resumed), the others in
    ``on_train_epoch_start``.

    Args:
        seed: base seed (the run's ``seed``).
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = int(seed)
        self._first_epoch: int | None = None
        self._trainer: Trainer | None = None

    def _reseed(self, epoch: int) -> None:
        value = (self.seed + 1_000_003 * epoch) % 2**32
        torch.manual_seed(value)
        np.random.seed(value)
        random.seed(value)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer
        if stage == "fit":
            self._first_epoch = 0
            self._reseed(0)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Called while the checkpoint is restored: after setup(), before the iterator exists.
        self._first_epoch = int(state_dict.get("resume_epoch", 0))
        self._reseed(self._first_epoch)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._first_epoch is not None:
            first, self._first_epoch = self._first_epoch, None
            if trainer.current_epoch != first:
                rank_zero_warn(
                    f"EpochSeed: training started at epoch {trainer.current_epoch}, expected "
                    f"{first}; this epoch will not replay the uninterrupted run"
                )
            return
        self._reseed(trainer.current_epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "resume_epoch": self._next_epoch(self._trainer)}

    @staticmethod
    def _next_epoch(trainer: Trainer | None) -> int:
        """Epoch a run resumed from a checkpoint saved now starts at."""
        if trainer is None:
            return 0
        progress = trainer.fit_loop.epoch_loop.batch_progress
        # Saved after the epoch's last batch (epoch end / end-of-epoch validation): the next
        # epoch. Saved mid-epoch: Lightning resumes inside this one.
        return trainer.current_epoch + (1 if progress.is_last_batch else 0)
