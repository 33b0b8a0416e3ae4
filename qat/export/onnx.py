"""ONNX export in QDQ format, for ONNX Runtime (and TensorRT / CUDA execution providers).

The graph (opset 17 by default, 21 with packed INT4 weights) is what ONNX Runtime's QDQ
optimizer turns into integer kernels on CPU:

- every integer layer reads ``DequantizeLinear`` inputs and ends in ``QuantizeLinear``:
  ``DQ(x) , DQ(W int8) , DQ(b int32 at s_in·s_w) → Conv → Q`` becomes ``QLinearConv``;
  ``Gemm`` (``transB=1``, weights ``(N, K)``, per-channel axis 0) becomes ``QGemm``;
  ``Concat`` becomes ``QLinearConcat``, ``GlobalAveragePool`` ``QLinearGlobalAveragePool``;
  ``MaxPool`` / ``Flatten`` / ``Reshape`` between ``DQ`` and ``Q`` run on uint8 directly;
- a residual add is ``DQ → Sum → Q`` by default, which ONNX Runtime leaves unfused and runs
  as the ONNX formula ``round((x̂a + x̂b) / s) + z`` in float32, as the fake-quant model does
  (which multiplies by ``1/s``: the two differ only at exact ties). As ``Add``
  (``fused_add=True``) it becomes ``QLinearAdd``, faster, but its x86 kernel computes
  ``fma(qa, sa/s, fma(qb, sb/s, z − …))`` from the scale ratios, and sums that lie within
  float error of a rounding boundary round the other way: on MobileNetV2 W4A8, 0.11% of one
  add's outputs came out one level off, and 0.44% of the test predictions changed;
- weights are int8 initializers (sub-8-bit weights as int8 holding the narrow grid, or packed
  INT4 with ``int4_packed=True``), never ``Q → DQ`` of float weights; biases are int32
  initializers; activations are uint8 with zero points (the fast u8 × s8 path on x86);
- a fused ReLU with a non-zero zero point, and every sub-8-bit activation grid, become an
  integer ``Clip`` on the uint8 tensor after ``Q`` (``relu`` then quantize equals quantize then
  ``max(q, z)``), so they never break the fusion;
- per-channel weight axes: Conv ``W (M, C/g, kH, kW)`` axis 0; Gemm with ``transB=1`` and
  ``W (N, K)`` axis 0 (ORT's own weight-quantization pass expects axis ``0 if transB else 1``
  for Gemm, and QGemm reproduces the fake-quant outputs with it); a linear layer on ``(…, K)``
  input is ``Reshape`` (uint8) → Gemm → ``Reshape``, so every linear layer is a ``QGemm``;
- layers the recipe keeps in float (``skip``, 32-bit weights) read their input through a
  per-axis ``DQ`` so that ORT's ``WeightBiasQuantization`` pass does not quietly quantize their
  weights to int8.

The int32 bias is rounded at ``s_in · s_w`` as every integer runtime does; the fake-quant model
adds the float bias unless :func:`qat.export.snap_bias` was applied (see
:mod:`qat.export.convert`).

How the graph is built: the fake-quant model is deep-copied and each quantized layer is swapped
for a module whose forward runs the fake-quant arithmetic and whose ONNX *symbolic* emits the QDQ
nodes above from :mod:`qat.export.convert`'s description (exact BN fold, integer weights, int32
bias, trained scales). ``torch.onnx.export(..., dynamo=False)`` traces the model's own forward
(arbitrary Python), so grid-preserving ops written in it (ReLU, max-pool, flatten, view) are
exported as they are. Each integer layer re-quantizes its input with the producer's grid
(``Q → DQ``, lossless), the standard QDQ form; a post-pass then removes every ``DQ → Q`` pair
with identical parameters, so no requantization is left between layers.

The TorchScript-based exporter (``dynamo=False``) is deprecated upstream but is the one that
calls ``autograd.Function.symbolic``; it is used in this file only.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from qat.export.convert import (
    ActGrid,
    ConvertedModel,
    LayerDesc,
    convert,
    explicit_padding,
    float_forward,
    reference_forward,
)
from qat.prepare import remove_input_quant_hook, set_module

__all__ = [
    "DEFAULT_OPSET",
    "INT4_OPSET",
    "INTEGER_OP_TYPES",
    "build_onnx_model",
    "default_providers",
    "export_float_onnx",
    "export_onnx",
    "make_session",
    "optimized_op_types",
    "run_session",
]

DEFAULT_OPSET = 17
INT4_OPSET = 21  # INT4 tensors in DequantizeLinear
_EXPORTER_MAX_OPSET = 20  # torch's TorchScript-based exporter; 21 is set by the post-pass

#: Integer kernels ONNX Runtime's CPU provider fuses QDQ groups into.
INTEGER_OP_TYPES = (
    "QLinearConv",
    "QGemm",
    "QLinearMatMul",
    "QLinearAdd",
    "QLinearConcat",
    "QLinearGlobalAveragePool",
    "QLinearAveragePool",
    "ConvInteger",
    "MatMulInteger",
    "MatMulIntegerToFloat",
)


# ---------------------------------------------------------------------------- node emission
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
    """Quantize to a grid (with the integer clamp) and dequantize: ``Q → [Clip] → DQ``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, grid: ActGrid) -> torch.Tensor:  # type: ignore[override]
        with _tracing_off():
            return (grid.quantize(x).float() - grid.zero_point) * grid.scale

    @staticmethod
    def symbolic(g: Any, x: Any, grid: ActGrid) -> Any:
        return _requant(g, x, grid)


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
    """DQ'd inputs → the layer's float ops (exported by torch) → Q → [Clip] → DQ."""

    def __init__(self, desc: LayerDesc) -> None:
        super().__init__()
        self.desc = desc
        self.module = desc.module

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        grids = self.desc.inputs
        if (
            not kwargs
            and len(args) == len(grids)
            and all(isinstance(a, torch.Tensor) for a in args)
        ):
            if self.desc.kind == "act":
                # Requantize each input with its grid: ONNX Runtime sees DQ → op → Q groups
                # (e.g. QLinearGlobalAveragePool).
                args = tuple(
                    a if gr is None else _QDQFn.apply(a, gr)
                    for a, gr in zip(args, grids, strict=True)
                )
            else:
                # Layers with float weights must stay float (see _FloatInputFn).
                shapes = self.desc.input_shapes
                args = tuple(
                    a if gr is None or len(shp) < 2 else _FloatInputFn.apply(a, gr, int(shp[1]))
                    for a, gr, shp in zip(args, grids, shapes, strict=True)
                )
        y = float_forward(self.desc, *args, **kwargs)
        return y if self.desc.output is None else _QDQFn.apply(y, self.desc.output)


def _onnx_layer(desc: LayerDesc) -> nn.Module:
    if desc.kind in ("add", "cat"):
        return _OnnxLayer(desc)
    integer = desc.kind in ("conv", "linear") and desc.integer
    if integer and (desc.kind == "linear" or explicit_padding(desc) is not None):
        return _OnnxLayer(desc)
    return _OnnxFloatIsland(desc)


class _OnnxModel(nn.Module):
    def __init__(self, body: nn.Module, input_grid: ActGrid | None) -> None:
        super().__init__()
        self.body = body
        self.input_grid = input_grid

    def forward(self, *args: Any) -> Any:
        if self.input_grid is not None and args and isinstance(args[0], torch.Tensor):
            args = (_QDQFn.apply(args[0], self.input_grid), *args[1:])
        return self.body(*args)


def _deploy_model(model: nn.Module, converted: ConvertedModel) -> _OnnxModel:
    body = copy.deepcopy(model).cpu().eval()
    remove_input_quant_hook(body)
    modules = dict(body.named_modules())
    for name, desc in converted.layers.items():
        desc = copy.copy(desc)
        desc.module = modules[name]
        set_module(body, name, _onnx_layer(desc))
    return _OnnxModel(body, converted.input).eval()


# ---------------------------------------------------------------------------- post-pass
class _Graph:
    """Small helpers over a GraphProto: producers, consumers, initializer arrays."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}

    def producers(self) -> dict[str, onnx.NodeProto]:
        return {o: n for n in self.graph.node for o in n.output}

    def consumers(self) -> dict[str, list[onnx.NodeProto]]:
        out: dict[str, list[onnx.NodeProto]] = {}
        for n in self.graph.node:
            for i in n.input:
                out.setdefault(i, []).append(n)
        return out


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    keep = []
    for node in graph.node:
        if (
            node.op_type == "Constant"
            and len(node.attribute) == 1
            and node.attribute[0].name == "value"
        ):
            t = copy.deepcopy(node.attribute[0].t)
            t.name = node.output[0]
            graph.initializer.append(t)
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _same_qparams(g: _Graph, a: onnx.NodeProto, b: onnx.NodeProto) -> bool:
    """Q and DQ with equal scale, zero point (value and type) and axis."""
    if len(a.input) != len(b.input) or len(a.input) < 3:
        return False
    for i in (1, 2):
        x, y = g.inits.get(a.input[i]), g.inits.get(b.input[i])
        if x is None or y is None or x.data_type != y.data_type:
            return False
        if not np.array_equal(numpy_helper.to_array(x), numpy_helper.to_array(y)):
            return False
    axis = lambda n: next((at.i for at in n.attribute if at.name == "axis"), 1)  # noqa: E731
    return axis(a) == axis(b)


def _remove_redundant_dq_q(graph: onnx.GraphProto) -> int:
    """Drop ``DQ → Q`` pairs with identical parameters: Q's consumers read DQ's input."""
    g = _Graph(graph)
    producers = g.producers()
    outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    removed: set[int] = set()
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.output[0] in outputs:
            continue
        dq = producers.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear" or not _same_qparams(g, dq, node):
            continue
        rename[node.output[0]] = dq.input[0]
        removed.add(id(node))
    if not rename:
        return 0

    def resolve(name: str) -> str:
        while name in rename:
            name = rename[name]
        return name

    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = resolve(name)
    keep = [n for n in graph.node if id(n) not in removed]
    del graph.node[:]
    graph.node.extend(keep)
    _prune(graph)
    return len(removed)


def _prune(graph: onnx.GraphProto) -> None:
    """Remove nodes whose outputs nobody reads, then unused initializers."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        keep = [n for n in graph.node if any(o in used for o in n.output)]
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input}
    inits = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)


def _dedupe_initializers(graph: onnx.GraphProto) -> None:
    """Share identical small initializers (the many scalar scales and zero points)."""
    seen: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    for t in graph.initializer:
        if np.prod(t.dims, dtype=np.int64) > 16:
            continue
        key = (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes())
        if key in seen:
            rename[t.name] = seen[key]
        else:
            seen[key] = t.name
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    _prune(graph)


def _int4_bytes(values: np.ndarray) -> bytes:
    """Two's-complement nibbles, two per byte, the first element in the low nibble (ONNX)."""
    flat = values.astype(np.int8).flatten().astype(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def _pack_int4(graph: onnx.GraphProto) -> int:
    """Store int8 weight initializers whose levels fit [-8, 7] as INT4 (and their zero points)."""
    g = _Graph(graph)
    packed = 0
    consumers = g.consumers()
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        w = g.inits.get(node.input[0])
        z = g.inits.get(node.input[2])
        if w is None or z is None or w.data_type != TensorProto.INT8 or len(w.dims) < 2:
            continue
        arr, zarr = numpy_helper.to_array(w), numpy_helper.to_array(z)
        if arr.min() < -8 or arr.max() > 7 or np.any(zarr != 0):
            continue
        if len(consumers.get(node.input[0], [])) != 1 or len(consumers.get(node.input[2], [])) != 1:
            continue  # shared initializer: leave it (never the case for weights we emit)
        new_w = helper.make_tensor(
            w.name, TensorProto.INT4, list(w.dims), _int4_bytes(arr), raw=True
        )
        new_z = helper.make_tensor(
            z.name, TensorProto.INT4, list(z.dims), _int4_bytes(zarr), raw=True
        )
        w.CopyFrom(new_w)
        z.CopyFrom(new_z)
        packed += 1
    return packed


def compact_names(graph: onnx.GraphProto) -> None:
    """Short names for intermediate values and initializers (the exporter's run ~60 bytes).

    Graph inputs / outputs keep their names; node names (the layer paths) are kept for
    profiling. On ResNet-20 this is ~30 KB of a ~300 KB int8 file.
    """
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    rename: dict[str, str] = {}

    def short(name: str, prefix: str) -> str:
        if not name or name in keep:
            return name
        if name not in rename:
            rename[name] = f"{prefix}{len(rename)}"
        return rename[name]

    for t in graph.initializer:
        t.name = short(t.name, "c")
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = short(name, "v")
        for i, name in enumerate(node.output):
            node.output[i] = short(name, "v")
    for v in graph.value_info:
        v.name = short(v.name, "v")


def _rename_io(model: onnx.ModelProto) -> None:
    for v in model.graph.input:
        v.doc_string = "float32 input; quantized inside the model"
    for v in model.graph.output:
        v.doc_string = "float32 output (dequantized)"


def _unfuse_adds(graph: onnx.GraphProto) -> int:
    """``DQ → Add → Q`` groups become ``DQ → Sum → Q``: ONNX Runtime fuses only ``Add``."""
    g = _Graph(graph)
    producers, consumers = g.producers(), g.consumers()
    n = 0
    for node in graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        inputs_dq = all(
            producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"
            for i in node.input
        )
        users = consumers.get(node.output[0], [])
        if inputs_dq and users and all(u.op_type == "QuantizeLinear" for u in users):
            node.op_type = "Sum"
            n += 1
    return n


def finalize(
    model: onnx.ModelProto, opset: int, int4_packed: bool, fused_add: bool = False
) -> onnx.ModelProto:
    """Constants → initializers, drop redundant DQ→Q pairs, adds as ``Sum`` unless
    ``fused_add``, share scalars, pack INT4, check."""
    graph = model.graph
    _constants_to_initializers(graph)
    _remove_redundant_dq_q(graph)
    if not fused_add:
        _unfuse_adds(graph)
    if int4_packed:  # before sharing initializers: each weight DQ owns its zero point here
        _pack_int4(graph)
    _dedupe_initializers(graph)
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            imp.version = opset
    if opset >= INT4_OPSET:
        model.ir_version = max(model.ir_version, 10)
    compact_names(graph)
    model.producer_name = "qat.export"
    _rename_io(model)
    onnx.checker.check_model(model, full_check=True)
    return model


# ---------------------------------------------------------------------------- export
def _io_names(example_args: Sequence[Any], outputs: Any) -> tuple[list[str], list[str]]:
    n_in = sum(isinstance(a, torch.Tensor) for a in example_args)
    n_out = len(outputs) if isinstance(outputs, list | tuple) else 1
    ins = ["input"] + [f"input_{i}" for i in range(1, n_in)]
    outs = ["output"] + [f"output_{i}" for i in range(1, n_out)]
    return ins, outs


def _export_torch(module: nn.Module, example_input: Any, opset: int) -> onnx.ModelProto:
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    with torch.no_grad():
        outputs = module(*args)
    ins, outs = _io_names(args, outputs)
    dynamic = {n: {0: "batch"} for n in ins + outs}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated; it is the one that runs our symbolics.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            buf,
            dynamo=False,
            opset_version=min(opset, _EXPORTER_MAX_OPSET),
            input_names=ins,
            output_names=outs,
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


def _resolve_opset(opset: int | None, int4_packed: bool) -> int:
    if opset is None:
        return INT4_OPSET if int4_packed else DEFAULT_OPSET
    if isinstance(opset, bool) or not isinstance(opset, int) or not 13 <= opset <= 23:
        raise ValueError(
            f"opset={opset!r} is invalid: expected an int in 13..23 (QDQ per-axis needs 13)"
        )
    if int4_packed and opset < INT4_OPSET:
        raise ValueError(
            f"int4_packed=True needs opset >= {INT4_OPSET} (INT4 tensors), got opset={opset}"
        )
    return opset


@torch.no_grad()
def build_onnx_model(
    model: nn.Module,
    example_input: Any,
    converted: ConvertedModel | None = None,
    opset: int | None = None,
    int4_packed: bool = False,
    fused_add: bool = False,
) -> onnx.ModelProto:
    """The QDQ ONNX model of a prepared fake-quant model (checked with ``onnx.checker``).

    Args:
        model: a prepared, calibrated / trained fake-quant model (left untouched).
        example_input: one batch (a tensor or a tuple of positional tensors); the batch
            dimension is dynamic in the exported graph.
        converted: :func:`qat.export.convert.convert` of the same model and input, if at hand.
        opset: ONNX opset (default 17; 21 with ``int4_packed``).
        int4_packed: store weights whose levels fit 4 bits as INT4 (half the bytes of int8;
            ONNX Runtime then runs those convs in float: same outputs, slower).
        fused_add: emit residual adds as ``Add``, which ONNX Runtime fuses into
            ``QLinearAdd`` (faster; rounds near-ties differently from the fake-quant model,
            see the module docstring). Default: ``Sum``, unfused, float32 as the fake-quant
            model computes it.
    """
    opset = _resolve_opset(opset, int4_packed)
    if converted is None:
        converted = convert(model, example_input)
    if isinstance(example_input, dict):
        raise ValueError("ONNX export takes positional inputs (a tensor or a tuple)")
    deploy = _deploy_model(model, converted)
    proto = _export_torch(deploy, example_input, opset)
    return finalize(proto, opset, int4_packed, fused_add)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example_input: Any,
    converted: ConvertedModel | None = None,
    opset: int | None = None,
    int4_packed: bool = False,
    fused_add: bool = False,
) -> Path:
    """Build the QDQ model (:func:`build_onnx_model`) and write it to ``path``."""
    proto = build_onnx_model(model, example_input, converted, opset, int4_packed, fused_add)
    path = Path(path)
    path.write_bytes(proto.SerializeToString())
    return path


@torch.no_grad()
def float_onnx_bytes(model: nn.Module, example_input: Any, opset: int = DEFAULT_OPSET) -> bytes:
    """A float model as ONNX bytes (eval mode: the exporter folds BN into the convs)."""
    module = copy.deepcopy(model).cpu().eval()
    proto = _export_torch(module, example_input, opset)
    compact_names(proto.graph)  # as for the integer files, so their sizes compare fairly
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def export_float_onnx(
    model: nn.Module, path: str | Path, example_input: Any, opset: int = DEFAULT_OPSET
) -> Path:
    """Export a float (unprepared) model to ONNX, BN folded: the FP32 baseline."""
    path = Path(path)
    path.write_bytes(float_onnx_bytes(model, example_input, opset))
    return path


# ---------------------------------------------------------------------------- runtime
def default_providers(available: Sequence[str] | None = None) -> list[str]:
    """TensorRT → CUDA → CPU, keeping those this ONNX Runtime build offers."""
    import onnxruntime as ort

    have = set(ort.get_available_providers() if available is None else available)
    wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in wanted if p in have]


def make_session(
    path: str | Path,
    threads: int = 2,
    providers: Sequence[str] | None = None,
    optimized_model_path: str | Path | None = None,
    level: str = "all",
    spinning: bool = True,
) -> Any:
    """An ONNX Runtime session with ``threads`` intra-op threads.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (inter-op is 1: the graphs are sequential).
        providers: execution providers (default: :func:`default_providers`).
        optimized_model_path: save the optimized graph there (to inspect what ORT fused).
        level: graph optimization level: ``basic``, ``extended`` or ``all``.
        spinning: let idle worker threads spin (ORT's default). Off, they sleep: slightly
            slower on an idle machine, much faster when other processes hold the cores.
    """
    import onnxruntime as ort

    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = levels[level]
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    return ort.InferenceSession(
        str(path), sess_options=so, providers=list(providers or default_providers())
    )


def run_session(session: Any, example_input: Any) -> list[np.ndarray]:
    """Run a session on a tensor / tuple of tensors (or numpy arrays); float32 outputs."""
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    feeds = {}
    for meta, value in zip(session.get_inputs(), args, strict=False):
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        feeds[meta.name] = arr.astype(np.float32, copy=False)
    return session.run(None, feeds)


def optimized_op_types(path: str | Path, level: str = "extended") -> Counter:
    """Op types of the graph ONNX Runtime (CPU) runs after optimizing the model at ``path``."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "optimized.onnx"
        make_session(
            path,
            threads=1,
            providers=["CPUExecutionProvider"],
            optimized_model_path=out,
            level=level,
        )
        graph = onnx.load(str(out)).graph
    return Counter(n.op_type for n in graph.node)
