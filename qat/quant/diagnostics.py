"""Diagnostics of a fake-quant model: where NaN / inf first appears, and per-layer statistics.

:func:`locate_non_finite` names the input, parameter, quantizer or first layer where a
non-finite value starts (for the error a diverged training step raises);
:func:`quantization_stats` measures each quantizer's SQNR, clipping rate and scale on one batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from qat.quant.blocks import fp16_scale, gguf_codes, group_view, ungroup
from qat.quant.control import iter_quantizers
from qat.quant.dynamic import dynamic_quantize
from qat.quant.quantizer import GGUF_RANGES, FakeQuantizer


def _non_finite(t: Any) -> bool:
    return (
        isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
    )


@torch.no_grad()
def locate_non_finite(model: nn.Module, x: torch.Tensor | None = None) -> str:
    """Where NaN / inf first appears in ``model`` (run on ``x``), as a phrase for an error.

    Checked in order: the input batch; quantizer scales / zero points / clips; the other
    parameters and buffers; then one forward pass in eval mode (no observer moves, nothing is
    trained) with hooks that name the first module whose output is non-finite.
    """
    if _non_finite(x):
        return "the input batch holds NaN or inf"
    for name, q in iter_quantizers(model):
        for key, value in (*q.named_parameters(recurse=False), *q.named_buffers(recurse=False)):
            if _non_finite(value):
                return f"quantizer '{name}' has a non-finite {key}"
    for key, value in (*model.named_parameters(), *model.named_buffers()):
        if _non_finite(value):
            layer, _, attr = key.rpartition(".")
            return f"layer '{layer}' has a non-finite {attr}"
    if x is None:
        return "no parameter or quantizer state is non-finite (no input batch to trace)"
    first: list[str] = []

    def hook(module: nn.Module, args: Any, output: Any, name: str) -> None:
        outs = output if isinstance(output, tuple | list) else (output,)
        if not first and any(_non_finite(o) for o in outs):
            first.append(name)

    handles = [
        m.register_forward_hook(partial(hook, name=name))
        for name, m in model.named_modules()
        if name and not any(True for _ in m.children())
    ]
    was_training = model.training
    model.eval()
    try:
        model(x)
    except Exception as err:  # a diagnosis: report what stopped it rather than mask the NaN
        first_line = (str(err).strip().splitlines() or [""])[0]
        return f"the diagnostic forward pass failed ({type(err).__name__}: {first_line})"
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if first:
        return f"the first non-finite output is layer '{first[0]}'s"
    return "every layer's output is finite in eval mode (the loss itself overflowed)"


def _layer_key(name: str) -> tuple[str, str]:
    """``layer1.0.conv1.0.weight_quant`` → (``layer1.0.conv1.0``, ``weight``)."""
    for suffix, kind in (
        (".weight_quant", "weight"),
        (".output_quant", "act"),
        (".act_quant", "in"),
    ):
        if name.endswith(suffix):
            return name[: -len(suffix)], kind
    if name.endswith("input_quant"):
        return "input", "act"
    return name, "act"


def _stats_hook(
    module: FakeQuantizer,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    name: str,
    out: dict[str, dict[str, float]],
) -> None:
    x = args[0]
    relu = bool(kwargs.get("relu", args[1] if len(args) > 1 else False))
    ref = (torch.relu(x) if relu else x).detach().float()
    scale, zero_point = module.qparams()
    qmin, qmax = module.quant_range
    spec = module.spec
    if spec.dynamic != "none" or spec.group_size:
        deq, clipped = _block_stats(module, ref)
    elif module.per_channel:
        shape = [1] * ref.dim()
        shape[module.axis] = -1
        s, z = scale.reshape(shape), zero_point.float().reshape(shape)
    else:
        s, z = scale.reshape(()), zero_point.float().reshape(())
    if spec.dynamic == "none" and not spec.group_size:
        # Same arithmetic as the fake quantizer (multiply by the reciprocal, round half to even).
        q = torch.round(ref * (1.0 / s)) + z
        clipped = (q < qmin) | (q > qmax)
        deq = (q.clamp(qmin, qmax) - z) * s
    signal = float(ref.pow(2).sum())
    noise = float((ref - deq).pow(2).sum())
    if noise > 0 and signal > 0:
        sqnr = 10.0 * math.log10(signal / noise)
    else:
        sqnr = 0.0 if signal == 0 else 200.0  # exact reconstruction: cap instead of inf
    out[name] = {
        "sqnr_db": min(sqnr, 200.0),
        "clip_rate": float(clipped.float().mean()),
        "scale": float(scale.float().mean()),
        "bits": float(module.bits),
    }


def _block_stats(module: FakeQuantizer, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What a dynamic, per-group or GGUF-grid quantizer makes of ``ref``, and what it clips."""
    spec = module.spec
    if spec.dynamic != "none":
        return dynamic_quantize(ref, spec), torch.zeros(1, dtype=torch.bool)
    view = group_view(ref, spec.group_size, module.group_axis)
    scale, zero_point = module.qparams()
    if spec.grid != "affine":
        codes = gguf_codes(view, scale, spec.grid)
        deq = codes * fp16_scale(scale)[:, None]
        lo, hi = GGUF_RANGES[spec.grid]
        clipped = (view * torch.where(scale == 0, 0.0, 1.0 / scale)[:, None]).abs() > hi + 0.5
        clipped |= codes < lo
    else:
        qmin, qmax = module.quant_range
        s, z = scale[:, None], zero_point.float()[:, None]
        q = torch.round(view * (1.0 / s)) + z
        clipped = (q < qmin) | (q > qmax)
        deq = (q.clamp(qmin, qmax) - z) * s
    return ungroup(deq, ref.shape, module.group_axis), clipped


@torch.no_grad()
def quantization_stats(model: nn.Module, x: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per-quantizer SQNR (dB), clipping rate and mean scale on one input batch.

    Runs ``model`` once in eval mode (observers never update there) with forward pre-hooks on
    every initialized quantizer, and measures what that quantizer does (or would do, when its
    fake quantization is off) to the tensor it receives.
    """
    out: dict[str, dict[str, float]] = {}
    handles = []
    for name, q in iter_quantizers(model):
        if q.enabled and q.is_initialized:
            hook = partial(_stats_hook, name=name, out=out)
            handles.append(q.register_forward_pre_hook(hook, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return out


def flatten_stats(stats: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    flat: dict[str, float] = {}
    for name, values in stats.items():
        layer, kind = _layer_key(name)
        for key in ("sqnr_db", "clip_rate", "scale"):
            flat[f"quant/{layer}/{kind}_{key}"] = values[key]
    return flat
