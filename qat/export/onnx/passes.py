"""Post-passes over the exported ONNX graph: what ONNX Runtime's QDQ fusion needs, and size.

Constants become initializers; ``DQ → Q`` pairs with identical parameters go (no requantization
is left between layers); small initializers are shared; weights that fit 4 bits are packed as INT4
on request (widened by a constant ``Cast`` that ONNX Runtime folds, so its integer kernels still
fuse); value names are shortened.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INT4_OPSET = 21  # INT4 tensors in DequantizeLinear


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs a node holds (``If`` branches, ``Loop`` / ``Scan`` bodies)."""
    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def _nested_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The nodes of the subgraphs of ``graph``'s nodes, at any depth (not ``graph``'s own)."""
    out = []
    for n in graph.node:
        for g in _subgraphs(n):
            out.extend(g.node)
            out.extend(_nested_nodes(g))
    return out


def _reads(graph: onnx.GraphProto) -> set[str]:
    """Every value name a node reads, in ``graph`` or a subgraph of it (a branch reads outer
    values by name, not as an input of its ``If``)."""
    names = {i for n in graph.node for i in n.input}
    for n in _nested_nodes(graph):
        names.update(n.input)
    return names


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

    for node in [*graph.node, *_nested_nodes(graph)]:
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
        used = _reads(graph) | outputs
        keep = [n for n in graph.node if any(o in used for o in n.output)]
        if len(keep) == len(graph.node):
            break
        del graph.node[:]
        graph.node.extend(keep)
    used = _reads(graph)
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
    for node in [*graph.node, *_nested_nodes(graph)]:
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
    """Store int8 weight initializers whose levels fit [-8, 7] as INT4, widened back to int8
    by a ``Cast`` in front of their ``DequantizeLinear``.

    ONNX Runtime has no integer kernel that takes INT4 weights into a conv or a Gemm: a
    ``DequantizeLinear`` of INT4 weights is left unfused and the layer runs in float (ResNet-20
    ran 20 of its 21 convs as float ``Conv``, 4x slower than FP32). A ``Cast`` of a constant is
    folded at session creation (basic optimizations), before the QDQ fusion (extended), so the
    session holds the same int8 weights as the default export and fuses ``QLinearConv`` /
    ``QGemm`` as it does: the file keeps half the weight bytes, the runtime the same kernels
    and outputs. Zero points stay int8 (one per channel: a few bytes).
    """
    g = _Graph(graph)
    packed = 0
    consumers = g.consumers()
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        w = g.inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        z = g.inits.get(node.input[2]) if w is not None and len(node.input) >= 3 else None
        if w is None or z is None or w.data_type != TensorProto.INT8 or len(w.dims) < 2:
            nodes.append(node)
            continue
        arr, zarr = numpy_helper.to_array(w), numpy_helper.to_array(z)
        shared = len(consumers.get(node.input[0], [])) != 1  # never the case for our weights
        if arr.min() < -8 or arr.max() > 7 or np.any(zarr != 0) or shared:
            nodes.append(node)
            continue
        w.CopyFrom(
            helper.make_tensor(w.name, TensorProto.INT4, list(w.dims), _int4_bytes(arr), raw=True)
        )
        widened = f"{w.name}_int8"
        nodes.append(
            helper.make_node(
                "Cast", [w.name], [widened], name=f"{w.name}_widen", to=TensorProto.INT8
            )
        )
        node.input[0] = widened
        nodes.append(node)
        packed += 1
    del graph.node[:]
    graph.node.extend(nodes)
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
    for node in [*graph.node, *_nested_nodes(graph)]:
        for i, name in enumerate(node.input):
            node.input[i] = short(name, "v")
        for i, name in enumerate(node.output):
            node.output[i] = short(name, "v")
        for sub in _subgraphs(node):
            for v in [*sub.input, *sub.output, *sub.value_info]:
                v.name = short(v.name, "v")
            for t in sub.initializer:
                t.name = short(t.name, "c")
    for v in graph.value_info:
        v.name = short(v.name, "v")


def _rename_io(model: onnx.ModelProto) -> None:
    for v in model.graph.input:
        v.doc_string = "float32 input; quantized inside the model"
    for v in model.graph.output:
        v.doc_string = "float32 output (dequantized)"


def finalize(model: onnx.ModelProto, opset: int, int4_packed: bool) -> onnx.ModelProto:
    """Constants → initializers, drop redundant DQ→Q pairs, share scalars, pack INT4, check."""
    graph = model.graph
    _constants_to_initializers(graph)
    _remove_redundant_dq_q(graph)
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


def bias_into_matmulnbits(graph: onnx.GraphProto) -> int:
    """Give each ``MatMulNBits → Add(constant bias)`` its bias as the kernel's own input.

    The kernel adds it inside its epilogue, before the zero-point term, which rounds
    differently from an ``Add`` after it; ORT's optimizer makes the same fusion at its default
    level but not with optimizations off, so the file states it and every level computes what
    :mod:`qat.quant.runtime_matmul` reproduces. Returns the number of layers rewritten.
    """
    consts = {
        n.output[0]: n
        for n in graph.node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
    }
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    dropped = []
    for mm in graph.node:
        if mm.op_type != "MatMulNBits" or len(mm.input) > 3:
            continue
        users = readers.get(mm.output[0], [])
        if len(users) != 1 or users[0].op_type != "Add" or users[0].input[0] != mm.output[0]:
            continue
        add, bias = users[0], users[0].input[1]
        if bias not in consts or len(consts[bias].attribute[0].t.dims) != 1:
            continue
        mm.input.extend(["", "", bias])  # zero_points, g_idx: absent
        mm.output[0] = add.output[0]  # the Add was the kernel's only reader
        # An initializer: the Constant node may come after the kernel in the node order.
        tensor = onnx.TensorProto()
        tensor.CopyFrom(consts[bias].attribute[0].t)
        tensor.name = bias
        graph.initializer.append(tensor)
        dropped += [add, consts[bias]]
    for node in dropped:
        graph.node.remove(node)
    return len(dropped) // 2
