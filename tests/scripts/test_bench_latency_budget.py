"""scripts/bench_latency_budget.py: a run's exported file timed against its latency budget."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import qat
from qat.export import export_model

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_latency_budget.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_latency_budget", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_dir(path: Path, budget_ms: float | None) -> Path:
    """A finished run folder: export/model.onnx of a small W8A8 conv net, and results.json with
    (or without) a latency budget."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x = torch.randn(4, 1, 8, 8)
    qmodel = qat.prepare(net.eval(), qat.Recipe.from_dict({}), example_inputs=x)
    qat.calibrate(qmodel, [x])
    export_model(qmodel.eval(), path / "export", x[:1], targets=("onnx",))
    mixed = {"cost": "latency", "budget": budget_ms, "target": "onnx", "threads": 1}
    results = {"mixed_precision": mixed if budget_ms is not None else {"cost": "size"}}
    (path / "results.json").write_text(json.dumps(results))
    return path


def test_meets_and_misses_the_runs_budget(bench, tmp_path: Path, capsys) -> None:
    run = _run_dir(tmp_path, budget_ms=1000.0)
    assert bench.main([str(run)]) == 0
    line = capsys.readouterr().out
    assert "ms per image measured vs budget 1000 ms (onnx, 1 thread(s)): meets" in line
    # A budget no file can meet: exit 1, the measured figure printed beside it.
    assert bench.main([str(run), "--budget-ms", "1e-6"]) == 1
    assert "misses the budget" in capsys.readouterr().out


def test_a_run_without_a_latency_budget_needs_one_given(bench, tmp_path: Path, capsys) -> None:
    run = _run_dir(tmp_path, budget_ms=None)
    with pytest.raises(SystemExit) as exit_info:
        bench.main([str(run)])
    assert exit_info.value.code == 2
    assert "has no latency budget in results.json" in capsys.readouterr().err
