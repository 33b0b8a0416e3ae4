"""Layers ONNX Runtime runs on lookup tables, exported onto them where that is exact.

ONNX Runtime fuses ``DQ → Sigmoid → Q`` into ``QLinearSigmoid``, ``DQ → LeakyRelu → Q`` into
``QLinearLeakyRelu`` and ``DQ, DQ, … → Concat → Q`` into ``QLinearConcat``. Each builds a
256-entry table per input from its own float function (MLAS's logistic approximation; for a
concat input on another grid than the output, the identity) and a division by the output
scale, where the fake-quant model multiplies by its reciprocal, and then only looks up u8
values. The tables are a function of the grids alone, so they can be compared with the
fake-quant model's on every input level before the export commits to them: :func:`runs_exactly`
builds the small fused model, runs ONNX Runtime on all the levels of each input grid and
compares with what the layer itself gives for the same values. Where every level agrees, the
layer is exported onto the kernel (which then computes exactly what the fake-quant model
computes, on any input); where one differs, it becomes an exact float island
(:mod:`qat.export.onnx.emit`).
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
from qat.export.onnx.runtime import make_session
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
    """True if ONNX Runtime's lookup-table kernel for this layer (a sigmoid, leaky ReLU or
    concat) gives the fake-quant model's output level for every level of its input grids
    (module docstring)."""
    out = desc.output
    if out is None or desc.relu or not desc.inputs or any(g is None for g in desc.inputs):
        return False
    grids: list[ActGrid] = list(desc.inputs)  # type: ignore[arg-type]
    if desc.kind == "cat":
        op, fused = ("Concat", {"axis": 0}), "QLinearConcat"
    else:
        op = lookup_op(desc)
        if op is None:
            return False
        fused = f"QLinear{op[0]}"
    levels = [np.arange(g.qmin, g.qmax + 1, dtype=np.uint8) for g in grids]
    theirs = _runtime_levels(op, fused, grids, out, levels)
    if theirs is None:
        return False
    for grid, lv, got in zip(grids, levels, theirs, strict=True):
        if not np.array_equal(_fake_quant_levels(desc, grid, out, lv), got):
            return False
    return True


def _fake_quant_levels(
    desc: LayerDesc, grid: ActGrid, out: ActGrid, levels: np.ndarray
) -> np.ndarray:
    """The layer's output container levels for the given input container levels (a concat's
    output quantizer is elementwise, so each input can be taken alone)."""
    s_in, s_out = (torch.tensor(s, dtype=torch.float32) for s in (grid.scale, out.scale))
    x = (torch.from_numpy(levels.astype(np.float32)) - grid.zero_point) * s_in
    module = desc.module
    with torch.no_grad():
        y = module.output_quant(x if desc.kind == "cat" else module.act(x))
    codes = torch.round(y.double() / s_out.double()) + out.zero_point
    return codes.clamp(*out.clamp_levels()).to(torch.uint8).numpy()


def _runtime_levels(
    op: tuple[str, dict[str, Any]],
    fused: str,
    grids: list[ActGrid],
    out: ActGrid,
    levels: list[np.ndarray],
) -> list[np.ndarray] | None:
    """ONNX Runtime's output levels for ``DQ(s) → op → Q``, one array per input (None if it
    did not fuse them into ``fused``)."""
    name, attrs = op

    def q_params(g: ActGrid, tag: str) -> list[Any]:
        return [
            numpy_helper.from_array(np.array(g.scale, dtype=np.float32), f"s_{tag}"),
            numpy_helper.from_array(np.array(g.zero_point, dtype=np.uint8), f"z_{tag}"),
        ]

    nodes, inputs, inits = [], [], q_params(out, "out")
    for i, (grid, lv) in enumerate(zip(grids, levels, strict=True)):
        nodes.append(helper.make_node("DequantizeLinear", [f"x{i}", f"s_{i}", f"z_{i}"], [f"f{i}"]))
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.UINT8, [int(lv.size)]))
        inits += q_params(grid, str(i))
    nodes.append(helper.make_node(name, [f"f{i}" for i in range(len(grids))], ["yf"], **attrs))
    nodes.append(helper.make_node("QuantizeLinear", ["yf", "s_out", "z_out"], ["y"]))
    total = sum(int(lv.size) for lv in levels) if name == "Concat" else int(levels[0].size)
    graph = helper.make_graph(
        nodes,
        "lookup_check",
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [total])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    with tempfile.TemporaryDirectory() as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        session = make_session(
            model.SerializeToString(),
            threads=1,
            providers=["CPUExecutionProvider"],
            optimized_model_path=optimized,
            level="extended",
        )
        ran = {n.op_type for n in onnx.load(str(optimized)).graph.node}
    if fused not in ran:
        return None
    (y,) = session.run(None, {f"x{i}": lv for i, lv in enumerate(levels)})
    y = np.clip(y, *out.clamp_levels())
    return np.split(y, np.cumsum([lv.size for lv in levels])[:-1]) if name == "Concat" else [y]
