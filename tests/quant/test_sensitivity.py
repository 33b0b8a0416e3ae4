"""qat.sensitivity: per-layer loss change at each candidate width, on a few batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qat
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
        m.eval()
        qat.calibrate(m, [x])
        with torch.no_grad():
            return float(F.cross_entropy(m(x), y))

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
