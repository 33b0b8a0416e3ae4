"""BN re-estimation: population statistics of the quantized network, without changing its weights.

During QAT a :class:`qat.QConvBn2d` normalises with batch statistics and keeps running
averages for evaluation and export. At 2–3 bits weights oscillate between grid points from step
to step, and the running averages then describe none of the networks they averaged over (Nagel
et al. 2022, "Overcoming Oscillations in Quantization-Aware Training"): MobileNetV2 at W3A3 gave
86.6% validation accuracy with batch statistics and 43.1% with its running ones. Re-estimating
the statistics on a few batches of the final network closes that gap.

The fold factor ``f = γ/σ`` also sets the grid the folded weight ``W·f`` is quantized on, so new
statistics would re-round the weights. :func:`reestimate_bn` rescales each per-channel weight
scale by ``f_new/f_old`` with the statistics, which keeps every quantized weight value exactly:
``fq(W·f_new; s·f_new/f_old) = fq(W·f_old; s)·f_new/f_old``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from qat.quant.calibrate import check_num_batches, feed_batches
from qat.quant.layers import QConvBn2d
from qat.quant.quantizer import FakeQuantizer

__all__ = ["reestimate_bn"]


class _BatchMoments:
    """Averages the per-channel mean and (unbiased) variance of a BN's input over batches."""

    def __init__(self) -> None:
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None
        self.batches = 0

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        y = args[0].detach().float()
        dims = [d for d in range(y.dim()) if d != 1]
        mean, var = y.mean(dims), y.var(dims, unbiased=True)
        if self.mean is None:
            self.mean, self.var = mean, var
        else:
            self.mean, self.var = self.mean + mean, self.var + var
        self.batches += 1

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.mean is not None and self.var is not None
        return self.mean / self.batches, self.var / self.batches


def _exact_rescale(q: FakeQuantizer) -> bool:
    """True when multiplying ``q``'s scale per output channel rescales its grid exactly."""
    return q.enabled and q.spec.per_channel and q.axis == 0 and q.learned != "pact"


@torch.no_grad()
def _rescale_weight_grid(q: FakeQuantizer, ratio: torch.Tensor) -> None:
    ratio = ratio.to(q.scale.dtype)
    q.scale.mul_(ratio)
    # Observed ranges move with the grid, so a later re-expression (set_bits) agrees with it.
    q.min_val.mul_(ratio)
    q.max_val.mul_(ratio)


@torch.no_grad()
def reestimate_bn(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> list[str]:
    """Replace every live :class:`~qat.QConvBn2d`'s running statistics by population ones.

    The model runs as in training (batch-statistics BN, current bit widths and ranges) but
    nothing else changes: observers, LSQ re-initialisation and dropout are off, and the
    weights' per-channel scales are rescaled with the statistics so the folded integer weights
    stay the same (see the module docstring). Layers whose BN is frozen are left alone.

    Args:
        model: a prepared model.
        batches: tensors, ``(x, y, ...)`` tuples (``x`` is fed) or dicts (keyword args).
        num_batches: stop after this many batches.
        forward_fn: ``forward_fn(model, batch)`` for models with other call signatures.

    Returns:
        The names of the layers re-estimated.

    Raises:
        ValueError: ``num_batches`` < 1, no batches, or a live layer no batch reached (its
            statistics would be left stale; nothing is changed then).
    """
    check_num_batches("reestimate_bn", num_batches)
    layers = {
        name: m for name, m in model.named_modules() if isinstance(m, QConvBn2d) and not m.bn_frozen
    }
    if not layers:
        return []
    was_training = {m: m.training for m in model.modules()}
    moments = {name: _BatchMoments() for name in layers}
    momentum = {name: m.bn.momentum for name, m in layers.items()}
    tracked = {name: m.bn.num_batches_tracked.clone() for name, m in layers.items()}
    hooks = [m.bn.register_forward_pre_hook(moments[name]) for name, m in layers.items()]
    try:
        model.eval()
        for m in layers.values():
            m.train()  # batch-statistics BN, as in training
            m.bn.momentum = 0.0  # ...without moving the running statistics yet
        for q in model.modules():
            if isinstance(q, FakeQuantizer):
                q.eval()  # no observation, no LSQ re-initialisation or cap
        feed_batches("reestimate_bn", model, batches, num_batches, forward_fn)
    finally:
        for h in hooks:
            h.remove()
        for name, m in layers.items():
            m.bn.momentum = momentum[name]
            m.bn.num_batches_tracked.copy_(tracked[name])
        for m, training in was_training.items():
            m.training = training
    unseen = [name for name in layers if moments[name].batches == 0]
    if unseen:
        raise ValueError(
            f"reestimate_bn(): {len(unseen)} layer(s) saw no data and would keep stale "
            f"statistics: {', '.join(unseen[:10])}; feed batches that reach every branch"
        )
    inexact = []
    for name, m in layers.items():
        mean, var = moments[name].result()
        bn = m.bn
        ratio = torch.sqrt(bn.running_var + bn.eps) / torch.sqrt(var + bn.eps)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        if _exact_rescale(m.weight_quant):
            _rescale_weight_grid(m.weight_quant, ratio)
        elif m.weight_quant.enabled:
            inexact.append(name)
    if inexact:
        warnings.warn(
            f"reestimate_bn(): {len(inexact)} layer(s) quantize weights per tensor, so their "
            f"grid cannot follow the new fold factors and weights may re-round: "
            f"{', '.join(inexact[:10])}",
            stacklevel=2,
        )
    return list(layers)
