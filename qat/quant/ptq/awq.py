"""AWQ (Lin et al., 2024): activation-aware weight scaling and clipping, for per-group weights.

1. Scales: for every norm (LayerNorm / RMSNorm) whose output feeds linear layers directly, a
   per-input-channel scale ``s = mean|x|^α`` (normalised) is searched over ``α`` in a grid of
   ``[0, 1)``: the weights become ``W·diag(s)`` and the norm's weight and bias ``/ s``, the
   same float function, and the ``α`` whose quantized ``Q(W·s)/s`` reproduces ``X Wᵀ`` best
   (mean squared error on calibration inputs) is kept. A fold that changes the float model's
   output (a norm that also feeds something else) is undone.
2. Clipping: every linear layer's weights are clipped per group to the fraction of their
   max magnitude (searched down to half) whose quantization reproduces the group's
   contribution to the outputs best.
3. The layers are then quantized to nearest on their grids (:func:`qat.quant.ptq.rtn`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from qat.quant.layers import QAct, QConv1D
from qat.quant.ptq.common import (
    Forward,
    all_float,
    group_of,
    group_scale,
    input_hook_target,
    linear_layers,
    quantize_with,
    rows_of,
    rtn_weight,
    run_batches,
    weights_float,
)
from qat.quant.ptq.rtn import rtn

MAX_ROWS = 2048  # calibration tokens kept per layer for the searches


def _is_norm(m: nn.Module) -> bool:
    inner = m.act if isinstance(m, QAct) else m
    return "Norm" in type(inner).__name__ and isinstance(
        getattr(inner, "weight", None), nn.Parameter
    )


def _norm_module(m: nn.Module) -> nn.Module:
    return m.act if isinstance(m, QAct) else m


def _collect(
    model: nn.Module, layers: dict[str, nn.Module], batches: list, forward: Forward | None
):
    """Per linear layer: sampled matmul inputs ``(n, in)``; and which norm's output it reads."""
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # the tensor too: ids get reused
    reads: dict[str, str | None] = {}
    handles = []
    for name, m in model.named_modules():
        if _is_norm(m):
            handles.append(
                m.register_forward_hook(
                    lambda mod, a, out, n=name: produced.__setitem__(id(out), (n, out))
                )
            )
    for name, layer in layers.items():

        def pre(mod, args, n=name):
            hit = produced.get(id(args[0]))
            reads.setdefault(n, hit[0] if hit is not None and hit[1] is args[0] else None)

        handles.append(layer.register_forward_pre_hook(pre))
        target, is_output = input_hook_target(layer)
        cols = rows_of(layer).shape[1]

        def keep(x: torch.Tensor, n: str = name, c: int = cols) -> None:
            flat = x.detach().reshape(-1, c).float()
            step = max(1, flat.shape[0] * len(batches) // MAX_ROWS)
            inputs[n].append(flat[::step])

        if is_output:
            handles.append(target.register_forward_hook(lambda m, a, out, k=keep: k(out)))
        else:
            handles.append(target.register_forward_pre_hook(lambda m, a, k=keep: k(a[0])))
    try:
        with weights_float(layers.values()):
            run_batches(model, batches, forward)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v)[:MAX_ROWS] for n, v in inputs.items() if v}, reads


def _scaled_error(x: torch.Tensor, group: list[nn.Module], s: torch.Tensor) -> float:
    err = 0.0
    for layer in group:
        w = rows_of(layer)
        wq, _ = rtn_weight(w * s[None, :], layer.weight_quant)
        err += float(((x @ (wq / s[None, :]).t()) - x @ w.t()).pow(2).mean())
    return err


def _fold(norm: nn.Module, group: list[nn.Module], s: torch.Tensor) -> None:
    norm = _norm_module(norm)
    norm.weight.div_(s.to(norm.weight))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias))
    for layer in group:
        if isinstance(layer, QConv1D):
            layer.weight.mul_(s[:, None].to(layer.weight))
        else:
            layer.weight.mul_(s[None, :].to(layer.weight))


def _outputs(model: nn.Module, layers: dict, batch: Any, forward: Forward | None) -> torch.Tensor:
    from qat.quant.ptq.common import default_forward

    # The float function (activation rounding off too): a fold must leave it unchanged.
    with all_float(model), torch.no_grad():
        was = model.training
        model.eval()
        out = (forward or default_forward)(model, batch)
        model.train(was)
    out = getattr(out, "logits", out)
    return (out[0] if isinstance(out, tuple | list) else out).float()


def _clip(layer: nn.Module, x: torch.Tensor, steps: int = 20) -> None:
    q = layer.weight_quant
    w = rows_of(layer)
    g = group_of(q, w.shape[1])
    wg = w.reshape(w.shape[0], -1, g)  # (out, groups, g)
    xg = x.reshape(x.shape[0], -1, g)  # (n, groups, g)
    ref = torch.einsum("ngk,ogk->ogn", xg, wg)
    amax = wg.abs().amax(dim=2, keepdim=True)
    best = torch.full(wg.shape[:2], float("inf"))
    best_max = amax.clone()
    for i in range(steps):
        cap = amax * (1 - 0.5 * i / steps)
        wc = torch.maximum(torch.minimum(wg, cap), -cap)
        view = wc.reshape(-1, g)
        wq = quantize_with(view, group_scale(view, q), q).reshape(wg.shape)
        err = (torch.einsum("ngk,ogk->ogn", xg, wq) - ref).pow(2).mean(dim=2)
        better = err < best
        best = torch.where(better, err, best)
        best_max = torch.where(better[..., None], cap, best_max)
    clipped = torch.maximum(torch.minimum(wg, best_max), -best_max).reshape(w.shape)
    with torch.no_grad():
        layer.weight.copy_(
            (clipped.t() if isinstance(layer, QConv1D) else clipped).to(layer.weight)
        )


@torch.no_grad()
def awq(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Forward | None = None,
    grid: int = 20,
    clip: bool = True,
) -> dict[str, Any]:
    """AWQ of a prepared ``model``'s linear layers, in place (module docstring).

    Returns:
        ``{"scaled": {norm: [layers]}, "alpha": {norm: α}, "clipped": [layers]}``.
    """
    batches = list(batches)
    layers = linear_layers(model)
    inputs, reads = _collect(model, layers, batches, forward)
    modules = dict(model.named_modules())
    groups: dict[str, list[str]] = {}
    for name, norm in reads.items():
        if norm is not None and name in inputs:
            groups.setdefault(norm, []).append(name)
    report: dict[str, Any] = {"scaled": {}, "alpha": {}, "clipped": []}
    reference = _outputs(model, layers, batches[0], forward)
    for norm_name, names in groups.items():
        group = [layers[n] for n in names]
        x = inputs[names[0]]
        mean = x.abs().mean(dim=0)
        best, best_s, best_alpha = float("inf"), None, 0.0
        for i in range(grid):
            alpha = i / grid
            s = mean.pow(alpha).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()
            err = _scaled_error(x, group, s)
            if err < best:
                best, best_s, best_alpha = err, s, alpha
        _fold(modules[norm_name], group, best_s)
        after = _outputs(model, layers, batches[0], forward)
        if not torch.allclose(after, reference, rtol=1e-3, atol=1e-3):
            _fold(modules[norm_name], group, 1.0 / best_s)  # not foldable: undo
            continue
        for n in names:  # the inputs these layers will see from now on
            inputs[n] = inputs[n] / best_s[None, :]
        report["scaled"][norm_name] = names
        report["alpha"][norm_name] = best_alpha
    if clip:
        for name, layer in layers.items():
            if name in inputs:
                _clip(layer, inputs[name])
                report["clipped"].append(name)
    rtn(model)
    return report
