"""The post-export passes over the ONNX graph (qat.export.onnx.passes)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qat.export.onnx.passes import finalize


def _model_with_a_branch_reading_an_outer_value() -> onnx.ModelProto:
    """``y = x + 1`` if ``cond`` else ``x``, where the ``then`` branch reads ``x1 = x + 1``
    by name from the outer graph (as torch's exporter writes a dynamic ``tile``): nothing
    but the branch reads ``x1``."""
    one = numpy_helper.from_array(np.array([1.0], np.float32), "one")
    then = helper.make_graph(
        [helper.make_node("Identity", ["outer_plus_one"], ["then_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, [2])],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["else_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, [2])],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["x", "one"], ["outer_plus_one"]),
            helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [one],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_values_read_only_inside_a_branch_are_kept() -> None:
    model = finalize(_model_with_a_branch_reading_an_outer_value(), 17, int4_packed=False)
    assert [n.op_type for n in model.graph.node] == ["Add", "If"]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.array([1.0, 2.0], np.float32)
    (y,) = sess.run(None, {"x": x, "cond": np.array(True)})
    np.testing.assert_array_equal(y, x + 1)
