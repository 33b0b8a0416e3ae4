"""Put biases on the int32 grid: train on it (:func:`link_bias_quantizers`), round onto it
(:func:`snap_bias`).

Both need each integer layer's *input* quantizer, which belongs to whichever layer produced the
tensor; :func:`qat.quant.grids.trace_grids` finds it on one example batch, the way the exporters
do.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import torch
from torch import nn

from qat.quant.bias import int32_bias, link_input_quantizer, linked_input_quantizer
from qat.quant.control import is_prepared
from qat.quant.fold import bn_fold_factor, fold_bn_bias
from qat.quant.grids import ActGrid, trace_grids
from qat.quant.layers import WEIGHTED_MODULES, QAct, QAdd, QConvBn2d, QMatMul

# Mean bias move, in output steps, above which snap_bias warns. Measured on MobileNetV2
# (Fashion-MNIST): at W4A4 every layer stays at or below 0.03; at W2A2 the depthwise convs
# reach 0.19 (s_in·s_w up to twice the output step) and snapping cost 33 pt of validation
# accuracy (60.1% → 26.8%); with its depthwise weights at 4 bits the moves fell to ≤ 0.03
# (one pointwise layer at 0.14) and snapping still cost 12 pt (66.5% → 54.6%).
COARSE_BIAS_SHIFT = 0.1


def _consistent_grids(
    model: nn.Module, calls: dict, kinds: tuple[type[nn.Module], ...], arity: int
) -> dict[str, tuple[ActGrid, ...]]:
    """The input grids of every layer of ``kinds`` that reads ``arity`` tensors, each on a grid,
    the same grids in every call (what an integer kernel with fixed input scales can run)."""
    found = {}
    for name, entries in calls.items():
        if not isinstance(model.get_submodule(name), kinds):
            continue
        grids = {entry[0] for entry in entries}
        if len(grids) == 1:
            (only,) = grids
            if len(only) == arity and all(g is not None for g in only):
                found[name] = only
    return found


def input_grids(model: nn.Module, example_input: Any) -> dict[str, ActGrid]:
    """The input grid of every conv / linear layer that reads one grid in every call.

    Layers reading a float tensor, several tensors, or different grids in different calls are
    left out: no integer kernel can run them with one input scale.
    """
    calls, _, _, _ = trace_grids(model, example_input)
    return {n: g[0] for n, g in _consistent_grids(model, calls, WEIGHTED_MODULES, 1).items()}


def link_bias_quantizers(model: nn.Module, example_input: Any) -> list[str]:
    """Link every quantized conv / linear with a bias to the quantizer of its input.

    A linked layer of a model prepared with the recipe's ``quantize_bias`` trains with its
    bias on the int32 grid (:func:`qat.quant.bias.grid_bias`). Run it whenever the set of
    enabled activation quantizers may have changed (:class:`qat.lit.QATCallback` does at the
    first batch of each quantized epoch): a layer whose input is on no grid (input quantization
    off or not calibrated yet, or a float producer) is unlinked, and keeps a float bias.

    Args:
        model: a prepared model.
        example_input: one batch as the model takes it (runs once in eval mode).

    Returns:
        The names of the linked layers.
    """
    grids = input_grids(model, example_input)
    linked = []
    for name, mod in model.named_modules():
        if not isinstance(mod, WEIGHTED_MODULES):
            continue
        grid = grids.get(name)
        has_bias = isinstance(mod, QConvBn2d) or mod.bias is not None
        quant = model.get_submodule(grid.source) if grid is not None and has_bias else None
        link_input_quantizer(mod, quant)
        if quant is not None:
            linked.append(name)
    return linked


@torch.no_grad()
def snap_bias(model: nn.Module, example_input: Any) -> list[str]:
    """Round every integer layer's bias to the int32 grid ``s_in · s_w``, in place.

    Integer runtimes add the bias as int32 at scale ``s_in · s_w`` (ONNX ``QLinearConv`` /
    ``QGemm`` must), while the fake-quant forward adds the float bias: an output within
    ``s_in·s_w/2`` of a rounding boundary then lands one level apart (~0.05% of conv outputs
    at W8A8, ~1.5% at W4A4), and in deep low-bit nets these flips add up (ResNet-20 W4A4 on
    digits: 75% top-1 agreement of ONNX Runtime with the fake-quant model). Snapping the
    float bias onto that grid makes the fake-quant model compute what the runtimes compute,
    so parity is by construction again; each bias moves by at most ``s_in·s_w/2``. At very
    low bit widths ``s_in·s_w`` can exceed the output step (depthwise convs at W2A2): the move
    then costs accuracy the runtimes cannot avoid, and a warning names the layers, unless the
    model was trained with its bias on that grid (the recipe's ``quantize_bias``,
    :func:`link_bias_quantizers`), when the snap changes nothing the training did not
    already see.

    Call it on the final model (ranges frozen), before the test evaluation and the export;
    the scales must not change afterwards (re-snap if they do). For conv+BN the BN shift β is
    adjusted so that the folded bias lands on the grid (to within one float32 ulp).

    It also pins each integer layer's input scale (``runtime_input_scale``, both input scales
    of a :class:`~qat.quant.layers.QMatMul`, both input grids of a
    :class:`~qat.quant.layers.QAdd`, the input grid of a :class:`~qat.quant.layers.QAct`; not
    saved in the state dict), so that evaluation under
    :func:`qat.runtime_numerics` (the test metrics and the parity check) requantizes the
    layer's int32 sums with the runtimes' float32 multiplier ``s_in · s_w / s_out`` instead of
    quantizing the float sum, and adds (and pools) as the runtimes' kernels do. It records the
    snapped bias (``runtime_bias``): while a layer's bias is still that one, runtime numerics
    add its int32 level exactly, as ONNX Runtime does; a bias changed since is added as it is,
    so the parity check shows what its rounding costs.

    Layers whose input is on no grid (a float producer) or on different grids in different
    calls cannot run on the integer kernels; they are left as they are (the exporters name
    them).

    Args:
        model: a prepared, calibrated / trained fake-quant model.
        example_input: one batch (finds each layer's input scale).

    Returns:
        The names of the layers whose bias was snapped.
    """
    if not is_prepared(model):
        raise ValueError(
            "snap_bias needs a prepared (fake-quant) model: call qat.prepare(model, recipe), "
            "calibrate or train it, then snap"
        )
    calls, _, _, _ = trace_grids(model, example_input)
    grids = {n: g[0] for n, g in _consistent_grids(model, calls, WEIGHTED_MODULES, 1).items()}
    for name, (ga, gb) in _consistent_grids(model, calls, (QMatMul,), 2).items():
        # No bias, but the same pinning: runtime numerics requantize its integer sums.
        model.get_submodule(name).runtime_input_scales = (float(ga.scale), float(gb.scale))
    for name, (ga, gb) in _consistent_grids(model, calls, (QAdd,), 2).items():
        # Runtime numerics add on the stored levels, as QLinearAdd does.
        model.get_submodule(name).runtime_input_grids = (
            (float(ga.scale), ga.zero_point),
            (float(gb.scale), gb.zero_point),
        )
    for name, (grid,) in _consistent_grids(model, calls, (QAct,), 1).items():
        # Runtime numerics pool on the stored levels, as QLinearGlobalAveragePool does.
        model.get_submodule(name).runtime_input_grids = ((float(grid.scale), grid.zero_point),)
    # Trained with the bias on this grid: the moves were part of training and of its
    # validation, so there is nothing to warn about.
    on_grid = bool((getattr(model, "qat_recipe", None) or {}).get("quantize_bias", False))
    snapped = []
    coarse: list[tuple[float, float, str]] = []  # (mean, max shift in output steps, layer)
    # A bias several call sites share (CoaT's convs called on differently quantized tensors)
    # can sit on one int32 grid only: it stays where it is, and each site's runtime numerics
    # round it to its own grid, as the exporter writes it for that site.
    sharers = Counter(
        id(b)
        for b in (getattr(model.get_submodule(n), "bias", None) for n in grids)
        if isinstance(b, torch.Tensor)
    )
    for name, grid in grids.items():
        mod = model.get_submodule(name)
        wq = mod.weight_quant
        if not wq.enabled:
            continue  # float weights: a float island, which adds its float bias
        # Pins the input grid, so that runtime numerics requantize this layer's int32 sums as
        # the runtimes do.
        mod.runtime_input_scale = float(grid.scale)
        bias = fold_bn_bias(mod.bias, mod.bn) if isinstance(mod, QConvBn2d) else mod.bias
        if bias is None:
            continue
        bias = bias.detach().float()
        levels, scale = int32_bias(bias, grid.scale, wq.qparams()[0].float(), name)
        target = (levels.double() * scale.double()).float()
        out_q = mod.output_quant
        linked = linked_input_quantizer(mod) is not None
        if not (on_grid or linked) and out_q.enabled:
            shift = (target - bias).abs() / float(out_q.qparams()[0].reshape(-1)[0])
            mean = float(shift.mean())
            if mean > COARSE_BIAS_SHIFT:
                coarse.append((mean, float(shift.max()), name))
        if isinstance(mod, QConvBn2d):
            # folded bias = β + (b_conv − μ)·f  (qat.quant.fold.fold_bn_params) → solve for β.
            bn = mod.bn
            f = bn_fold_factor(bn)
            conv_b = mod.bias if mod.bias is not None else torch.zeros_like(f)
            bn.bias.copy_(target.to(f) - (conv_b - bn.running_mean) * f)
            # What the folded forward computes from it: on the grid to within one ulp.
            mod.runtime_bias = fold_bn_bias(mod.bias, bn).detach().clone()
        elif sharers[id(mod.bias)] > 1:
            mod.runtime_bias = mod.bias.detach().clone()
            continue
        else:
            mod.bias.copy_(target.to(mod.bias))
            mod.runtime_bias = mod.bias.detach().clone()
        snapped.append(name)
    if coarse:
        _warn_coarse(coarse)
    return snapped


def _warn_coarse(coarse: list[tuple[float, float, str]]) -> None:
    worst = sorted(coarse, reverse=True)
    listed = ", ".join(f"{n} (mean {a:.2f}, max {b:.2f})" for a, b, n in worst[:4])
    warnings.warn(
        f"snap_bias: in {len(coarse)} layer(s) the int32 bias grid s_in·s_w is coarse next "
        f"to the output step, so snapping moved their outputs by more than "
        f"{COARSE_BIAS_SHIFT} of an output step on average: {listed}"
        f"{', ...' if len(coarse) > 4 else ''}. The integer runtimes can only add such a "
        "bias, so the tested and exported accuracy will be below the validation accuracy "
        "measured before snapping. Train with the bias on this grid (the recipe's "
        "quantize_bias: true, e.g. quant.quantize_bias=true), or give these layers more "
        "weight bits (a recipe override, e.g. {pattern: <layer>, weight: {bits: 4}}); at "
        "2-bit activations even small moves cost accuracy",
        stacklevel=3,
    )
