"""scripts/timm_sweep.py on timm's own tiny test models: the sweep's fast subset.

timm ships ``test_*`` variants of its families (ResNet, EfficientNet with BatchNormAct2d,
ConvNeXt with LayerNorm2d and GELU, ViT, ByobNet); each goes through the sweep's flow (float
training, prepare with example inputs, calibration, QAT steps, export, verify) and must export
with the parity the full sweep holds every family to, with its graph captured, BN folded into
the convs and nearly every MAC on integer kernels.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "timm_sweep.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("timm_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "arch",
    [
        "test_efficientnet",
        "test_vit",
        "test_byobnet",
        pytest.param("test_resnet", marks=pytest.mark.slow),
        pytest.param("test_convnext", marks=pytest.mark.slow),
    ],
)
def test_tiny_timm_models_export_with_parity(sweep, arch: str, tmp_path) -> None:
    rec = sweep.run_one(arch, tmp_path, bench=False)
    assert rec["status"] == "pass", rec.get("reason", rec)
    assert rec["capture"] == "graph", rec
    for runtime, result in rec["runtimes"].items():
        assert result["agreement"] >= sweep.AGREEMENT, (runtime, result)
    assert rec["integer_mac_share"]["onnx"] >= 0.95, rec["integer_mac_share"]


def test_the_page_counts_the_families_that_pass(sweep) -> None:
    ok = {"family": "resnet", "model": "resnet10t", "status": "pass", "params": 5e6}
    bad = {"family": "vgg", "model": "vgg11", "status": "error", "reason": "export: X: y"}
    page = sweep.render({"resnet": ok, "vgg": bad})
    assert "**1 of 2 families**" in page
    assert "| vgg | vgg11 | 5.0M" not in page and "export: X: y |" in page


def test_float_training_stops_at_its_time_budget_after_the_minimum_steps(sweep) -> None:
    import torch

    model = torch.nn.Linear(4, 3)
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    assert sweep._train(model, batches, 100, 1e-3, True, budget_s=0.0) == sweep.MIN_FLOAT_STEPS
    assert sweep._train(model, batches, 3, 1e-3, True, budget_s=0.0) == 3
    assert sweep._train(model, batches, 7, 1e-3, True) == 7


def test_a_model_verified_before_the_time_limit_keeps_its_row(sweep) -> None:
    out = 'STAGE 3 32 build\nPARTIAL {"model": "m", "status": "pass"}\nSTAGE 290 32 bench\n'
    assert sweep._partial(out.encode()) == {"model": "m", "status": "pass"}
    assert sweep._partial("STAGE 3 32 build\n") is None
    assert sweep._last_stage(out) == " (in bench at 32×32, 290 s in)"
