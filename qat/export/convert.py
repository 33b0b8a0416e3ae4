"""From a trained fake-quant model to an integer description of every quantized layer.

:func:`convert` reads, for each quantized layer, the numbers the integer runtimes need: integer
weights (``clamp(round(W · (1/s_w)), qmin, qmax)`` as int8, after the exact BN fold of
:meth:`qat.modules.QConvBn2d.folded_params`), the int32 bias at scale ``s_in · s_w``, and the
activation grids (scale, zero point, integer range) of the layer's inputs and output, all taken
from the trained quantizers' own :meth:`~qat.quantizers.FakeQuantizer.qparams`. Nothing is
re-derived, so the exporters implement exactly the model that was trained.

Input grids, without tracing
----------------------------
A layer's weights and output grid are its own, but its *input* grid belongs to whichever
quantizer produced the tensor flowing into it, and the model's ``forward`` is arbitrary Python.
So :func:`convert` runs one example batch (eval mode, observers untouched) with forward hooks:

1. every enabled activation quantizer records its output tensor as *produced on its grid*;
2. grid-preserving modules (ReLU, max-pool, flatten, identity, dropout, ...) pass the grid of
   their input on to their output;
3. a view of a recorded tensor (``x.view``, ``torch.flatten``, ``reshape`` written inline in the
   forward) shares its storage, so it is found by storage;
4. anything else (e.g. a functional ``F.relu`` / ``F.max_pool2d`` in the forward) is matched by
   value: the most recently produced grid on which every element of the tensor lies exactly.

Whatever way a grid was found, the tensor's values are checked to lie on it. An integer layer
(conv / linear / add / concat) whose input is on no known grid is refused with an error naming
the layer: its input was computed in float (say an inline ``a + b`` instead of ``qat.ops.Add``),
so no integer runtime could reproduce it.

Activation grids in the unsigned 8-bit container
------------------------------------------------
Both integer runtimes take u8 activations (the fast x86 path). Any per-tensor grid
``[qmin, qmax]`` with zero point ``z`` (signed, unsigned, 2–8 bits) is represented there exactly
by shifting it to ``[0, qmax − qmin]`` with zero point ``z − qmin``: the real values
``(q − z) · s`` are unchanged. A grid narrower than u8 (sub-8-bit) needs an integer clamp to its
upper level after each requantization; :class:`ActGrid` carries that range.

Bias
----
ONNX Runtime's ``QLinearConv`` / ``QGemm`` add the bias as int32 at scale ``s_in · s_w``; the
fake-quant forward adds the float bias. :func:`snap_bias` rounds the model's float bias onto
that int32 grid (moving it by at most ``s_in·s_w/2``), so that the fake-quant model computes
what the integer runtimes compute; call it on the final model before testing and exporting.
A model trained with its bias on that grid (the recipe's ``quantize_bias``, :mod:`qat.bias_quant`)
already computed the snapped bias in training and validation, so the snap changes nothing.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qat.fold import bn_fold_factor
from qat.modules import (
    BIAS_INPUT_QUANT,
    FloatLayer,
    QAct,
    QAdd,
    QCat,
    QConv2d,
    QConvBn2d,
    QLinear,
    bias_levels,
)
from qat.prepare import INPUT_QUANT, is_prepared
from qat.quantizers import FakeQuantizer, iter_quantizers, uninitialized_quantizers

__all__ = [
    "GRID_PRESERVING",
    "ActGrid",
    "ConvertedModel",
    "LayerDesc",
    "WeightDesc",
    "check_exportable",
    "convert",
    "reference_forward",
    "snap_bias",
]

#: Modules whose output lies on the grid of their input (they select or move values only).
GRID_PRESERVING: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.ZeroPad2d,
)

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
# Values on a grid satisfy x·(1/s) + z ∈ ℤ up to float32 error (|q − z| ≤ 255 → ≲ 1e-4).
_ON_GRID_TOL = 1e-2


@dataclass(frozen=True)
class ActGrid:
    """A per-tensor activation grid, expressed in the unsigned 8-bit container.

    Real value of a stored ``q`` is ``(q − zero_point) · scale``. ``qmin``/``qmax`` are the
    container levels the grid may use (``0..255`` at 8 bits, ``0..15`` at 4 bits).

    Attributes:
        scale: the quantizer's float32 scale (as a Python float, exactly representable).
        zero_point: zero point in the container (``z − qmin`` of the original grid).
        qmin: lowest container level (always 0).
        qmax: highest container level (``2^bits − 1``).
        bits: bit width of the original grid.
        signed: whether the original grid was signed (shifted by ``2^(bits−1)`` here).
        source: name of the quantizer that defines the grid.
    """

    scale: float
    zero_point: int
    qmin: int
    qmax: int
    bits: int
    signed: bool
    source: str

    @property
    def full_range(self) -> bool:
        """True when the grid fills u8, so saturation alone is its clamp."""
        return self.qmin == 0 and self.qmax == 255

    def clamp_levels(self, relu: bool = False) -> tuple[int, int]:
        """Container levels ``(lo, hi)`` an output on this grid is clamped to.

        ``relu(y)`` quantized equals ``max(quantize(y), zero_point)`` (rounding is monotone and
        maps 0 to 0), so a fused ReLU is an integer clamp at the zero point.
        """
        lo = max(self.qmin, self.zero_point) if relu else self.qmin
        return lo, self.qmax

    def needs_clamp(self, relu: bool = False) -> bool:
        """True when ``clamp_levels`` is narrower than what u8 saturation already gives."""
        return self.clamp_levels(relu) != (0, 255)

    def real_range(self, relu: bool = False) -> tuple[float, float]:
        """``clamp_levels`` as real values (for runtimes that clamp quantized tensors by value)."""
        lo, hi = self.clamp_levels(relu)
        return (lo - self.zero_point) * self.scale, (hi - self.zero_point) * self.scale

    def quantize(self, x: torch.Tensor, relu: bool = False) -> torch.Tensor:
        """Reference quantization to container levels (uint8), as the fake quantizer rounds."""
        inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(self.scale, dtype=torch.float32)
        lo, hi = self.clamp_levels(relu)
        q = torch.round(x.float() * inv) + self.zero_point
        return q.clamp_(lo, hi).to(torch.uint8)

    def contains(self, x: torch.Tensor) -> bool:
        """True when every element of ``x`` lies exactly on this grid."""
        if not x.is_floating_point() or x.numel() == 0:
            return False
        v = x.detach().float() * (1.0 / self.scale) + self.zero_point
        if not bool(torch.isfinite(v).all()):
            return False
        r = torch.round(v)
        if float((v - r).abs().max()) > _ON_GRID_TOL:
            return False
        return self.qmin <= float(r.min()) and float(r.max()) <= self.qmax


@dataclass
class WeightDesc:
    """Integer weights of one layer.

    Attributes:
        int_weight: int8 tensor holding the levels (a 4-bit grid lives in ``[-8, 7]``).
        scale: float32 scales, ``(C,)`` per channel or ``(1,)`` per tensor.
        axis: channel axis of ``int_weight`` the scales run along.
        per_channel: one scale per output channel.
        bits: bit width of the weight grid.
        qmin, qmax: the weight grid.
        float_weight: ``int_weight · scale``: bitwise the fake-quantized weight.
    """

    int_weight: torch.Tensor
    scale: torch.Tensor
    axis: int
    per_channel: bool
    bits: int
    qmin: int
    qmax: int
    float_weight: torch.Tensor


@dataclass
class LayerDesc:
    """One quantized layer as the integer runtimes run it.

    ``kind`` is ``conv`` / ``linear`` (integer when :attr:`integer`), ``add`` / ``cat``
    (integer), or ``act`` / ``float`` (float islands: dequantize → float op → quantize).

    Attributes:
        name: qualified module name in the model.
        kind: see above.
        inputs: grid of each tensor input (None: a float input, allowed for float islands).
        output: output grid, or None when the output quantizer is disabled (float output).
        relu: the layer applies ReLU before its output quantization.
        integer: conv / linear run on the integer kernels (quantized weight and input).
        weight: integer weights (conv / linear with an enabled weight quantizer).
        float_weight: the weight the fake-quant forward uses (folded, fake-quantized if
            quantized): what a float island computes with.
        float_bias: the float bias of the fake-quant forward (folded for conv+BN).
        bias_int: int32 bias at scale ``bias_scale`` (integer conv / linear with a bias).
        bias_scale: float32 ``s_in · s_w`` per output channel.
        conv: ``stride``, ``padding``, ``dilation``, ``groups``, ``padding_mode``,
            ``kernel_size`` of a conv.
        dim: concat dimension.
        input_shapes: shapes seen in the example run.
        module: the fake-quant module (for float islands).
    """

    name: str
    kind: str
    inputs: tuple[ActGrid | None, ...]
    output: ActGrid | None
    relu: bool = False
    integer: bool = False
    weight: WeightDesc | None = None
    float_weight: torch.Tensor | None = None
    float_bias: torch.Tensor | None = None
    bias_int: torch.Tensor | None = None
    bias_scale: torch.Tensor | None = None
    conv: dict[str, Any] | None = None
    dim: int = 1
    input_shapes: tuple[tuple[int, ...], ...] = ()
    module: nn.Module | None = field(default=None, repr=False)

    @property
    def dequantized_bias(self) -> torch.Tensor | None:
        """``bias_int · bias_scale`` in float32 (the bias the integer kernels add)."""
        if self.bias_int is None or self.bias_scale is None:
            return self.float_bias
        return (self.bias_int.double() * self.bias_scale.double()).float()


@dataclass
class ConvertedModel:
    """The integer description of a whole model.

    Attributes:
        layers: name → description, in the order of the example run.
        input: grid of the model input (None: no input quantizer).
        output: grid of the model output (None: the output is float, e.g. 32-bit logits).
        example_output: the fake-quant model's output on the example input.
    """

    layers: dict[str, LayerDesc]
    input: ActGrid | None
    output: ActGrid | None
    example_output: Any = None

    def integer_layers(self) -> list[LayerDesc]:
        return [d for d in self.layers.values() if d.integer or d.kind in ("add", "cat")]

    def float_islands(self) -> list[LayerDesc]:
        return [d for d in self.layers.values() if not (d.integer or d.kind in ("add", "cat"))]


# ---------------------------------------------------------------------------- validation
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


# ---------------------------------------------------------------------------- grids
def act_grid(name: str, quant: FakeQuantizer) -> ActGrid:
    """The container grid of an enabled per-tensor activation quantizer."""
    scale, zp = quant.qparams()
    qmin, qmax = quant.quant_range
    if qmax - qmin > 255:  # pragma: no cover - bits ≤ 8 guarantees this
        raise ValueError(f"quantizer {name}: grid [{qmin}, {qmax}] does not fit 8 bits")
    return ActGrid(
        scale=float(scale.float().reshape(-1)[0]),
        zero_point=int(zp.reshape(-1)[0]) - qmin,
        qmin=0,
        qmax=qmax - qmin,
        bits=quant.bits,
        signed=quant.signed,
        source=name,
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


def _int_bias(
    bias: torch.Tensor, s_in: float, w_scale: torch.Tensor, layer: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 bias and its float32 scale ``s_in · s_w`` (the scale the runtimes multiply by)."""
    q, bias_scale = bias_levels(bias, s_in, w_scale)
    if bool((q < _INT32_MIN).any() or (q > _INT32_MAX).any()):
        warnings.warn(
            f"{layer}: the bias does not fit int32 at scale s_in·s_w and was clamped; "
            "the exported layer will differ from the fake-quant one",
            stacklevel=3,
        )
    return q.clamp_(_INT32_MIN, _INT32_MAX).to(torch.int32), bias_scale


class _GridTracker:
    """Which grid each tensor of one forward pass lies on (see the module docstring)."""

    def __init__(self) -> None:
        self.by_id: dict[int, tuple[torch.Tensor, ActGrid]] = {}
        self.by_storage: dict[int, ActGrid] = {}
        self.recent: list[ActGrid] = []

    def record(self, t: Any, grid: ActGrid) -> None:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return
        # Keeping the tensor alive keeps its id and storage from being reused in this pass.
        self.by_id[id(t)] = (t, grid)
        self.by_storage[t.untyped_storage().data_ptr()] = grid
        if not self.recent or self.recent[-1] != grid:
            self.recent.append(grid)

    def lookup(self, t: Any) -> ActGrid | None:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return None
        hit = self.by_id.get(id(t))
        grid = hit[1] if hit is not None and hit[0] is t else None
        if grid is None:
            grid = self.by_storage.get(t.untyped_storage().data_ptr())
        if grid is not None:
            return grid if grid.contains(t) else None
        seen: set[ActGrid] = set()
        for cand in reversed(self.recent):
            if cand in seen:
                continue
            seen.add(cand)
            if cand.contains(t):
                return cand
        return None


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, list | tuple):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the example run (no observer moves a range); restores each module's flag."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def run_model(model: nn.Module, example_input: Any) -> Any:
    """``model(*example_input)`` for a tuple, ``model(**example_input)`` for a dict."""
    if isinstance(example_input, tuple):
        return model(*example_input)
    if isinstance(example_input, dict):
        return model(**example_input)
    return model(example_input)


QUANT_LAYER_TYPES = (QConv2d, QConvBn2d, QLinear, QAdd, QCat, QAct, FloatLayer)


@torch.no_grad()
def trace_grids(
    model: nn.Module, example_input: Any
) -> tuple[
    dict[str, list[tuple[tuple[ActGrid | None, ...], tuple[tuple[int, ...], ...]]]],
    ActGrid | None,
    ActGrid | None,
    Any,
]:
    """Run ``model`` once and record the input grids of every quantized layer.

    Returns:
        ``(calls, input_grid, output_grid, output)``: for every quantized layer called, one
        ``(input grids, input shapes)`` entry per call, in call order (dict order); the grid of
        the model input and of its output; the model output.
    """
    tracker = _GridTracker()
    calls: dict[str, list[tuple[tuple[ActGrid | None, ...], tuple[tuple[int, ...], ...]]]] = {}
    handles = []

    input_calls = [0]

    def quant_hook(name: str) -> Callable:
        def hook(mod: FakeQuantizer, args: tuple, out: Any) -> None:
            if name == INPUT_QUANT:
                input_calls[0] += 1
            if mod.enabled and bool(mod.fake_quant_enabled) and mod.is_initialized:
                tracker.record(out, act_grid(name, mod))

        return hook

    def passthrough_hook(mod: nn.Module, args: tuple, out: Any) -> None:
        grid = tracker.lookup(args[0]) if args else None
        if grid is not None and isinstance(out, torch.Tensor) and grid.contains(out):
            tracker.record(out, grid)

    def layer_pre_hook(name: str) -> Callable:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            tensors = _tensors(args) + _tensors(kwargs)
            grids = tuple(tracker.lookup(t) for t in tensors)
            shapes = tuple(tuple(t.shape) for t in tensors)
            calls.setdefault(name, []).append((grids, shapes))

        return hook

    input_grid: list[ActGrid | None] = [None]
    for name, mod in model.named_modules():
        if isinstance(mod, FakeQuantizer) and mod.role == "activation":
            handles.append(mod.register_forward_hook(quant_hook(name)))
            if name == INPUT_QUANT and mod.enabled:
                input_grid[0] = act_grid(name, mod)
        elif type(mod) in GRID_PRESERVING:
            handles.append(mod.register_forward_hook(passthrough_hook))
        elif isinstance(mod, QUANT_LAYER_TYPES):
            handles.append(mod.register_forward_pre_hook(layer_pre_hook(name), with_kwargs=True))
    try:
        with _eval_mode(model):
            out = run_model(model, example_input)
        outs = _tensors(out)
        output_grid = tracker.lookup(outs[0]) if outs else None
    finally:
        for h in handles:
            h.remove()
    if input_calls[0] > 1:
        raise ValueError(
            f"the model calls its input quantizer '{INPUT_QUANT}' {input_calls[0]} times: on an "
            "nn.Sequential root, prepare() registers it as the last child, so it also "
            "re-quantizes the model output with the input's grid. Wrap the Sequential in a "
            "module with its own forward before qat.prepare"
        )
    return calls, input_grid[0], output_grid, out


# ---------------------------------------------------------------------------- convert
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
            desc.bias_int, desc.bias_scale = _int_bias(b, grids[0].scale, wd.scale, name)
        return desc

    if isinstance(mod, QAdd | QCat):
        kind = "add" if isinstance(mod, QAdd) else "cat"
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


def float_forward(desc: LayerDesc, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The float computation of a layer before its output quantizer (float islands).

    For conv / linear it uses :attr:`LayerDesc.float_weight` (the fake-quantized or float
    weight) and the float bias, exactly as the fake-quant forward does; ``relu`` is applied.
    """
    mod = desc.module
    assert mod is not None
    if desc.kind == "conv":
        y = nn.Conv2d._conv_forward(mod, args[0], desc.float_weight, desc.float_bias)  # type: ignore[arg-type]
    elif desc.kind == "linear":
        y = F.linear(args[0], desc.float_weight, desc.float_bias)
    elif desc.kind == "act":
        y = mod.act(*args)
    elif desc.kind == "float":
        y = mod.module(*args, **kwargs)
    else:  # pragma: no cover - add / cat are integer ops
        raise ValueError(f"{desc.name}: no float forward for kind {desc.kind}")
    return torch.relu(y) if desc.relu else y


def grid_summary(converted: ConvertedModel) -> list[dict[str, Any]]:
    """One row per layer: kind, integer or float island, input / output scales and bits."""
    rows = []
    for d in converted.layers.values():
        rows.append(
            {
                "name": d.name,
                "kind": d.kind,
                "integer": d.integer or d.kind in ("add", "cat"),
                "inputs": [
                    None if g is None else (g.scale, g.zero_point, g.bits) for g in d.inputs
                ],
                "output": None
                if d.output is None
                else (d.output.scale, d.output.zero_point, d.output.bits),
                "weight_bits": None if d.weight is None else d.weight.bits,
            }
        )
    return rows


def reference_forward(desc: LayerDesc, *tensors: torch.Tensor) -> torch.Tensor:
    """An integer layer's result computed in float from its description alone.

    Dequantized weights and bias (``int · scale``), the float op, then quantize / dequantize
    on the output grid: what the integer kernels compute, up to float rounding at ties. Uses
    no module parameters, so an exporter can run it while tracing.
    """
    if desc.kind == "conv":
        assert desc.conv is not None
        c = desc.conv
        y = F.conv2d(
            tensors[0],
            desc.float_weight,
            desc.dequantized_bias,
            c["stride"],
            c["padding"],
            c["dilation"],
            c["groups"],
        )
    elif desc.kind == "linear":
        y = F.linear(tensors[0], desc.float_weight, desc.dequantized_bias)
    elif desc.kind == "add":
        y = tensors[0] + tensors[1]
    elif desc.kind == "cat":
        y = torch.cat(list(tensors), dim=desc.dim)
    else:
        raise ValueError(f"{desc.name}: {desc.kind} is not an integer layer")
    if desc.output is None:
        return torch.relu(y) if desc.relu else y
    grid = desc.output
    return (grid.quantize(y, relu=desc.relu).float() - grid.zero_point) * grid.scale


# Mean bias move, in output steps, above which snap_bias warns. Measured on MobileNetV2
# (Fashion-MNIST): at W4A4 every layer stays at or below 0.03; at W2A2 the depthwise convs
# reach 0.19 (s_in·s_w up to twice the output step) and snapping cost 33 pt of validation
# accuracy (60.1% → 26.8%); with its depthwise weights at 4 bits the moves fell to ≤ 0.03
# (one pointwise layer at 0.14) and snapping still cost 12 pt (66.5% → 54.6%).
COARSE_BIAS_SHIFT = 0.1


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
    :mod:`qat.bias_quant`), when the snap changes nothing the training did not already see.

    Call it on the final model (ranges frozen), before the test evaluation and the export;
    the scales must not change afterwards (re-snap if they do). For conv+BN the BN shift β is
    adjusted so that the folded bias lands on the grid (to within one float32 ulp).

    It also pins each integer layer's input scale (``runtime_input_scale``, not saved in the
    state dict), so that evaluation under :func:`qat.modules.exact_accumulation` (the test
    metrics and the parity check) requantizes the layer's int32 sums with the runtimes' float32
    multiplier ``s_in · s_w / s_out`` instead of quantizing the float sum.

    Args:
        model: a prepared, calibrated / trained fake-quant model.
        example_input: one batch (finds each layer's input scale).

    Returns:
        The names of the layers whose bias was snapped.
    """
    converted = convert(model, example_input)
    # Trained with the bias on this grid (qat.bias_quant): the moves were part of training and
    # of its validation, so there is nothing to warn about.
    on_grid = bool((getattr(model, "qat_recipe", None) or {}).get("quantize_bias", False))
    snapped = []
    coarse: list[tuple[float, float, str]] = []  # (mean, max shift in output steps, layer)
    for name, desc in converted.layers.items():
        if not desc.integer:
            continue
        # Pins the input grid, so that exact evaluation (qat.modules.exact_accumulation)
        # requantizes this layer's int32 sums as the runtimes do.
        desc.module.runtime_input_scale = float(desc.inputs[0].scale)
        if desc.bias_int is None:
            continue
        target = desc.dequantized_bias
        mod = desc.module
        assert target is not None and mod is not None
        linked = mod.__dict__.get(BIAS_INPUT_QUANT) is not None
        if not (on_grid or linked) and desc.output is not None and desc.float_bias is not None:
            shift = (target - desc.float_bias).abs() / desc.output.scale
            mean = float(shift.mean())
            if mean > COARSE_BIAS_SHIFT:
                coarse.append((mean, float(shift.max()), name))
        if isinstance(mod, QConvBn2d):
            # folded bias = β + (b_conv − μ)·f  (qat.fold.fold_bn_params) → solve for β.
            bn = mod.bn
            f = bn_fold_factor(bn)
            conv_b = mod.bias if mod.bias is not None else torch.zeros_like(f)
            beta = target.to(f) - (conv_b - bn.running_mean) * f
            bn.bias.copy_(beta)
        else:
            mod.bias.copy_(target.to(mod.bias))
        snapped.append(name)
    if coarse:
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
            stacklevel=2,
        )
    return snapped
