"""verify_artifacts / check_parity reports, and benchmark_artifacts (structure, not timings)."""

from __future__ import annotations

import json

import pytest
import torch
from export_helpers import quantize, recipe
from torch import nn

from qat.export import (
    ParityError,
    benchmark_artifacts,
    check_parity,
    export_model,
    verify_artifacts,
)
from qat.export.torchscript import ENGINE, numerics_target


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(self.pool(self.conv(x))))


def _batch() -> torch.Tensor:
    return torch.rand(8, 1, 5, 5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[nn.Module, nn.Module, dict]:
    torch.manual_seed(0)
    float_model = Small()
    q = quantize(float_model, recipe(8), _batch)
    paths = export_model(q, tmp_path_factory.mktemp("small"), _batch())
    return float_model, q, paths


def test_report_structure(exported) -> None:
    _, q, paths = exported
    batches = [(torch.rand(16, 1, 5, 5), torch.randint(0, 3, (16,))) for _ in range(3)]
    report = verify_artifacts(q, paths, batches, max_batches=2)
    assert report["num_samples"] == 32
    assert report["output_scale"] == pytest.approx(float(q.fc.output_quant.qparams()[0]))
    assert set(report["runtimes"]) == {"torchscript", "onnx"}
    for name, r in report["runtimes"].items():
        # The TorchScript figures say which quantized engine they were measured on, and which
        # fake-quant numerics they were held to.
        engine = {"engine", "numerics"} if name == "torchscript" else set()
        assert set(r) == {
            "accuracy",
            "agreement",
            "max_abs_diff",
            "mean_abs_diff",
            "max_diff_steps",
            "num_samples",
            *engine,
        }
        assert 0.0 <= r["agreement"] <= 1.0 and r["max_diff_steps"] <= 1.0 + 1e-4
    assert report["runtimes"]["torchscript"]["engine"] == ENGINE == "x86"
    assert report["runtimes"]["torchscript"]["numerics"] == numerics_target("x86")
    json.dumps(report)  # JSON-able for results.json
    check_parity(report, min_agreement=0.9, max_accuracy_drop_pt=100.0)


def test_unlabelled_batches(exported) -> None:
    _, q, paths = exported
    report = verify_artifacts(q, paths, [torch.rand(4, 1, 5, 5)])
    assert report["fake_quant"]["accuracy"] is None
    assert report["runtimes"]["onnx"]["accuracy"] is None
    check_parity(report)


def _report(agreement: float, acc: float) -> dict:
    return {
        "num_samples": 1000,
        "output_scale": 0.1,
        "fake_quant": {"accuracy": 0.9},
        "runtimes": {
            "torchscript": {
                "accuracy": 0.9,
                "agreement": 1.0,
                "max_abs_diff": 0.1,
                "mean_abs_diff": 0.001,
                "max_diff_steps": 1.0,
                "num_samples": 1000,
            },
            "onnx": {
                "accuracy": acc,
                "agreement": agreement,
                "max_abs_diff": 0.4,
                "mean_abs_diff": 0.01,
                "max_diff_steps": 4.0,
                "num_samples": 1000,
            },
        },
    }


def test_check_parity_names_the_runtime_and_numbers() -> None:
    check_parity(_report(0.999, 0.899))  # 0.1 pt drop is allowed
    with pytest.raises(
        ParityError, match=r"onnx: top-1 agreement 99\.5000% < 99\.9000%.*4\.00 output steps"
    ):
        check_parity(_report(0.995, 0.9))
    with pytest.raises(ParityError, match=r"onnx: accuracy 89\.7000% is 0\.300 pt below") as info:
        check_parity(_report(1.0, 0.897))
    assert "torchscript" not in str(info.value)
    assert issubclass(ParityError, RuntimeError)
    with pytest.raises(ValueError, match="min_agreement"):
        check_parity(_report(1.0, 0.9), min_agreement=99.9)


def test_benchmark_structure(exported) -> None:
    float_model, _, paths = exported
    result = benchmark_artifacts(
        paths, float_model, _batch(), batch_sizes=(1, 4), rounds=2, threads=1, min_time=0.001
    )
    assert set(result["runtimes"]) == {"torch_fp32", "ort_fp32", "torchscript", "onnx"}
    for r in result["runtimes"].values():
        assert r["size_bytes"] > 0
        assert set(r["latency_ms"]) == {"1", "4"} and all(v > 0 for v in r["latency_ms"].values())
        assert r["throughput"]["4"] == pytest.approx(4 / (r["latency_ms"]["4"] / 1000))
    ratios = result["ratios"]
    assert set(ratios["speedup_ort_int8_vs_fp32"]) == {"1", "4"}
    assert ratios["size_fp32_vs_onnx"] > 0  # tiny model: overheads dominate its size
    json.dumps(result)


def test_benchmark_times_torchscript_under_each_engine_asked(exported) -> None:
    float_model, _, paths = exported
    result = benchmark_artifacts(
        paths,
        float_model,
        _batch(),
        batch_sizes=(2,),
        rounds=1,
        threads=1,
        min_time=0.001,
        torchscript_engines=["fbgemm", "x86"],
    )
    runtimes = result["runtimes"]
    assert set(runtimes) == {"torch_fp32", "ort_fp32", "torchscript", "torchscript_x86", "onnx"}
    assert runtimes["torchscript"]["engine"] == "fbgemm"
    assert runtimes["torchscript_x86"]["engine"] == "x86"
    assert runtimes["torchscript_x86"]["size_bytes"] == runtimes["torchscript"]["size_bytes"]
    assert set(result["ratios"]["speedup_torchscript_x86_int8_vs_torch_fp32"]) == {"2"}
    assert "engine" not in runtimes["onnx"]
    for bad in (["fbgemm", "fbgemm"], ["fbgem"]):
        with pytest.raises(ValueError, match=r"torchscript_engines=.*distinct engines"):
            benchmark_artifacts(paths, None, _batch(), torchscript_engines=bad)


def test_benchmark_without_float_model(exported) -> None:
    _, _, paths = exported
    result = benchmark_artifacts(paths, None, _batch(), batch_sizes=(2,), rounds=1, min_time=0.001)
    assert set(result["runtimes"]) == {"torchscript", "onnx"}
    assert "speedup_ort_int8_vs_fp32" not in result["ratios"]


def test_benchmark_rejects_bad_batch_size(exported) -> None:
    float_model, _, paths = exported
    with pytest.raises(ValueError, match="batch size"):
        benchmark_artifacts(paths, float_model, _batch(), batch_sizes=(0,))
