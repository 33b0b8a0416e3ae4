"""Activation islands ONNX Runtime runs on its lookup-table kernels, where that is exact.

ONNX Runtime fuses ``DQ → Sigmoid → Q`` into ``QLinearSigmoid`` and ``DQ → LeakyRelu → Q`` into
``QLinearLeakyRelu``: each builds a 256-entry table from its own float function (MLAS's logistic
approximation; a division by the output scale where the fake-quant model multiplies by its
reciprocal) and then only looks up u8 values. The table is a function of the two grids alone,
so it can be compared with the fake-quant model's on every input level before the export
commits to it: :func:`runs_exactly` builds the one-node model, runs ONNX Runtime on all the
input grid's levels and compares with what the layer's own activation and output quantizer
give for the same values. Where every level agrees, the layer is exported fusable (the kernel
then computes exactly what the fake-quant model computes, on any input); where one differs, it
stays an exact float island (:mod:`qat.export.onnx.emit`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from qat.export.ir import ActGrid, LayerDesc
from qat.quant.layers.functional import SLOT, FunctionalOp

__all__ = ["lookup_op", "runs_exactly"]

_SIGMOID = (torch.sigmoid, F.sigmoid)
_OPSET = 17


def lookup_op(desc: LayerDesc) -> tuple[str, dict[str, float]] | None:
    """The ONNX op (and attributes) of an activation ONNX Runtime has a lookup kernel for, or
    None: ``("Sigmoid", {})``, ``("LeakyRelu", {"alpha": a})``."""
    act = getattr(desc.module, "act", None)
    if desc.kind != "act" or act is None or len(desc.inputs) != 1:
        return None
    if isinstance(act, nn.Sigmoid):
        return "Sigmoid", {}
    if isinstance(act, nn.LeakyReLU):
        return "LeakyRelu", {"alpha": float(act.negative_slope)}
    if not isinstance(act, FunctionalOp):
        return None
    if act.kwargs.get("inplace", False) or act.args[:1] != (SLOT,):
        return None
    constants = act.args[1:]
    if act.target in _SIGMOID or act.target == "sigmoid":
        return ("Sigmoid", {}) if not constants and not act.kwargs else None
    if act.target is F.leaky_relu:
        slope = act.kwargs.get("negative_slope", constants[0] if constants else 0.01)
        extra = set(act.kwargs) - {"negative_slope", "inplace"}
        if isinstance(slope, int | float) and not extra and SLOT not in constants:
            return "LeakyRelu", {"alpha": float(slope)}
    return None


def runs_exactly(desc: LayerDesc) -> bool:
    """True if ONNX Runtime's lookup kernel for this layer gives the fake-quant model's output
    level for every level of its input grid (module docstring)."""
    op = lookup_op(desc)
    grid, out = desc.inputs[0] if desc.inputs else None, desc.output
    if op is None or grid is None or out is None or desc.relu:
        return False
    levels = np.arange(grid.qmin, grid.qmax + 1, dtype=np.uint8)
    ours = _fake_quant_levels(desc, grid, out, levels)
    theirs = _runtime_levels(op, grid, out, levels)
    return theirs is not None and np.array_equal(ours, theirs)


def _fake_quant_levels(
    desc: LayerDesc, grid: ActGrid, out: ActGrid, levels: np.ndarray
) -> np.ndarray:
    """The layer's output container levels for the given input container levels."""
    s_in, s_out = (torch.tensor(s, dtype=torch.float32) for s in (grid.scale, out.scale))
    x = (torch.from_numpy(levels.astype(np.float32)) - grid.zero_point) * s_in
    module = desc.module
    with torch.no_grad():
        y = module.output_quant(module.act(x))
    codes = torch.round(y.double() / s_out.double()) + out.zero_point
    return codes.clamp(*out.clamp_levels()).to(torch.uint8).numpy()


def _runtime_levels(
    op: tuple[str, dict[str, float]], grid: ActGrid, out: ActGrid, levels: np.ndarray
) -> np.ndarray | None:
    """ONNX Runtime's output levels for ``DQ → op → Q`` (None if it did not fuse the three)."""
    import onnxruntime as ort

    name, attrs = op

    def q_params(g: ActGrid, tag: str) -> list[Any]:
        return [
            numpy_helper.from_array(np.array(g.scale, dtype=np.float32), f"s_{tag}"),
            numpy_helper.from_array(np.array(g.zero_point, dtype=np.uint8), f"z_{tag}"),
        ]

    nodes = [
        helper.make_node("DequantizeLinear", ["x", "s_in", "z_in"], ["xf"]),
        helper.make_node(name, ["xf"], ["yf"], **attrs),
        helper.make_node("QuantizeLinear", ["yf", "s_out", "z_out"], ["y"]),
    ]
    shape = [int(levels.size)]
    graph = helper.make_graph(
        nodes,
        "lookup_check",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, shape)],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, shape)],
        q_params(grid, "in") + q_params(out, "out"),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(optimized)
        session = ort.InferenceSession(
            model.SerializeToString(), so, providers=["CPUExecutionProvider"]
        )
        ran = {n.op_type for n in onnx.load(str(optimized)).graph.node}
    if f"QLinear{name}" not in ran:
        return None
    (y,) = session.run(None, {"x": levels})
    return np.clip(y, *out.clamp_levels())
