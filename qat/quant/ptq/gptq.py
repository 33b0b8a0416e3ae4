"""GPTQ (Frantar et al., 2023): weights quantized column by column with error feedback.

For each linear layer, in execution order: the inputs ``X`` it sees from the calibration
batches (after its dynamic activation quantizer, and through the layers quantized before it)
give ``H = 2 XᵀX / n``; columns are quantized left to right, and each column's error is spread
over the columns not yet quantized through the Cholesky factor of ``H⁻¹`` (lazy batches of 128
columns). A group's scale is found on the group's (updated) weights when its first column is
reached, on the layer's own grid (per-group affine, GGUF Q4_0 / Q8_0, per-channel), so the
result is stored as weights plus scales that the fake quantizer reproduces exactly. No act-order
(groups stay contiguous, as the exporters need).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from qat.quant.ptq.common import (
    Forward,
    group_of,
    group_scale,
    input_hook_target,
    linear_layers,
    quantize_with,
    rows_of,
    run_batches,
    set_weight,
    weights_float,
)


class _Stop(Exception):
    """Raised by the capture hook: the rest of the forward is not needed."""


def _hessian(model: nn.Module, layer: nn.Module, batches: list, forward: Forward | None):
    cols = rows_of(layer).shape[1]
    h = torch.zeros(cols, cols, dtype=torch.float64)
    count = [0]
    target, is_output = input_hook_target(layer)

    def capture(x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, cols).double()
        h.addmm_(x.t(), x)
        count[0] += x.shape[0]
        raise _Stop

    if is_output:
        handle = target.register_forward_hook(lambda m, a, out: capture(out))
    else:
        handle = target.register_forward_pre_hook(lambda m, a: capture(a[0]))
    try:
        for batch in batches:
            with contextlib.suppress(_Stop):  # the hook stops each forward at this layer
                run_batches(model, [batch], forward)
    finally:
        handle.remove()
    return h * (2.0 / max(count[0], 1))


def gptq_weight(
    w: torch.Tensor, h: torch.Tensor, q: Any, damp: float = 0.01, block: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of the rows ``w`` ``(out, in)`` with Hessian ``h``: ``(values, scales)``."""
    w = w.clone().float()
    out, cols = w.shape
    g = group_of(q, cols)
    block = max(block // g, 1) * g if g < cols else block
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    hinv = hinv.float()
    values = torch.zeros_like(w)
    scales = torch.zeros(out, cols // g)
    scale = group_scale(w, q) if g == cols else None  # per channel: from the whole row
    if scale is not None:
        scales[:, 0] = scale
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(out, i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if g < cols and col % g == 0:
                scale = group_scale(w1[:, i : i + g], q)
                scales[:, col // g] = scale
            wc = w1[:, i]
            qc = quantize_with(wc[:, None], scale, q)[:, 0]
            values[:, col] = qc
            err = (wc - qc) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return values, scales.reshape(-1)


@torch.no_grad()
def gptq(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Forward | None = None,
    damp: float = 0.01,
) -> list[str]:
    """GPTQ every linear layer of a prepared ``model``, in place (module docstring).

    Args:
        model: a prepared model (its weight quantizers define the grids).
        batches: calibration batches (``(ids, targets)`` or ids).
        forward: ``forward(model, batch)`` (default: ``model(batch[0])``).
        damp: dampening added to ``H``'s diagonal, as a fraction of its mean.

    Returns:
        The names of the layers quantized, in the order they were.
    """
    batches = list(batches)
    layers = linear_layers(model)
    order: list[str] = []
    hooks = [
        m.register_forward_pre_hook(lambda mod, a, n=n: order.append(n) if n not in order else None)
        for n, m in layers.items()
    ]
    try:
        with weights_float(layers.values()):
            run_batches(model, batches[:1], forward)
    finally:
        for h in hooks:
            h.remove()
    pending = dict(layers)
    for name in order:
        layer = pending.pop(name)
        # Layers before this one are quantized already; the ones after it are still float.
        with weights_float(pending.values()):
            h = _hessian(model, layer, batches, forward)
        values, scales = gptq_weight(rows_of(layer), h, layer.weight_quant, damp)
        set_weight(layer, values, scales, name)
    return order
