"""Bias-aware QAT (qat.link_bias_quantizers): the bias trains on the int32 grid the runtimes add it on."""

from __future__ import annotations

import copy
import warnings

import torch
from export_helpers import Wrap, pinned_conv, recipe
from torch import nn

import qat
from qat import snap_bias
from qat.quant.bias import grid_bias
from qat.quant.integer_bias import link_bias_quantizers
from qat.quant.layers import QConvBn2d


def _coarse_conv() -> nn.Module:
    """s_in·s_w = 1 against an output step of 0.25; bias 0.3 rounds to 0 on the int32 grid."""
    q = pinned_conv(2, 1.0, 1.0, 0.25, weight=1.0, bias=0.3)
    q.qat_recipe["quantize_bias"] = True  # as prepare() records Recipe(quantize_bias=True)
    return q


def test_linked_layer_computes_what_snap_bias_makes_it_compute() -> None:
    q, x = _coarse_conv(), torch.rand(4, 1, 2, 2)
    float_bias_out = q(x)
    assert link_bias_quantizers(q, x) == ["body"]
    assert q.body.bias_input_quant is q.input_quant
    assert "bias_input_quant" not in dict(q.body.named_modules())  # a reference, no submodule
    trained = q(x)
    # Inputs on levels 0 / 1 give 0.3 / 1.3 with the float bias, 0 / 1 with the int32 bias
    # (0); the 2-bit output grid (step 0.25) tops out at 0.75.
    assert not torch.equal(trained, float_bias_out)
    assert torch.equal(trained, q.input_quant(x).clamp(max=0.75))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # trained on the grid: no coarse-grid warning
        assert snap_bias(q, x) == ["body"]
    assert float(q.body.bias.detach()) == 0.0
    assert torch.equal(q(x), trained)
    with qat.runtime_numerics(q):
        assert torch.equal(q(x), trained)


def test_bias_gradient_passes_straight_through_the_rounding() -> None:
    q, x = _coarse_conv(), torch.rand(4, 1, 2, 2)
    link_bias_quantizers(q, x)
    q.train()
    qat.set_observers(q, False)
    q.body.output_quant.enable_fake_quant(False)  # the conv's sum itself
    out = q(x)
    assert torch.equal(out, q.input_quant(x) * 1.0)  # weight 1, bias 0 on its grid
    out.sum().backward()
    assert float(q.body.bias.grad) == out.numel()


def test_unlinked_layers_and_disabled_input_quantizers_keep_the_float_bias() -> None:
    q, x = _coarse_conv(), torch.rand(4, 1, 2, 2)
    assert grid_bias(q.body, q.body.bias) is None
    link_bias_quantizers(q, x)
    q.input_quant.enable_fake_quant(False)
    assert grid_bias(q.body, q.body.bias) is None
    # Relinking with the input quantizer off finds no input grid: the link is dropped.
    assert link_bias_quantizers(q, x) == []
    assert q.body.bias_input_quant is None


def test_conv_bn_on_batch_statistics_shifts_by_the_folded_bias_rounding() -> None:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3))
    rec = {**recipe(2), "quantize_bias": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = qat.prepare(Wrap(body), rec)
        x = torch.randn(8, 2, 5, 5)
        qat.calibrate(q, [x])
    layer = q.body[0]
    assert isinstance(layer, QConvBn2d)
    with torch.no_grad():
        layer.bn.bias.uniform_(-1.0, 1.0)  # folded biases off the coarse 2-bit grid
    plain = copy.deepcopy(q)
    assert link_bias_quantizers(q, x) == ["body.0"]
    for m in (q, plain):
        m.train()
        qat.set_observers(m, False)
        m.body[0].bn.momentum = 0.0  # both forwards see the same running statistics
        m.body[0].output_quant.enable_fake_quant(False)
    folded = layer.folded_params()[1].detach()
    shift = grid_bias(layer, folded) - folded
    assert float(shift.abs().max()) > 0
    diff = q(x) - plain(x)
    torch.testing.assert_close(diff, shift.reshape(1, -1, 1, 1).expand_as(diff))
