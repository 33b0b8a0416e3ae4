"""The data the QAT callback calibrates and re-estimates BN statistics on, the same on every rank."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader

from qat.quant.layers import QConvBn2d


def broadcast_bn_stats(model: nn.Module) -> None:
    """Give every rank rank 0's BN running statistics (what DDP does at each forward).

    After a training step each rank holds its own update of them; re-estimation rescales the
    weight scales by old/new statistics, so the old ones must agree for the scales to.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for m in model.modules():
        if isinstance(m, QConvBn2d) and not m.is_bn_frozen:
            torch.distributed.broadcast(m.bn.running_mean, src=0)
            torch.distributed.broadcast(m.bn.running_var, src=0)


def calibration_loader(trainer: Trainer | None, seed: int) -> DataLoader | None:
    """A main-process loader over the training set, shuffled with its own generator.

    Not the Trainer's own loader: iterating that one here would reset its (persistent)
    iterator mid-epoch, and its DistributedSampler would give every rank other batches.
    """
    if trainer is None:
        return None
    source = trainer.train_dataloader
    if source is None and trainer.datamodule is not None:
        source = trainer.datamodule.train_dataloader()
    if isinstance(source, Mapping):
        source = next(iter(source.values()), None)
    elif isinstance(source, list | tuple):
        source = source[0] if source else None
    if not isinstance(source, DataLoader):
        return None
    return DataLoader(
        source.dataset,
        batch_size=source.batch_size or 1,
        shuffle=True,
        num_workers=0,
        collate_fn=source.collate_fn,
        generator=torch.Generator().manual_seed(seed),
    )
