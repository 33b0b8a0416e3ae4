"""Calibration, BN re-estimation and bias links on the training data, the same on every rank."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn
from torch.utils.data import DataLoader

from qat.quant.bn_reestimate import reestimate_bn
from qat.quant.calibrate import calibrate
from qat.quant.control import iter_quantizers
from qat.quant.integer_bias import link_bias_quantizers
from qat.quant.layers import QConvBn2d


def calibrate_on_training_data(
    trainer: Trainer | None, model: nn.Module, num_batches: int, seed: int
) -> None:
    """:func:`qat.calibrate` on ``num_batches`` shuffled training batches (seeded)."""
    loader = calibration_loader(trainer, seed)
    if loader is None:
        rank_zero_warn("QATCallback: no training data to calibrate on; ranges start on data")
        return
    # Calibration must not consume the global RNG (augmentations draw from it): a run
    # resumed after this point does not calibrate again and must see the same stream.
    with isolate_rng():
        missing = calibrate(model, loader, num_batches=num_batches)
    rank_zero_info(
        f"QAT: calibrated {sum(1 for _ in iter_quantizers(model))} quantizers on "
        f"{num_batches} batches" + (f"; {len(missing)} saw no data" if missing else "")
    )


def reestimate_bn_on_training_data(
    trainer: Trainer | None, model: nn.Module, num_batches: int, seed: int, announce: bool = True
) -> bool:
    """:func:`qat.reestimate_bn` of every live conv+BN on ``num_batches`` training batches.

    The same batches and augmentations on every rank (``seed``), and rank 0's old statistics,
    so the replicas end with equal statistics and weight scales. Returns whether it ran (not
    when off, with no live BN, or without training data). ``announce``: say so in the log
    (the caller says it once, not at every validation).
    """
    if num_batches == 0:
        return False
    if not any(isinstance(m, QConvBn2d) and not m.is_bn_frozen for m in model.modules()):
        return False
    loader = calibration_loader(trainer, seed)
    if loader is None:
        rank_zero_warn("QATCallback: no training data to re-estimate BN statistics on")
        return False
    broadcast_bn_stats(model)
    with isolate_rng():
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        layers = reestimate_bn(model, loader, num_batches=num_batches)
    if announce:
        rank_zero_info(
            f"QAT: re-estimated the BN statistics of {len(layers)} layers on {num_batches} "
            "batches (again before each validation and the BN freeze while quantized: "
            "schedule.bn_reestimate_batches)"
        )
    return True


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
    return seeded_shuffle(source, seed)


def seeded_shuffle(source: DataLoader, seed: int) -> DataLoader:
    """``source``'s dataset in shuffled batches whose order ``seed`` fixes (the global RNG
    untouched), in this process."""
    return DataLoader(
        source.dataset,
        batch_size=source.batch_size or 1,
        shuffle=True,
        num_workers=0,
        collate_fn=source.collate_fn,
        generator=torch.Generator().manual_seed(seed),
    )


def activations_quantized(model: nn.Module) -> bool:
    """True once some activation quantizer of ``model`` quantizes (calibrated and on)."""
    acts = [q for _, q in iter_quantizers(model, "activation") if q.enabled]
    return any(q.fake_quant_enabled and q.is_initialized for q in acts)


def link_bias_on_batch(model: nn.Module, x: Any, samples: int) -> None:
    """:func:`qat.link_bias_quantizers` on the first ``samples`` inputs of a batch."""
    if not isinstance(x, torch.Tensor):
        rank_zero_warn(
            "QATCallback: quantize_bias needs batches whose first element is the model "
            f"input tensor (got {type(x).__name__}); the biases train in float"
        )
        return
    with isolate_rng():
        linked = link_bias_quantizers(model, x[:samples])
    rank_zero_info(f"QAT: {len(linked)} layers train their bias on the int32 grid")
