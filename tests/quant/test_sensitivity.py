"""qat.sensitivity: per-layer loss change at each candidate width, on a few batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qat
from qat.quant.bit_allocation import SCALE_BYTES, allocate_bits, layer_cost
from qat.quant.sensitivity import quant_units


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()


RECIPE = {
    "weight": {"bits": 4},
    "activation": {"bits": 4},
    "overrides": [{"pattern": "@last", "activation": {"bits": 32}}],
}


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g))]


def _prepared(overrides: list[dict] | None = None) -> nn.Module:
    recipe = dict(RECIPE, overrides=RECIPE["overrides"] + (overrides or []))
    return qat.prepare(_net(), qat.Recipe.from_dict(recipe), example_inputs=torch.randn(2, 1, 8, 8))


def _calibrated_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The cross-entropy of ``model`` on ``(x, y)``, calibrated on ``x``: the loss a
    measurement compares with, computed by hand."""
    qat.calibrate(model, [x])
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


@pytest.mark.parametrize("context", ["top", "preset"])
def test_measure_is_the_loss_of_that_layer_alone_at_that_width(context: str) -> None:
    model = _prepared()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sens = qat.sensitivity(model, _data(), candidates=(2, 8), num_batches=1, context=context)
    assert sens.context == context
    # The quantizers no layer owns (the input's, the pool's): at the highest candidate with
    # context=top, at the preset's 4 bits with context=preset.
    rest = 8 if context == "top" else 4
    # The model passed in is not touched.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    names = [u.name for u in sens.layers]
    assert names == list(quant_units(model)) and len(names) == 3
    head = sens.layers[-1]
    assert not head.activation and sens.layers[0].activation  # float logits: weight only
    assert head.weights == 8 * 4 and head.macs == 8 * 4
    assert sens.layers[1].macs == 8 * 9 * 64  # depthwise 3x3 over 8x8 outputs
    x, y = _data()[0]

    # By hand: everything at 8 bits but one layer at 2, calibrated on the same batch.
    def loss_with(layer: str | None) -> float:
        every = [{"pattern": n, "weight": {"bits": 8}} for n in names]
        every += [{"pattern": n, "activation": {"bits": 8}} for n in names[:-1]]
        every += [{"pattern": "input_quant", "activation": {"bits": rest}}]
        if layer is not None:
            every.append({"pattern": layer, "weight": {"bits": 2}})
            if layer != names[-1]:
                every.append({"pattern": layer, "activation": {"bits": 2}})
        recipe = dict(RECIPE, activation={"bits": rest}, overrides=RECIPE["overrides"] + every)
        m = qat.prepare(
            _net(), qat.Recipe.from_dict(recipe), example_inputs=torch.randn(2, 1, 8, 8)
        )
        return _calibrated_loss(m.eval(), x, y)

    ref = loss_with(None)
    assert sens.reference_loss == pytest.approx(ref, abs=1e-6)
    for u in sens.layers:
        assert u.loss_delta[8] == 0.0
        assert u.loss_delta[2] == pytest.approx(loss_with(u.name) - ref, abs=1e-5)
        assert set(u.acc_delta) == {2, 8}


def test_fisher_is_zero_at_the_top_width_and_grows_as_bits_drop() -> None:
    sens = qat.sensitivity(_prepared(), _data(), candidates=(2, 4, 8), method="fisher")
    for u in sens.layers:
        assert u.loss_delta[8] == 0.0
        assert 0.0 <= u.loss_delta[4] < u.loss_delta[2]
    assert qat.Sensitivity.from_dict(sens.to_dict()) == sens


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="needs a prepared model"):
        qat.sensitivity(_net(), _data())
    with pytest.raises(ValueError, match="candidates=\\[4\\] is invalid"):
        qat.sensitivity(_prepared(), _data(), candidates=[4])
    with pytest.raises(ValueError, match="method='hessian' is invalid"):
        qat.sensitivity(_prepared(), _data(), method="hessian")
    with pytest.raises(ValueError, match="context='all' is invalid"):
        qat.sensitivity(_prepared(), _data(), context="all")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def _mlp_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 64, generator=g), torch.randint(0, 4, (16,), generator=g))]


def _mlp_prepared(extra: list[dict] | None = None) -> nn.Module:
    recipe = {
        "weight": {"bits": 4, "per_channel": True, "group_size": 32},
        "activation": {"bits": 8},
        "overrides": [{"pattern": "@last", "activation": {"bits": 32}}, *(extra or [])],
    }
    return qat.prepare(_mlp(), qat.Recipe.from_dict(recipe), example_inputs=torch.randn(2, 64))


def test_grouped_candidates_measure_that_grid_and_count_its_scales() -> None:
    sens = qat.sensitivity(_mlp_prepared(), _mlp_data(), candidates=["8g0", "4g0", "4G32"])
    # Least precise first: bits, then finer groups.
    assert sens.candidates == ("4g0", "4g32", "8g0")
    first, head = sens.layers
    assert first.scales == {"4g0": 32, "4g32": 64, "8g0": 32}  # 32 rows, 64 inputs
    assert head.scales == {"4g0": 4, "4g32": 4, "8g0": 4}  # 4 rows, 32 inputs: one group
    x, y = _mlp_data()[0]

    # By hand: both layers at 8 bits per channel, one at the candidate's grid.
    def loss_with(layer: str | None, bits: int = 8, group: int = 0) -> float:
        every = [{"pattern": n, "weight": {"bits": 8, "group_size": 0}} for n in ("0", "2")]
        every.append({"pattern": "0", "activation": {"bits": 8}})
        if layer is not None:
            every.append({"pattern": layer, "weight": {"bits": bits, "group_size": group}})
            if layer == "0":
                every.append({"pattern": layer, "activation": {"bits": bits}})
        return _calibrated_loss(_mlp_prepared(every).eval(), x, y)

    ref = loss_with(None)
    assert sens.reference_loss == pytest.approx(ref, abs=1e-6)
    for u in sens.layers:
        for cand, bits, group in (("4g0", 4, 0), ("4g32", 4, 32)):
            want = loss_with(u.name, bits, group) - ref
            assert u.loss_delta[cand] == pytest.approx(want, abs=1e-5), (u.name, cand)
    assert qat.Sensitivity.from_dict(sens.to_dict()) == sens
    # The Fisher estimate sees the finer grid's smaller rounding error.
    fisher = qat.sensitivity(_mlp_prepared(), _mlp_data(), ["4g0", "4g32", "8g0"], method="fisher")
    assert 0.0 < fisher.layers[0].loss_delta["4g32"] < fisher.layers[0].loss_delta["4g0"]
    # The size cost counts each candidate's float32 scales; the overrides carry the group.
    assert layer_cost(first, "4g32", "size") == 64 * 32 / 2 + SCALE_BYTES * 64
    alloc = allocate_bits(sens, sum(layer_cost(u, "4g32", "size") for u in sens.layers))
    for row in alloc.overrides():
        bits, _, group = str(alloc.bits[row["pattern"]]).partition("g")
        assert row["weight"] == {"bits": int(bits), "group_size": int(group)}


def test_grouped_candidates_a_layer_cannot_take_are_refused() -> None:
    with pytest.raises(ValueError, match="group size 64 does not divide the input size 32 of "):
        qat.sensitivity(_mlp_prepared(), _mlp_data(), candidates=["4g64", 8])
    with pytest.raises(ValueError, match=r"layer '0' .* takes no weight groups"):
        qat.sensitivity(_prepared(), _data(), candidates=["4g32", 8])
    with pytest.raises(ValueError, match="candidates=\\['4g3', 8\\] is invalid"):
        qat.sensitivity(_mlp_prepared(), _mlp_data(), candidates=["4g3", 8])
