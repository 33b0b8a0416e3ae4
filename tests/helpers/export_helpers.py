"""Helpers for the export tests: tiny fake-quant models, calibrated and briefly trained."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

import qat
from qat.quant.control import set_observers
from qat.quant.layers import QConvBn2d


def recipe(bits: int, per_channel: bool = True, **extra) -> dict:
    """W{bits}A{bits}; per-channel or per-tensor weights."""
    return {
        "weight": {"bits": bits, "per_channel": per_channel},
        "activation": {"bits": bits},
        **extra,
    }


def quantize(
    model: nn.Module,
    rec: dict,
    make_batch: Callable[[], torch.Tensor],
    steps: int = 3,
    lr: float = 0.05,
    targets: Callable[[torch.Tensor], torch.Tensor] | None = None,
    freeze_bn: bool = False,
    capture: str = "auto",
) -> nn.Module:
    """prepare → calibrate → a few QAT steps with observers on → frozen observers, eval mode.

    The training steps move weights, BN statistics and ranges after calibration, so the
    exported numbers are not simply the calibration ones. ``freeze_bn`` trains on the folded
    graph with running statistics (QAT's late phase).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = qat.prepare(model, rec, capture=capture)
        qat.calibrate(q, [make_batch() for _ in range(2)])
    set_observers(q, True)
    q.train()
    if freeze_bn:
        for m in q.modules():
            if isinstance(m, QConvBn2d):
                m.freeze_bn_stats()
    opt = torch.optim.SGD(q.parameters(), lr=lr)
    for _ in range(steps):
        x = make_batch()
        out = q(x)
        loss = (
            nn.functional.cross_entropy(out, targets(x))
            if targets is not None
            else out.float().pow(2).mean()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    set_observers(q, False)
    return q.eval()


def train_float(
    model: nn.Module,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    lr: float = 3e-3,
) -> nn.Module:
    """A few Adam steps in float, so the quantized model has real margins between classes."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def max_steps(out: torch.Tensor, ref: torch.Tensor, scale: float) -> float:
    """Largest |out − ref| in units of the output quantization step."""
    return float((out.float() - ref.float()).abs().max()) / scale


class Wrap(nn.Module):
    """A non-Sequential root (prepare hangs the input quantizer on the root)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def pinned_conv(
    bits: int, s_in: float, s_w: float, s_out: float, weight: float, bias: float | None = None
) -> nn.Module:
    """A one-channel 1×1 conv in :class:`Wrap`, W{bits}A{bits} in eval mode, on fixed grids.

    Input, weight and output steps are ``s_in``, ``s_w``, ``s_out`` with zero points 0; the
    weight (and bias, if given) is filled with ``weight`` (``bias``).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = qat.prepare(Wrap(nn.Conv2d(1, 1, 1, bias=bias is not None)), recipe(bits))
        qat.calibrate(q, [torch.rand(2, 1, 2, 2)])
    q.eval()
    with torch.no_grad():
        for fq, s in (
            (q.input_quant, s_in),
            (q.body.weight_quant, s_w),
            (q.body.output_quant, s_out),
        ):
            fq.scale.fill_(s)
            fq.zero_point.fill_(0)
        q.body.weight.fill_(weight)
        if bias is not None:
            q.body.bias.fill_(bias)
    return q
