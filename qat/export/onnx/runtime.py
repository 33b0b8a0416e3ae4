"""ONNX Runtime sessions for the exported models: providers, threads, optimized graphs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

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


#: Ops of an optimized graph that run on integer data without computing in float: the integer
#: kernels above, the (de)quantizers at the graph's edges and around islands, and the ops that
#: only move or select u8 values. Anything else computes in float (a float island).
INTEGER_DATA_OP_TYPES = (
    *INTEGER_OP_TYPES,
    "QLinearMul",
    "QLinearSigmoid",
    "QLinearLeakyRelu",
    "QLinearSoftmax",
    "MatMulNBits",
    "DynamicQuantizeMatMul",
    "DynamicQuantizeLinear",
    "QuantizeLinear",
    "DequantizeLinear",
    "MaxPool",
    "NhwcMaxPool",
    "Flatten",
    "Reshape",
    "Clip",
    "Transpose",
)


def default_providers(available: Sequence[str] | None = None) -> list[str]:
    """TensorRT → CUDA → CPU, keeping those this ONNX Runtime build offers."""
    import onnxruntime as ort

    have = set(ort.get_available_providers() if available is None else available)
    wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in wanted if p in have]


def make_session(
    path: str | Path | bytes,
    threads: int = 2,
    providers: Sequence[str] | None = None,
    optimized_model_path: str | Path | None = None,
    level: str = "all",
    spinning: bool = True,
) -> Any:
    """An ONNX Runtime session with ``threads`` intra-op threads.

    Args:
        path: the ``.onnx`` file, or a serialized model.
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
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(
        model, sess_options=so, providers=list(providers or default_providers())
    )


def run_session(session: Any, example_input: Any) -> list[np.ndarray]:
    """Run a session on a tensor / tuple of tensors (or numpy arrays); float32 outputs."""
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    feeds = {}
    for meta, value in zip(session.get_inputs(), args, strict=False):
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        feeds[meta.name] = arr.astype(np.float32, copy=False)
    return session.run(None, feeds)


def optimized_graph(path: str | Path, level: str = "extended") -> onnx.GraphProto:
    """The graph ONNX Runtime (CPU) runs after optimizing the model at ``path``."""
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
        return onnx.load(str(out)).graph


def optimized_op_types(path: str | Path, level: str = "extended") -> Counter:
    """Op types of the graph ONNX Runtime (CPU) runs after optimizing the model at ``path``."""
    return Counter(n.op_type for n in optimized_graph(path, level).node)


def runtime_graph(path: str | Path) -> dict[str, Any]:
    """What ONNX Runtime (CPU, every optimization on) runs for the model at ``path``: its op
    types with their counts, and those that compute in float (not in
    :data:`INTEGER_DATA_OP_TYPES`). A CNN export whose float islands all fused leaves none.

    The model input's quantization, ``Mul(1/s) → QuantizeLinear`` on a graph input (rounded as
    the fake-quant model rounds it), is part of quantizing the input, not a float island.
    """
    graph = optimized_graph(path, level="all")
    inputs = {i.name for i in graph.input}
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    float_ops = set()
    for node in graph.node:
        if node.op_type in INTEGER_DATA_OP_TYPES:
            continue
        quantizes_input = (
            node.op_type == "Mul"
            and any(name in inputs for name in node.input)
            and set(consumers.get(node.output[0], [])) == {"QuantizeLinear"}
        )
        if not quantizes_input:
            float_ops.add(node.op_type)
    ops = Counter(n.op_type for n in graph.node)
    return {"ops": dict(sorted(ops.items())), "float_ops": sorted(float_ops)}
