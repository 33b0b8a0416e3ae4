"""What the PTQ algorithms share: the layers they quantize, their weight grids as functions."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from qat.quant.blocks import fp16_scale, gguf_codes, gguf_scale, group_view, ungroup
from qat.quant.layers import QConv1D, QLinear
from qat.quant.qparams import qparams_from_range
from qat.quant.quantizer import FakeQuantizer

Forward = Callable[[nn.Module, Any], Any]


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Linear-like layers with an enabled weight quantizer, by name."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, QLinear | QConv1D) and m.weight_quant.enabled
    }


def rows_of(layer: nn.Module) -> torch.Tensor:
    """The weight as ``(out, in)`` float32 (a copy)."""
    w = layer.weight.detach().float()
    return (w.t() if isinstance(layer, QConv1D) else w).clone()


def group_of(q: FakeQuantizer, cols: int) -> int:
    return q.spec.group_size or cols


def group_scale(wg: torch.Tensor, q: FakeQuantizer) -> torch.Tensor:
    """The scale (GGUF: float32 ``d``) ``q``'s grid gives each row of ``wg`` ``(out, g)``."""
    if q.spec.grid != "affine":
        return gguf_scale(wg, q.spec.grid)
    qmin, qmax = q.quant_range
    lo, hi = torch.aminmax(wg.float(), dim=1)
    scale, _ = qparams_from_range(lo, hi, qmin, qmax, True, True)
    return scale


def quantize_with(w: torch.Tensor, scale: torch.Tensor, q: FakeQuantizer) -> torch.Tensor:
    """``w`` ``(out, c)`` on ``q``'s grid with one scale per row (exactly as ``q`` computes)."""
    if q.spec.grid != "affine":
        return gguf_codes(w, scale, q.spec.grid) * fp16_scale(scale)[:, None]
    qmin, qmax = q.quant_range
    return torch.clamp(torch.round(w * (1.0 / scale[:, None])), qmin, qmax) * scale[:, None]


def rtn_weight(w: torch.Tensor, q: FakeQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest of the rows ``w`` ``(out, in)`` with observed per-group scales:
    ``(values (out, in), scales (out · groups,))``."""
    g = group_of(q, w.shape[1])
    view = group_view(w, g, 1)
    scale = group_scale(view, q)
    return ungroup(quantize_with(view, scale, q), w.shape, 1), scale


@torch.no_grad()
def set_weight(layer: nn.Module, values: torch.Tensor, scales: torch.Tensor, name: str) -> None:
    """Store quantized ``values`` ``(out, in)`` and their ``scales`` in ``layer`` and freeze its
    weight quantizer there; raises if the fake-quant weight is not ``values`` exactly."""
    q: FakeQuantizer = layer.weight_quant
    layer.weight.copy_((values.t() if isinstance(layer, QConv1D) else values).to(layer.weight))
    q.scale.copy_(scales.reshape(q.scale.shape).to(q.scale))
    q.initialized = True
    q.enable_observer(False)
    was_training = q.training
    q.eval()
    got = q(layer.weight).float()
    q.train(was_training)
    got = got.t() if isinstance(layer, QConv1D) else got
    if not torch.equal(got, values.float()):
        raise RuntimeError(f"{name}: the quantized weights did not survive the fake quantizer")


@contextmanager
def weights_float(layers: Iterable[nn.Module]):
    """Switch the weight fake quantization of ``layers`` off inside the block."""
    layers = list(layers)
    before = [bool(m.weight_quant.fake_quant_enabled) for m in layers]
    for m in layers:
        m.weight_quant.enable_fake_quant(False)
    try:
        yield
    finally:
        for m, on in zip(layers, before, strict=True):
            m.weight_quant.enable_fake_quant(on)


@contextmanager
def all_float(model: nn.Module):
    """Switch every fake quantizer of ``model`` off inside the block (activations too)."""
    quants = [m for m in model.modules() if isinstance(m, FakeQuantizer)]
    before = [bool(q.fake_quant_enabled) for q in quants]
    for q in quants:
        q.enable_fake_quant(False)
    try:
        yield
    finally:
        for q, on in zip(quants, before, strict=True):
            q.enable_fake_quant(on)


def run_batches(model: nn.Module, batches: Iterable[Any], forward: Forward | None) -> None:
    """Feed ``batches`` through ``model`` in eval mode without gradients."""
    forward = forward or default_forward
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                forward(model, batch)
    finally:
        model.train(was_training)


def default_forward(model: nn.Module, batch: Any) -> Any:
    x = batch[0] if isinstance(batch, list | tuple) else batch
    return model(x)


def input_hook_target(layer: nn.Module) -> tuple[nn.Module, bool]:
    """Where a layer's matmul input is seen: its dynamic ``act_quant``'s output, else its input
    (``(module, is_output)``)."""
    aq = getattr(layer, "act_quant", None)
    if isinstance(aq, FakeQuantizer) and aq.enabled and bool(aq.fake_quant_enabled):
        return aq, True
    return layer, False
