"""From a trained fake-quant model to an integer description of every quantized layer.

:func:`convert` reads, for each quantized layer, the numbers the integer runtimes need: integer
weights (``clamp(round(W · (1/s_w)), qmin, qmax)`` as int8, after the exact BN fold of
:meth:`qat.QConvBn2d.folded_params`), the int32 bias at scale ``s_in · s_w``, and the
activation grids (scale, zero point, integer range) of the layer's inputs and output, all taken
from the trained quantizers' own :meth:`~qat.FakeQuantizer.qparams`. Nothing is re-derived, so
the exporters implement exactly the model that was trained.

Each layer's input grid comes from :func:`qat.quant.grids.trace_grids` (one example batch with
hooks; see there). An integer layer (conv / linear / add / concat) whose input is on no known
grid is refused with an error naming the layer: its input was computed in float (say an inline
``a + b`` instead of ``qat.ops.Add``), so no integer runtime could reproduce it.

Bias: ONNX Runtime's ``QLinearConv`` / ``QGemm`` add the bias as int32 at scale ``s_in · s_w``;
the fake-quant forward adds the float bias. :func:`qat.snap_bias` rounds the model's float bias
onto that grid (moving it by at most ``s_in·s_w/2``), so that the fake-quant model computes
what the integer runtimes compute; call it on the final model before testing and exporting.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from qat.export.ir import ConvertedModel, LayerDesc, WeightDesc
from qat.quant.bias import int32_bias
from qat.quant.control import is_prepared, iter_quantizers, uninitialized_quantizers
from qat.quant.grids import ActGrid, act_grid, trace_grids
from qat.quant.layers import QAct, QAdd, QCat, QConv2d, QConvBn2d, QLinear, QMatMul
from qat.quant.quantizer import FakeQuantizer

__all__ = ["check_exportable", "convert", "explicit_padding", "weight_desc"]


def check_exportable(model: nn.Module) -> None:
    """Raise ``ValueError`` unless ``model`` is a prepared model every exporter can read.

    Refused: an unprepared model; quantizers that never saw data (their range is a
    placeholder); quantizers with fake quantization switched off (the trained graph is not the
    integer graph); per-channel activation quantizers (the integer kernels take one scale per
    activation tensor); asymmetric weights.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"export needs an nn.Module, got {type(model).__name__}")
    if not is_prepared(model):
        raise ValueError(
            "export needs a prepared (fake-quant) model: call qat.prepare(model, recipe), "
            "calibrate or train it, then export"
        )
    missing = uninitialized_quantizers(model)
    if missing:
        raise ValueError(
            f"{len(missing)} quantizer(s) never saw data, so their ranges are placeholders: "
            + ", ".join(missing)
            + ". Calibrate (qat.calibrate) or train on batches that reach these layers"
        )
    off = [n for n, q in iter_quantizers(model) if q.enabled and not bool(q.fake_quant_enabled)]
    if off:
        raise ValueError(
            "fake quantization is switched off for: "
            + ", ".join(off)
            + ". The exported integer model would not be the model you evaluated; switch it "
            "on (qat.set_fake_quant(model, True)) before exporting"
        )
    llm = [
        n
        for n, q in iter_quantizers(model)
        if q.enabled and (q.spec.dynamic != "none" or q.spec.group_size or q.spec.grid != "affine")
    ]
    if llm:
        raise ValueError(
            f"{len(llm)} quantizer(s) use per-group, dynamic or GGUF grids ({', '.join(llm[:3])}"
            "), which these integer exporters do not run: export language models with "
            "qat.export.export_lm (targets gguf, onnx)"
        )
    per_channel = [
        n for n, q in iter_quantizers(model, "activation") if q.enabled and q.per_channel
    ]
    if per_channel:
        raise ValueError(
            "per-channel activation quantizers cannot be exported (the integer kernels take "
            "one scale per activation tensor): " + ", ".join(per_channel)
        )
    for name, q in iter_quantizers(model, "weight"):
        if q.enabled:
            _, zp = q.qparams()
            if bool((zp != 0).any()):
                raise ValueError(
                    f"weight quantizer {name} has a non-zero zero point; the integer kernels "
                    "need symmetric weights (weight.symmetric=true)"
                )
    wide = [n for n, q in iter_quantizers(model, "weight") if q.enabled and q.quant_range[1] > 64]
    if wide:
        warnings.warn(
            f"{len(wide)} layer(s) have full-range 8-bit weights ({', '.join(wide[:4])}"
            f"{', ...' if len(wide) > 4 else ''}): on x86 CPUs without VNNI the u8×s8 kernels "
            "add pairs of products in int16 and can saturate, so the integer model may disagree "
            "with the trained one there. Train with weight.reduce_range=true (the default) for "
            "exact agreement on every x86 CPU",
            stacklevel=2,
        )


def weight_desc(quant: FakeQuantizer, weight: torch.Tensor) -> WeightDesc:
    """Integer weights exactly as ``quant`` fake-quantizes ``weight``."""
    scale, _ = quant.qparams()
    scale = scale.float()
    qmin, qmax = quant.quant_range
    axis = quant.axis if quant.per_channel else None
    w = weight.detach().float()
    if axis is None:
        s = scale.reshape(())
    else:
        shape = [1] * w.dim()
        shape[axis] = -1
        s = scale.reshape(shape)
    # The same ops as qat.fake_quant: multiply by the float32 reciprocal, round half to even.
    levels = torch.mul(w, 1.0 / s).round_().clamp_(qmin, qmax)
    float_weight = levels * s
    return WeightDesc(
        int_weight=levels.to(torch.int8),
        scale=scale.reshape(-1).clone(),
        axis=quant.axis if quant.per_channel else 0,
        per_channel=quant.per_channel,
        bits=quant.bits,
        qmin=qmin,
        qmax=qmax,
        float_weight=float_weight,
    )


def _conv_attrs(conv: nn.Conv2d) -> dict[str, Any]:
    return {
        "kernel_size": tuple(conv.kernel_size),
        "stride": tuple(conv.stride),
        "padding": conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
        "dilation": tuple(conv.dilation),
        "groups": conv.groups,
        "padding_mode": conv.padding_mode,
    }


def explicit_padding(desc: LayerDesc) -> tuple[int, int, int, int] | None:
    """``(top, left, bottom, right)`` zero padding of a conv, or None if it is not zero padding.

    ``padding="same"`` puts the odd pixel at the bottom / right, as ``F.conv2d`` does.
    """
    assert desc.conv is not None
    if desc.conv["padding_mode"] != "zeros":
        return None
    pad = desc.conv["padding"]
    if pad == "valid":
        return (0, 0, 0, 0)
    if pad == "same":
        k, d = desc.conv["kernel_size"], desc.conv["dilation"]
        total = [d[i] * (k[i] - 1) for i in range(2)]
        return (total[0] // 2, total[1] // 2, total[0] - total[0] // 2, total[1] - total[1] // 2)
    return (pad[0], pad[1], pad[0], pad[1])


def _describe(
    name: str,
    mod: nn.Module,
    grids: tuple[ActGrid | None, ...],
    shapes: tuple[tuple[int, ...], ...],
) -> LayerDesc:
    out_q: FakeQuantizer = mod.output_quant
    output = act_grid(f"{name}.output_quant", out_q) if out_q.enabled else None
    relu = bool(getattr(mod, "relu", False))
    base = {"name": name, "inputs": grids, "output": output, "relu": relu, "input_shapes": shapes}

    if isinstance(mod, QConv2d | QConvBn2d | QLinear):
        kind = "linear" if isinstance(mod, QLinear) else "conv"
        if isinstance(mod, QConvBn2d):
            w, b = mod.folded_params()
        else:
            w, b = mod.weight, mod.bias
            if isinstance(mod, QConv2d):
                w = mod.effective_weight()  # a weight its model computes (QComputedConv2d)
        # Plain tensors (not Parameters), detached from the model: the exporters trace with them.
        w = w.detach().float().clone()
        b = None if b is None else b.detach().float().clone()
        wq: FakeQuantizer = mod.weight_quant
        desc = LayerDesc(kind=kind, module=mod, float_bias=b, **base)
        if kind == "conv":
            desc.conv = _conv_attrs(mod)
        if not wq.enabled:
            desc.float_weight = w  # a float island: weights stay float in the fake model too
            return desc
        wd = weight_desc(wq, w)
        # The fake-quant forward ran weight_quant(w): the exported levels must be exactly those.
        if not torch.equal(wd.float_weight, wq(w)):
            raise RuntimeError(
                f"{name}: integer weights do not reproduce the fake-quantized weight; "
                "the quantizer's numerics and qat.export.convert disagree"
            )
        desc.weight, desc.float_weight = wd, wd.float_weight
        if len(grids) != 1 or grids[0] is None:
            raise ValueError(
                f"layer {name} ({type(mod).__name__}) reads a tensor that is on no quantization "
                "grid, so it cannot run on integer kernels. Its input was computed in float: "
                "quantize the producing op (residual adds via qat.ops.Add, concats via "
                "qat.ops.Cat, the model input via the recipe's quantize_input) or skip this "
                "layer with an override"
            )
        desc.integer = True
        if b is not None:
            desc.bias_int, desc.bias_scale = int32_bias(b, grids[0].scale, wd.scale, name)
        return desc

    if isinstance(mod, QAdd | QCat | QMatMul):
        kind = {QAdd: "add", QCat: "cat", QMatMul: "matmul"}[type(mod)]
        bad = [i for i, g in enumerate(grids) if g is None]
        if bad or not grids:
            raise ValueError(
                f"layer {name} ({type(mod).__name__}): input(s) {bad} are on no quantization "
                "grid, so the integer runtimes cannot compute it. Quantize the ops producing "
                "them (qat.ops.Add / qat.ops.Cat / a quantized layer)"
            )
        if output is None:
            raise ValueError(
                f"layer {name}: a float (16/32-bit) output after an integer {kind} is not "
                "supported; give its output quantizer 2–8 bits"
            )
        desc = LayerDesc(kind=kind, module=mod, **base)
        if kind == "cat":
            desc.dim = mod.dim
        return desc

    # QAct / FloatLayer: float islands.
    return LayerDesc(kind="act" if isinstance(mod, QAct) else "float", module=mod, **base)


@torch.no_grad()
def convert(model: nn.Module, example_input: Any) -> ConvertedModel:
    """Describe every quantized layer of ``model`` in integer terms.

    Args:
        model: a prepared, calibrated / trained fake-quant model (any mode; it runs in eval
            mode here and each module's mode is restored afterwards).
        example_input: one batch as the model takes it (a tensor, a tuple of positional
            arguments or a dict of keyword arguments).

    Returns:
        A :class:`ConvertedModel` with one :class:`LayerDesc` per quantized layer the example
        batch reached.

    Raises:
        ValueError: the model is not exportable (see :func:`check_exportable`), an integer
            layer reads a tensor on no known grid, or a layer called several times sees
            different input grids.
    """
    check_exportable(model)
    calls, input_grid, output_grid, out = trace_grids(model, example_input)
    modules = dict(model.named_modules())
    layers: dict[str, LayerDesc] = {}
    for name, entries in calls.items():
        grids, shapes = entries[0]
        for other, _ in entries[1:]:
            if other != grids:
                raise ValueError(
                    f"layer {name} is called several times on different input grids "
                    f"({grids} vs {other}); the integer layer has one input scale. "
                    "Use a separate module per call"
                )
        layers[name] = _describe(name, modules[name], grids, shapes)
    return ConvertedModel(layers=layers, input=input_grid, output=output_grid, example_output=out)
