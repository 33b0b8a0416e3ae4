"""Mixed precision on a timm model: qat.sensitivity, qat.allocate_bits and the chosen overrides
on timm's resnet10t (built from its config, no download), exported with parity."""

from __future__ import annotations

import copy
import functools
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import qat
from qat.export import export_model, verify_artifacts
from qat.lit.quant_auto import preset_cost
from qat.models import create_model
from qat.quant.sensitivity import quant_units

pytest.importorskip("timm")

#: The W4A4 preset's shape: 4-bit weights and outputs, the first conv and classifier at 8.
RECIPE = {
    "weight": {"bits": 4, "per_channel": True},
    "activation": {"bits": 4},
    "overrides": [
        {"pattern": "@first", "weight": {"bits": 8}},
        {"pattern": "@last", "weight": {"bits": 8}, "activation": {"bits": 32}},
    ],
}


def _batches(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Learnable images: each class its own pattern plus noise."""
    g = torch.Generator().manual_seed(0)
    patterns = torch.randn(10, 3, 32, 32, generator=g)
    out = []
    for _ in range(n):
        y = torch.randint(0, 10, (16,), generator=g)
        out.append((patterns[y] + 0.5 * torch.randn(16, 3, 32, 32, generator=g), y))
    return out


@functools.cache
def _float_model() -> torch.nn.Module:
    """resnet10t trained a few steps: its logits get margins, as a deployed model's have (an
    untrained model's near-ties flip on one requantization rounding at 4 bits)."""
    torch.manual_seed(0)
    model = create_model("timm", arch="resnet10t", num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    model.train()
    for x, y in _batches(4) * 5:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _prepared(recipe: dict) -> torch.nn.Module:
    model = copy.deepcopy(_float_model())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qat.prepare(model, qat.Recipe.from_dict(recipe), example_inputs=_batches(1)[0][0])


@pytest.mark.slow  # ~25 s: 20 float steps, measure 20 layers, export and verify both targets
def test_allocated_widths_prepare_the_timm_model_and_export_with_parity(tmp_path: Path) -> None:
    probe = _prepared(RECIPE)
    sens = qat.sensitivity(probe, _batches(), candidates=(2, 4, 8), num_batches=1)
    units = quant_units(probe)
    assert [u.name for u in sens.layers] == list(units) and len(units) > 10
    budget = preset_cost(probe, "size", None)  # the uniform W4A4 model's size
    alloc = qat.allocate_bits(sens, budget)
    assert alloc.total <= budget and len(set(alloc.bits.values())) > 1, alloc.bits
    model = _prepared({**RECIPE, "overrides": RECIPE["overrides"] + alloc.overrides()})
    for name, quants in quant_units(model).items():  # every layer at its chosen width
        assert {q.bits for q in quants} == {alloc.bits[name]}, name
    qat.calibrate(model, [x for x, _ in _batches()])
    model.eval()
    qat.snap_bias(model, _batches(1)[0][0][:8])  # biases on the int32 grid, as a run does
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = export_model(model, tmp_path, _batches(1)[0][0][:1])
    report = verify_artifacts(model, paths, _batches(4)[2:])  # images not measured on
    for target in ("torchscript", "onnx"):
        assert report["runtimes"][target]["agreement"] >= 0.999, report["runtimes"][target]
