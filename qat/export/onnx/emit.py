"""ONNX node emission: each quantized layer's QDQ nodes, as ``autograd.Function`` symbolics.

The fake-quant model is deep-copied and each quantized layer swapped for a module whose forward
runs the reference arithmetic and whose ONNX *symbolic* emits the QDQ nodes from
:mod:`qat.export.ir`'s description; :func:`qat.export.lowering.lower` decides which layers are
integer. See :mod:`qat.export.onnx` for the graph these nodes form.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qat.export.convert import explicit_padding
from qat.export.ir import ActGrid, ConvertedModel, LayerDesc, keep_parameter_reads
from qat.export.lowering import FLOAT, lower
from qat.export.onnx.adaptive_pool import adaptive_avg_pool2d_unrolled
from qat.export.onnx.lookup import runs_exactly
from qat.export.reference import float_forward, reference_forward
from qat.quant.layers.functional import FunctionalOp
from qat.quant.prepare import remove_input_quant_hook, set_module


def _const(g: Any, array: np.ndarray | torch.Tensor) -> Any:
    t = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))
    return g.op("Constant", value_t=t)


def _u8(v: int) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.uint8)


def _f32(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def _q(g: Any, x: Any, grid: ActGrid) -> Any:
    return g.op("QuantizeLinear", x, _const(g, _f32(grid.scale)), _const(g, _u8(grid.zero_point)))


def _dq(g: Any, q: Any, grid: ActGrid) -> Any:
    return g.op("DequantizeLinear", q, _const(g, _f32(grid.scale)), _const(g, _u8(grid.zero_point)))


def _clip(g: Any, q: Any, grid: ActGrid, relu: bool) -> Any:
    if not grid.needs_clamp(relu):
        return q
    lo, hi = grid.clamp_levels(relu)
    return g.op("Clip", q, _const(g, _u8(lo)), _const(g, _u8(hi)))


def _requant(g: Any, y: Any, grid: ActGrid, relu: bool = False) -> Any:
    """Float ``y`` → Q → (integer Clip) → DQ: the layer's output on its grid."""
    return _dq(g, _clip(g, _q(g, y, grid), grid, relu), grid)


def _island_requant(g: Any, y: Any, grid: ActGrid, relu: bool = False) -> Any:
    """A float island's result onto its grid, rounded as the fake-quant model rounds it.

    ``QuantizeLinear`` divides by the scale; the fake-quant model (like PyTorch's kernels)
    multiplies by the float32 reciprocal, and the two round a value within one ulp of a level
    boundary differently. So the result is multiplied by ``float32(1/s)`` first and quantized
    at scale 1. This also keeps ONNX Runtime from fusing ``DQ → op → Q`` into integer kernels
    (``QLinearSoftmax``, ``QLinearSigmoid``, ``QLinearMul``) that round otherwise.
    """
    recip = torch.tensor(np.float32(1.0) / np.float32(grid.scale), dtype=torch.float32)
    scaled = g.op("Mul", y, _const(g, recip))
    q = g.op("QuantizeLinear", scaled, _const(g, _f32(1.0)), _const(g, _u8(grid.zero_point)))
    return _dq(g, _clip(g, q, grid, relu), grid)


def _input(g: Any, x: Any, grid: ActGrid) -> Any:
    """Q → DQ of a layer input with its producer's grid (lossless; removed by the post-pass)."""
    return _dq(g, _q(g, x, grid), grid)


def _weight_dq(g: Any, desc: LayerDesc, transpose: bool = False) -> Any:
    wd = desc.weight
    assert wd is not None
    w = wd.int_weight.t().contiguous() if transpose else wd.int_weight
    if wd.per_channel:
        scale = wd.scale.float()
        zero = torch.zeros(scale.numel(), dtype=torch.int8)
        axis = (1 - wd.axis) if transpose else wd.axis
        return g.op(
            "DequantizeLinear", _const(g, w), _const(g, scale), _const(g, zero), axis_i=axis
        )
    scale = wd.scale.float().reshape(())
    return g.op(
        "DequantizeLinear",
        _const(g, w),
        _const(g, scale),
        _const(g, torch.tensor(0, dtype=torch.int8)),
    )


def _bias_dq(g: Any, desc: LayerDesc) -> Any | None:
    if desc.bias_int is None or desc.bias_scale is None:
        return None
    assert desc.weight is not None
    if desc.weight.per_channel:
        zero = torch.zeros(desc.bias_int.numel(), dtype=torch.int32)
        return g.op(
            "DequantizeLinear",
            _const(g, desc.bias_int),
            _const(g, desc.bias_scale.float()),
            _const(g, zero),
            axis_i=0,
        )
    return g.op(
        "DequantizeLinear",
        _const(g, desc.bias_int),
        _const(g, desc.bias_scale.float()[0].reshape(())),
        _const(g, torch.tensor(0, dtype=torch.int32)),
    )


def _finish(g: Any, y: Any, desc: LayerDesc) -> Any:
    if desc.output is not None:
        return _requant(g, y, desc.output, desc.relu)
    return g.op("Relu", y) if desc.relu else y


def _emit_conv(g: Any, desc: LayerDesc, x: Any) -> Any:
    assert desc.conv is not None and desc.inputs[0] is not None
    c = desc.conv
    pad = explicit_padding(desc)
    assert pad is not None and desc.weight is not None
    x_in = _input(g, x, desc.inputs[0])
    inputs = [x_in, _weight_dq(g, desc)]
    bias = _bias_dq(g, desc)
    if bias is not None:
        inputs.append(bias)
    y = g.op(
        "Conv",
        *inputs,
        kernel_shape_i=list(c["kernel_size"]),
        strides_i=list(c["stride"]),
        pads_i=list(pad),
        dilations_i=list(c["dilation"]),
        group_i=c["groups"],
    )
    return _finish(g, y, desc)


def _emit_linear(g: Any, desc: LayerDesc, x: Any) -> Any:
    grid = desc.inputs[0]
    assert grid is not None and desc.weight is not None
    ndim = len(desc.input_shapes[0])
    n, k = desc.weight.int_weight.shape
    bias = _bias_dq(g, desc)
    if ndim == 2:
        inputs = [_input(g, x, grid), _weight_dq(g, desc)] + ([bias] if bias is not None else [])
        return _finish(g, g.op("Gemm", *inputs, transB_i=1), desc)
    # (..., K) input: reshape the uint8 tensor to (-1, K), QGemm, reshape back to (..., N).
    q = _q(g, x, grid)
    flat = g.op("Reshape", q, _const(g, torch.tensor([-1, k], dtype=torch.int64)))
    inputs = [_dq(g, flat, grid), _weight_dq(g, desc)] + ([bias] if bias is not None else [])
    y = g.op("Gemm", *inputs, transB_i=1)
    lead = g.op(
        "Slice",
        g.op("Shape", x),
        _const(g, torch.tensor([0], dtype=torch.int64)),
        _const(g, torch.tensor([-1], dtype=torch.int64)),
    )
    shape = g.op("Concat", lead, _const(g, torch.tensor([n], dtype=torch.int64)), axis_i=0)
    if desc.output is None:
        y = g.op("Relu", y) if desc.relu else y
        return g.op("Reshape", y, shape)
    yq = _clip(g, _q(g, y, desc.output), desc.output, desc.relu)
    return _dq(g, g.op("Reshape", yq, shape), desc.output)


def _emit_add(g: Any, desc: LayerDesc, a: Any, b: Any) -> Any:
    ga, gb = desc.inputs
    assert ga is not None and gb is not None
    return _finish(g, g.op("Add", _input(g, a, ga), _input(g, b, gb)), desc)


def _emit_cat(g: Any, desc: LayerDesc, *xs: Any) -> Any:
    inputs = [_input(g, x, grid) for x, grid in zip(xs, desc.inputs, strict=True)]  # type: ignore[arg-type]
    return _finish(g, g.op("Concat", *inputs, axis_i=desc.dim), desc)


def _emit_matmul(g: Any, desc: LayerDesc, a: Any, b: Any) -> Any:
    ga, gb = desc.inputs
    assert ga is not None and gb is not None
    return _finish(g, g.op("MatMul", _input(g, a, ga), _input(g, b, gb)), desc)


@contextlib.contextmanager
def _tracing_off() -> Iterator[None]:
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


def _emit(g: Any, desc: LayerDesc, *values: Any) -> Any:
    if desc.kind == "conv":
        return _emit_conv(g, desc, *values)
    if desc.kind == "linear":
        return _emit_linear(g, desc, *values)
    if desc.kind == "add":
        return _emit_add(g, desc, *values)
    if desc.kind == "matmul":
        return _emit_matmul(g, desc, *values)
    return _emit_cat(g, desc, *values)


class _LayerFn(torch.autograd.Function):
    """Runs a layer's fake-quant forward; exports as the layer's QDQ nodes.

    The description travels as a plain (non-tensor) argument: the exporter hands it to
    ``symbolic`` unchanged (a module would not survive the tracer).
    """

    @staticmethod
    def forward(ctx: Any, desc: LayerDesc, *tensors: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # Computed with tracing off: the exporter uses ``symbolic``, never this body, and
        # tensors captured from the description would otherwise leak into the traced graph.
        with _tracing_off():
            return reference_forward(desc, *tensors)

    @staticmethod
    def symbolic(g: Any, desc: LayerDesc, *values: Any) -> Any:
        return _emit(g, desc, *values)


class _QDQFn(torch.autograd.Function):
    """Quantize to a grid (with the integer clamp) and dequantize: ``Q → [Clip] → DQ``.

    ``fusable``: a plain ``QuantizeLinear``, which ONNX Runtime may fuse with the op before it
    (pooling into ``QLinearGlobalAveragePool``); otherwise rounded as the fake-quant model
    rounds (:func:`_island_requant`).
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, grid: ActGrid, fusable: bool, relu: bool = False
    ) -> torch.Tensor:  # type: ignore[override]
        with _tracing_off():
            return (grid.quantize(x, relu).float() - grid.zero_point) * grid.scale

    @staticmethod
    def symbolic(g: Any, x: Any, grid: ActGrid, fusable: bool, relu: bool = False) -> Any:
        return _requant(g, x, grid, relu) if fusable else _island_requant(g, x, grid, relu)


#: Float islands ONNX Runtime runs on an integer kernel of the same rounding, kept fusable
#: (and those :func:`runs_exactly` checks).
_POOLING = (nn.AdaptiveAvgPool2d, nn.AvgPool2d)
_POOLING_FUNCTIONS = (F.adaptive_avg_pool2d, F.avg_pool2d)


def _pooling(desc: LayerDesc) -> bool:
    op = getattr(desc.module, "act", None)
    if isinstance(op, _POOLING):
        return True
    return isinstance(op, FunctionalOp) and op.target in _POOLING_FUNCTIONS


def _unrolled_pool_size(desc: LayerDesc) -> tuple[int, int] | None:
    """The output size of an adaptive average pooling to other than 1×1 on a 4-D input of
    known size (written out: :mod:`qat.export.onnx.adaptive_pool`); else None."""
    op = getattr(desc.module, "act", None)
    if isinstance(op, nn.AdaptiveAvgPool2d):
        size: Any = op.output_size
    elif isinstance(op, FunctionalOp) and op.target is F.adaptive_avg_pool2d:
        size = op.args[1] if len(op.args) > 1 else op.kwargs.get("output_size")
    else:
        return None
    if len(desc.input_shapes) != 1 or len(desc.input_shapes[0]) != 4:
        return None
    h, w = desc.input_shapes[0][-2:]
    pair = (size, size) if isinstance(size, int) else tuple(size)
    out = (pair[0] or h, pair[1] or w)
    return None if out == (1, 1) or not all(isinstance(v, int) for v in out) else out


class _FloatInputFn(torch.autograd.Function):
    """The input of a float island with weights: ``Q → DQ`` with the scale repeated per channel.

    ONNX Runtime's ``WeightBiasQuantization`` pass (optimization level 1) quantizes the float
    weights of any Conv / Gemm that reads a per-tensor ``DQ`` and feeds a ``Q`` to per-tensor
    int8, which would silently put a layer the recipe keeps in float (``skip``, 32-bit
    weights) on an int8 grid. A per-axis ``DQ`` with the same scale in every channel is the
    same dequantization but does not match that pattern.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, grid: ActGrid, channels: int) -> torch.Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def symbolic(g: Any, x: Any, grid: ActGrid, channels: int) -> Any:
        scale = torch.full((channels,), grid.scale, dtype=torch.float32)
        zero = torch.full((channels,), grid.zero_point, dtype=torch.uint8)
        return g.op("DequantizeLinear", _q(g, x, grid), _const(g, scale), _const(g, zero), axis_i=1)


class _OnnxLayer(nn.Module):
    """An integer layer (conv / linear / add / concat) in the export copy."""

    def __init__(self, desc: LayerDesc) -> None:
        super().__init__()
        self.desc = desc

    def forward(self, *args: Any) -> torch.Tensor:
        tensors = list(args[0]) if self.desc.kind == "cat" else list(args)
        return _LayerFn.apply(self.desc, *tensors)


class _OnnxFloatIsland(nn.Module):
    """DQ'd inputs → the layer's float ops (exported by torch) → exact Q → [Clip] → DQ.

    Pooling, and a sigmoid / leaky ReLU whose lookup kernel ONNX Runtime was checked to
    compute exactly (:mod:`qat.export.onnx.lookup`), end in a plain Q instead, which ONNX
    Runtime fuses with the op into its integer kernel.
    """

    def __init__(self, desc: LayerDesc) -> None:
        super().__init__()
        self.desc = desc
        self.module = desc.module
        self.pool_size = _unrolled_pool_size(desc)
        self.fusable = self.pool_size is None and (
            _pooling(desc) or (desc.kind == "act" and runs_exactly(desc))
        )

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        grids = self.desc.inputs
        fusable = self.fusable
        if (
            not kwargs
            and len(args) == len(grids)
            and all(isinstance(a, torch.Tensor) for a in args)
        ):
            if fusable:
                # Requantize the input with its grid: ONNX Runtime sees DQ → op → Q and
                # fuses it (QLinearGlobalAveragePool, QLinearSigmoid, ...).
                args = tuple(
                    a if gr is None else _QDQFn.apply(a, gr, True)
                    for a, gr in zip(args, grids, strict=True)
                )
            elif self.desc.kind in ("conv", "linear", "float"):
                # Layers with float weights must stay float (see _FloatInputFn).
                shapes = self.desc.input_shapes
                args = tuple(
                    a if gr is None or len(shp) < 2 else _FloatInputFn.apply(a, gr, int(shp[1]))
                    for a, gr, shp in zip(args, grids, shapes, strict=True)
                )
        if self.pool_size is not None:
            y = adaptive_avg_pool2d_unrolled(args[0], self.pool_size)
            y = torch.relu(y) if self.desc.relu else y
        else:
            y = float_forward(self.desc, *args, **kwargs)
        if self.desc.output is None:
            return y
        return _QDQFn.apply(y, self.desc.output, fusable)


def _onnx_layer(desc: LayerDesc) -> nn.Module:
    how = lower(desc, "onnx")
    if how == FLOAT or (how == "cat" and not runs_exactly(desc)):
        # A concat whose QLinearConcat tables would round an input level otherwise than the
        # fake-quant model (qat.export.onnx.lookup) is exported as an exact float island.
        return _OnnxFloatIsland(desc)
    return _OnnxLayer(desc)


class _OnnxModel(nn.Module):
    def __init__(self, body: nn.Module, input_grid: ActGrid | None) -> None:
        super().__init__()
        self.body = body
        self.input_grid = input_grid

    def forward(self, *args: Any) -> Any:
        if self.input_grid is not None and args and isinstance(args[0], torch.Tensor):
            # Rounded as the fake-quant input quantizer rounds (Mul by 1/s, then Q at scale 1):
            # a plain QuantizeLinear divides, and an input value next to a tie (one pixel
            # value, in every image that has it) would land on another level. The first
            # layer still fuses: it reads the DQ at the real scale.
            args = (_QDQFn.apply(args[0], self.input_grid, False), *args[1:])
        return self.body(*args)


def deploy_model(model: nn.Module, converted: ConvertedModel) -> _OnnxModel:
    body = copy.deepcopy(model).cpu().eval()
    remove_input_quant_hook(body)
    modules = dict(body.named_modules())
    for name, desc in converted.layers.items():
        desc = copy.copy(desc)
        desc.module = modules[name]
        set_module(body, name, keep_parameter_reads(modules[name], _onnx_layer(desc)))
    return _OnnxModel(body, converted.input).eval()
