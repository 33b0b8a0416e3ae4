"""Initialise every quantizer's range from a few batches: post-training quantization.

Also the shared loop that feeds batches to a model (:func:`feed_batches`), used by calibration
and BN re-estimation.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from qat.quant.control import (
    is_prepared,
    iter_quantizers,
    set_fake_quant,
    set_observers,
    uninitialized_quantizers,
)
from qat.quant.layers import QConvBn2d


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, list | tuple):
        return model(batch[0])
    return model(batch)


def _fresh_batch_norms(model: nn.Module) -> list[nn.Module]:
    """Batch norms whose running statistics are still their initial placeholders."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.track_running_stats
        and int(m.num_batches_tracked) == 0
    ]


def _estimate_batch_norms(
    model: nn.Module,
    fresh: list[nn.Module],
    batches: list[Any],
    forward_fn: Callable[[nn.Module, Any], Any] | None,
) -> None:
    """Population statistics for ``fresh`` batch norms from ``batches`` (float forward)."""
    modes = {m: m.training for m in model.modules()}
    momentum = {m: m.momentum for m in fresh}
    set_observers(model, False)
    set_fake_quant(model, False)
    model.eval()
    owners = {m.bn: m for m in model.modules() if isinstance(m, QConvBn2d)}
    try:
        for m in fresh:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches
            # A conv+BN computes its batch statistics in its own training forward.
            owners.get(m, m).train()
        feed_batches("calibrate", model, batches, None, forward_fn)
    finally:
        for m in fresh:
            m.momentum = momentum[m]
        for m, training in modes.items():
            m.training = training


def check_num_batches(caller: str, num_batches: int | None) -> None:
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"{caller} num_batches={num_batches} is invalid: expected ≥ 1 or None")


def feed_batches(
    caller: str,
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None,
    forward_fn: Callable[[nn.Module, Any], Any] | None,
) -> None:
    """Run ``model`` on up to ``num_batches`` batches (moved to its device); none is an error."""
    device = _model_device(model)
    forward = forward_fn or _default_forward
    seen = 0
    for batch in batches:
        if num_batches is not None and seen >= num_batches:
            break
        forward(model, _to_device(batch, device))
        seen += 1
    if seen == 0:
        raise ValueError(f"{caller}() got no batches: pass an iterable with at least one batch")


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> list[str]:
    """Initialise every quantizer's range from data (post-training quantization).

    Runs the model in eval mode with observers on and fake quantization off, then leaves it
    with fake quantization on and observers off: the calibrated PTQ model. Re-enable observers
    (:func:`qat.set_observers`) for QAT with live ranges.

    Batch norms that never saw data (a model trained from scratch: running mean 0, variance
    1) first get their statistics from the same batches: ranges observed through placeholder
    statistics are off by the activations' whole scale (on a fresh EfficientNet, 90-99% of
    the conv outputs clipped in training, squeeze-excite inputs collapsed to one level, and
    batch norm then amplified the gradients to 1e29 in one step).

    Args:
        model: a prepared model.
        batches: tensors, ``(x, y, ...)`` tuples (``x`` is fed) or dicts (fed as keyword args).
        num_batches: stop after this many batches.
        forward_fn: ``forward_fn(model, batch)`` for models with other call signatures.

    Returns:
        The names of quantizers that saw no data (a branch the batches never reached); they
        stay in float until they do, and export refuses them.
    """
    if not is_prepared(model):
        raise ValueError(
            "calibrate() needs a prepared model: call qat.prepare(model, recipe) first"
        )
    check_num_batches("calibrate", num_batches)
    fresh = _fresh_batch_norms(model)
    if fresh:
        # Twice through the same batches: the statistics first, then the ranges.
        batches = list(itertools.islice(batches, num_batches) if num_batches else batches)
        _estimate_batch_norms(model, fresh, batches, forward_fn)
    was_training = model.training
    model.eval()
    # BN uses running statistics, but the quantizers observe (they only do in train mode).
    for _, q in iter_quantizers(model):
        q.train()
    set_observers(model, True)
    set_fake_quant(model, False)
    try:
        feed_batches("calibrate", model, batches, num_batches, forward_fn)
    finally:
        set_observers(model, False)
        set_fake_quant(model, True)
        model.train(was_training)
    missing = uninitialized_quantizers(model)
    if missing:
        warnings.warn(
            f"{len(missing)} quantizer(s) saw no calibration data and stay in float: "
            + ", ".join(missing[:10]),
            stacklevel=2,
        )
    return missing
