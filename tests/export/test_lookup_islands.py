"""Sigmoid, leaky ReLU and concat run on ONNX Runtime's lookup kernels where checked exact.

:mod:`qat.export.onnx.lookup` compares ONNX Runtime's ``QLinearSigmoid`` / ``QLinearLeakyRelu``
/ ``QLinearConcat`` tables with the fake-quant layer's output on every input level; a layer
that agrees on all of them runs on the kernel, one that does not is a float island.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from export_helpers import recipe
from torch import nn

import qat
from qat.export import export_model, verify_artifacts
from qat.export.convert import convert
from qat.export.onnx import lookup
from qat.export.onnx.runtime import runtime_graph
from qat.ops import Cat


class Activations(nn.Module):
    """Conv → hardswish → conv → sigmoid (function) → conv → leaky ReLU (module) → head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 16, 3, padding=1)
        self.leaky = nn.LeakyReLU(0.1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.hardswish(self.c1(x))
        x = torch.sigmoid(self.c2(x))
        x = self.leaky(self.c3(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _w8a8(model: nn.Module, shape: tuple[int, ...], seed: int) -> tuple[nn.Module, list]:
    """``model`` prepared W8A8, calibrated on three random batches, snapped; and the batches."""
    torch.manual_seed(seed)
    data = [torch.randn(*shape) for _ in range(3)]
    q = qat.prepare(model.eval(), recipe(8), example_inputs=data[0][:2])
    qat.calibrate(q, data)
    q.eval()
    qat.snap_bias(q, data[0][:8])
    return q, data


@pytest.fixture(scope="module")
def model_and_data() -> tuple[nn.Module, list[torch.Tensor]]:
    return _w8a8(Activations(), (32, 3, 12, 12), seed=0)


def _acts(q: nn.Module, x: torch.Tensor) -> dict[str, object]:
    return {n: d for n, d in convert(q, x).layers.items() if d.kind == "act"}


def test_lookup_ops_are_recognized(model_and_data) -> None:
    q, data = model_and_data
    ops = {n: lookup.lookup_op(d) for n, d in _acts(q, data[0][:2]).items()}
    found = sorted(op for op in ops.values() if op is not None)
    assert found == [("LeakyRelu", {"alpha": pytest.approx(0.1)}), ("Sigmoid", {})], ops
    assert sum(op is None for op in ops.values()) >= 1  # hardswish has no lookup kernel


def test_checked_activations_run_on_integer_kernels_exactly(model_and_data, tmp_path) -> None:
    q, data = model_and_data
    paths = export_model(q, tmp_path, data[0][:1], targets=("onnx",))
    ops = runtime_graph(paths["onnx"])["ops"]
    assert ops.get("QLinearSigmoid") == 1 and ops.get("QLinearLeakyRelu") == 1, ops
    assert "Sigmoid" not in ops and "LeakyRelu" not in ops, ops
    report = verify_artifacts(q, paths, data)
    onnx = report["runtimes"]["onnx"]
    assert onnx["agreement"] == 1.0 and onnx["max_abs_diff"] == 0.0, onnx


def test_a_table_off_by_one_level_keeps_the_float_island(
    model_and_data, tmp_path, monkeypatch
) -> None:
    """ONNX Runtime's table differing from the fake-quant layer's on one input level is
    enough to keep the layer off the lookup kernel."""
    q, data = model_and_data
    real = lookup._runtime_levels

    def one_level_off(op, fused, grids, out, levels):
        tables = real(op, fused, grids, out, levels)
        if tables is not None and op[0] == "Sigmoid":
            tables[0] = tables[0].copy()
            tables[0][len(tables[0]) // 2] ^= np.uint8(1)
        return tables

    monkeypatch.setattr(lookup, "_runtime_levels", one_level_off)
    paths = export_model(copy.deepcopy(q), tmp_path, data[0][:1], targets=("onnx",))
    ops = runtime_graph(paths["onnx"])["ops"]
    assert "QLinearSigmoid" not in ops and ops.get("Sigmoid") == 1, ops
    assert ops.get("QLinearLeakyRelu") == 1, ops
    report = verify_artifacts(q, paths, data)
    assert report["runtimes"]["onnx"]["agreement"] == 1.0


class Branches(nn.Module):
    """Two convs with their own output grids, concatenated (QLinearConcat requantizes both)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.cat = Cat(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Shifted apart, so that the output grid is neither input's.
        return self.cat([self.a(x) + 4.0, self.b(x) - 4.0])


@pytest.mark.parametrize("table_off", [False, True], ids=["fused", "one_level_off"])
def test_concat_runs_on_qlinear_concat_only_where_exact(table_off, tmp_path, monkeypatch) -> None:
    q, data = _w8a8(Branches(), (16, 3, 8, 8), seed=1)
    (cat,) = [d for d in convert(q, data[0][:2]).layers.values() if d.kind == "cat"]
    assert len({(g.scale, g.zero_point) for g in (*cat.inputs, cat.output)}) == 3  # requantized
    if table_off:
        real = lookup._runtime_levels

        def one_level_off(op, fused, grids, out, levels):
            tables = real(op, fused, grids, out, levels)
            tables[1] = tables[1].copy()
            tables[1][0] ^= np.uint8(1)
            return tables

        monkeypatch.setattr(lookup, "_runtime_levels", one_level_off)
    paths = export_model(q, tmp_path, data[0][:1], targets=("onnx",))
    ops = runtime_graph(paths["onnx"])["ops"]
    assert ("QLinearConcat" in ops) != table_off, ops
    assert ("Concat" in ops) == table_off, ops
    onnx = verify_artifacts(q, paths, data)["runtimes"]["onnx"]
    assert onnx["agreement"] == 1.0 and onnx["max_abs_diff"] == 0.0, onnx
