"""Quantized layers: simulated BN folding, from_float / to_float, residual add."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qat
from qat.ops import Add
from qat.quant.control import iter_quantizers, set_fake_quant, set_observers
from qat.quant.fold import fold_bn
from qat.quant.layers import QAdd, QConv2d, QConvBn2d, QLinear


def conv_bn(groups: int = 1, bias: bool = False) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=groups, bias=bias)
    bn = nn.BatchNorm2d(8)
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return conv, bn


def quant_off(module: nn.Module) -> nn.Module:
    set_fake_quant(module, False)
    set_observers(module, False)
    return module


@pytest.mark.parametrize("groups", [1, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_simulated_fold_equals_conv_bn_in_eval(groups: int, bias: bool) -> None:
    conv, bn = conv_bn(groups, bias)
    q = quant_off(QConvBn2d.from_float(conv, bn)).eval()
    x = torch.randn(4, 8, 10, 10)
    ref = bn.eval()(conv(x))
    torch.testing.assert_close(q(x), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(fold_bn(conv, bn)(x), ref, atol=1e-5, rtol=0)


def test_simulated_fold_training_matches_conv_bn_training() -> None:
    conv, bn = conv_bn()
    q = quant_off(QConvBn2d.from_float(conv, bn)).train()
    bn.train()
    x = torch.randn(16, 8, 6, 6)
    torch.testing.assert_close(q(x), bn(conv(x)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q.bn.running_mean, bn.running_mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(q.bn.running_var, bn.running_var, atol=1e-6, rtol=1e-5)


def test_frozen_bn_trains_on_the_folded_graph() -> None:
    conv, bn = conv_bn()
    q = QConvBn2d.from_float(conv, bn, relu=True)
    x = torch.randn(8, 8, 6, 6)
    q.train()
    q(x)  # initialise ranges
    q.freeze_bn_stats()
    set_observers(q, False)
    stats = q.bn.running_mean.clone()
    train_out = q(x)
    assert torch.equal(q.bn.running_mean, stats)
    assert torch.equal(train_out, q.eval()(x))  # training forward == eval (export) forward


def test_folded_weight_is_what_the_quantizer_sees() -> None:
    conv, bn = conv_bn()
    q = QConvBn2d.from_float(conv, bn).eval()
    q.weight_quant.train()  # observe in eval mode
    q(torch.randn(2, 8, 5, 5))
    w, _ = q.folded_params()
    torch.testing.assert_close(q.weight_quant.max_val, w.flatten(1).amax(1), atol=0, rtol=0)


def test_bn_fold_guards_zero_gamma() -> None:
    conv, bn = conv_bn()
    with torch.no_grad():
        bn.weight[0] = 0.0
    q = QConvBn2d.from_float(conv, bn).train()
    out = q(torch.randn(4, 8, 5, 5))
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("cls", [QConv2d, QLinear])
def test_from_float_to_float_round_trip(cls: type) -> None:
    float_mod = nn.Conv2d(3, 4, 3, groups=1) if cls is QConv2d else nn.Linear(5, 6)
    q = quant_off(cls.from_float(float_mod))
    back = q.to_float()
    x = torch.randn(2, 3, 6, 6) if cls is QConv2d else torch.randn(2, 5)
    assert torch.equal(back(x), float_mod(x))
    assert torch.equal(q(x), float_mod(x))


def test_qconvbn_to_float_round_trip() -> None:
    conv, bn = conv_bn()
    q = QConvBn2d.from_float(conv, bn, relu=True)
    seq = q.to_float().eval()
    x = torch.randn(2, 8, 5, 5)
    torch.testing.assert_close(seq(x), torch.relu(bn.eval()(conv(x))), atol=0, rtol=0)


def test_qadd_quantizes_sum_and_relu() -> None:
    add = QAdd.from_float(Add(relu=True))
    a, b = torch.randn(100), torch.randn(100)
    add.train()
    out = add(a, b)
    scale, zp = add.output_quant.qparams()
    assert int(zp) == 0  # after ReLU the range starts at 0
    levels = out / scale
    torch.testing.assert_close(levels, torch.round(levels), atol=1e-4, rtol=0)
    assert float(out.min()) == 0.0


def test_module_state_dict_round_trip() -> None:
    conv, bn = conv_bn()
    a = QConvBn2d.from_float(conv, bn, relu=True).train()
    x = torch.randn(4, 8, 6, 6)
    a(x)
    a.freeze_bn_stats()
    b = QConvBn2d.from_float(*conv_bn(), relu=True)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    a.eval()
    b.eval()
    assert torch.equal(a(x), b(x))
    assert b.is_bn_frozen
    assert [n for n, _ in iter_quantizers(b)] == ["weight_quant", "output_quant"]


def test_runtime_numerics_sum_in_float64_in_eval_only() -> None:
    from qat import runtime_numerics

    torch.manual_seed(0)
    conv = nn.Conv2d(64, 8, 3)
    q = qat.prepare(nn.Sequential(conv), {"weight": {"bits": 8}, "activation": {"bits": 8}})
    x = torch.randn(2, 64, 6, 6)
    qat.calibrate(q, [x])
    q.eval()
    layer = q[0]
    xq = q.input_quant(x)
    w = layer.weight_quant(layer.weight)
    exact = F.conv2d(xq.double(), w.double(), layer.bias.double()).float()
    with torch.no_grad(), runtime_numerics(q):
        y = layer.output_quant(exact)
        assert torch.equal(q(x), y)
    # Outside the context, and in training mode, the float32 path runs.
    with torch.no_grad():
        assert torch.equal(q(x), layer.output_quant(F.conv2d(xq, w, layer.bias)))
