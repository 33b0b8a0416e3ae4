"""Post-training baselines (RTN, GPTQ, AWQ) on the recipes' own grids.

GPTQ with an identity Hessian is round-to-nearest; with correlated inputs it reproduces a
layer's outputs better than RTN. Every method leaves weights the frozen fake quantizer maps to
themselves (so the exporters write exactly them), and AWQ's scale folding keeps the float model.
"""

from __future__ import annotations

import pytest
import torch

import qat
from qat.quant.layers import QLinear
from qat.quant.ptq import awq, gptq, rtn
from qat.quant.ptq.common import rows_of, rtn_weight
from qat.quant.ptq.gptq import gptq_weight
from qat.quant.spec import QuantSpec

GRIDS = [
    {"bits": 4, "group_size": 32, "grid": "q4_0"},
    {"bits": 4, "group_size": 32},
    {"bits": 8, "reduce_range": True},
]


def _quantizer(spec: dict, out: int = 16, inp: int = 64) -> qat.FakeQuantizer:
    layer = QLinear(inp, out, weight_spec=QuantSpec(per_channel=True, **spec))
    return layer.weight_quant


@pytest.mark.parametrize("spec", GRIDS, ids=["q4_0", "int4_g32", "int8_channel"])
def test_gptq_with_identity_hessian_is_round_to_nearest(spec: dict) -> None:
    w = torch.randn(16, 64) * 0.1
    q = _quantizer(spec)
    values, scales = gptq_weight(w, torch.eye(64, dtype=torch.float64), q, damp=0.0)
    expected, expected_scales = rtn_weight(w, q)
    assert torch.equal(values, expected)
    assert torch.equal(scales, expected_scales)


@pytest.mark.parametrize("spec", GRIDS[:2], ids=["q4_0", "int4_g32"])
def test_gptq_reproduces_correlated_outputs_better_than_rtn(spec: dict) -> None:
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(8, 64, generator=g)
    x = torch.randn(2048, 8, generator=g) @ basis + 0.05 * torch.randn(2048, 64, generator=g)
    w = torch.randn(16, 64, generator=g) * 0.1
    q = _quantizer(spec)
    h = 2 * x.double().t() @ x.double() / len(x)
    gptq_w, _ = gptq_weight(w, h, q)
    rtn_w, _ = rtn_weight(w, q)
    err = lambda v: float((x @ (v - w).t()).pow(2).mean())  # noqa: E731
    assert err(gptq_w) < 0.7 * err(rtn_w)


@pytest.fixture(scope="module")
def tiny() -> tuple:
    from lm_helpers import float_gpt, lm_recipe, lm_test_batches

    return float_gpt, lm_recipe("lm_q4_0"), lm_test_batches(3)


def _prepared(tiny: tuple) -> torch.nn.Module:
    float_gpt, recipe, batches = tiny
    model = qat.prepare(float_gpt(), recipe, example_inputs=batches[0][0][:2])
    qat.calibrate(model, batches[:1], num_batches=1)
    return model


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_ptq_weights_are_fixed_points_of_the_frozen_quantizers(method: str, tiny: tuple) -> None:
    model = _prepared(tiny)
    batches = tiny[2]
    if method == "rtn":
        rtn(model)
    elif method == "gptq":
        gptq(model, batches[:2])
    else:
        report = awq(model, batches[:2])
        # The pre-LN blocks' norms feed qkv / fc / the head directly: those scales fold.
        assert {"blocks.0.attn.qkv", "blocks.0.mlp.fc", "head"} <= {
            n for names in report["scaled"].values() for n in names
        }
    for name, m in model.named_modules():
        if isinstance(m, QLinear):
            q = m.weight_quant
            assert not bool(q.observer_enabled), name
            model.train()  # frozen: training mode no longer moves the scales
            with torch.no_grad():
                assert torch.equal(q(m.weight), m.weight), name
            model.eval()


def test_awq_scale_folding_keeps_the_float_model(tiny: tuple) -> None:
    from qat.quant.ptq.awq import _fold

    model = _prepared(tiny)
    x = tiny[2][0][0]
    qat.set_fake_quant(model, False)
    with torch.no_grad():
        before = model(x)
        s = torch.rand(64) + 0.5
        _fold(model.blocks[0].ln1, [model.blocks[0].attn.qkv], s)
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert rows_of(model.blocks[0].attn.qkv).shape == (192, 64)
