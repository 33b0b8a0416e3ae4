"""Global average pooling under ONNX runtime numerics is ONNX Runtime's integer kernel.

``QLinearGlobalAveragePool`` sums the stored levels in int32 and requantizes once in float32
(:mod:`qat.quant.runtime_pool`); averaging the dequantized values in float32 picks another
level near ties. Random grids and inputs, each through ONNX Runtime's fused kernel and through
a pinned ``QAct`` evaluated under :func:`qat.runtime_numerics`.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from export_helpers import recipe
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import qat
from qat.quant.layers import QAct
from qat.quant.runtime_pool import is_global_avg_pool

SHAPE = (64, 64, 8, 8)


def _ort_pool(s_in: float, z_in: int, s_out: float, z_out: int) -> ort.InferenceSession:
    inits = [
        numpy_helper.from_array(np.array(s_in, np.float32), "si"),
        numpy_helper.from_array(np.array(z_in, np.uint8), "zi"),
        numpy_helper.from_array(np.array(s_out, np.float32), "so"),
        numpy_helper.from_array(np.array(z_out, np.uint8), "zo"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "si", "zi"], ["xf"]),
        helper.make_node("GlobalAveragePool", ["xf"], ["p"]),
        helper.make_node("QuantizeLinear", ["p", "so", "zo"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "pool",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, list(SHAPE))],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _pool_layer() -> QAct:
    """A calibrated model's ``QAct`` around a global average pool (grids set per trial)."""
    q = qat.prepare(nn.Sequential(nn.Conv2d(1, 1, 1), nn.AdaptiveAvgPool2d(1)), recipe(8))
    qat.calibrate(q, [torch.randn(2, 1, 4, 4)])
    (pool,) = [m for m in q.modules() if isinstance(m, QAct)]
    return pool.eval()


def test_pinned_global_avg_pool_equals_onnx_runtime() -> None:
    rng = np.random.default_rng(0)
    pool = _pool_layer()
    oq = pool.output_quant
    plain_differs = 0
    for _ in range(60):
        s_in = float(np.float32(rng.uniform(0.005, 0.1)))
        z_in = int(rng.integers(0, 256))
        s_out = float(np.float32(s_in * rng.uniform(0.2, 1.0)))
        z_out = int(rng.integers(0, 256))
        with torch.no_grad():
            oq.scale.fill_(s_out)
            oq.zero_point.fill_(z_out)
        levels = np.clip(rng.normal(z_in, 20, SHAPE).round(), 0, 255).astype(np.uint8)
        expect = _ort_pool(s_in, z_in, s_out, z_out).run(None, {"x": levels})[0]
        x = (torch.from_numpy(levels.astype(np.float32)) - z_in) * torch.tensor(s_in)
        pool.runtime_input_grids = ((s_in, z_in),)  # as snap_bias pins it
        with torch.no_grad(), qat.runtime_numerics(pool):
            y = pool(x)
        got = torch.round(y / torch.tensor(s_out)) + z_out
        np.testing.assert_array_equal(got.numpy(), expect.astype(np.float32))
        with torch.no_grad():
            plain = torch.round(pool(x) / torch.tensor(s_out)) + z_out  # outside the block
        plain_differs += int((plain.numpy() != expect).sum())
    assert plain_differs > 0  # the float average rounds otherwise somewhere


def test_snap_bias_pins_the_pool_input_grid() -> None:
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(F.adaptive_avg_pool2d(torch.relu(self.conv(x)), 1).flatten(1))

    x = torch.randn(8, 3, 6, 6)
    q = qat.prepare(Head().eval(), recipe(8), example_inputs=x[:2])
    qat.calibrate(q, [x])
    q.eval()
    qat.snap_bias(q, x)
    pools = [m for m in q.modules() if isinstance(m, QAct) and is_global_avg_pool(m.act)]
    assert len(pools) == 1
    (grid,) = pools[0].runtime_input_grids
    s, z = q.conv.output_quant.qparams()
    assert grid == (float(s.reshape(-1)[0]), int(z.reshape(-1)[0]))
