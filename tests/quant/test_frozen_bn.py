"""A conv+BN with frozen statistics: the folded graph's values, batch norm's projected gradient."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import qat
from qat.quant.layers.conv_bn import _FrozenBatchNorm


def _bn_case(seed: int = 0) -> tuple[torch.Tensor, nn.BatchNorm2d]:
    torch.manual_seed(seed)
    z = torch.randn(6, 4, 5, 5) * torch.tensor([0.5, 2.0, 1.0, 3.0]).reshape(1, 4, 1, 1) + 1.5
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(0, 2)
        bn.running_var.uniform_(0.5, 4)
    return z, bn


def test_the_forward_is_batch_norm_with_the_frozen_statistics() -> None:
    z, bn = _bn_case()
    frozen = _FrozenBatchNorm.apply(z, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    with torch.no_grad():
        expect = bn.eval()(z)
    assert torch.allclose(frozen, expect, atol=1e-6)


def test_the_input_gradient_is_the_projection_at_the_frozen_scale() -> None:
    z, bn = _bn_case(1)
    z.requires_grad_(True)
    g = torch.randn_like(z)
    out = _FrozenBatchNorm.apply(z, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    out.backward(g)
    dims = (0, 2, 3)
    mean, var = z.detach().mean(dims, keepdim=True), z.detach().var(dims, False, keepdim=True)
    z_hat = (z.detach() - mean) / torch.sqrt(var + bn.eps)
    f = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(1, -1, 1, 1)
    projected = g - g.mean(dims, keepdim=True) - z_hat * (g * z_hat).mean(dims, keepdim=True)
    assert torch.allclose(z.grad, f.detach() * projected, atol=1e-5)
    # No gradient along the batch mean or the batch scale of a channel (batch norm's invariance;
    # the scale only to eps / var, as in batch norm's own backward).
    assert torch.allclose(z.grad.sum(dims), torch.zeros(4), atol=1e-4)
    assert torch.allclose((z.grad * z_hat).sum(dims), torch.zeros(4), atol=1e-3)


def test_with_matching_statistics_it_is_batch_norms_own_gradient() -> None:
    z, bn = _bn_case(2)
    dims = (0, 2, 3)
    with torch.no_grad():  # running statistics equal to this batch's (biased variance)
        bn.running_mean.copy_(z.mean(dims))
        bn.running_var.copy_(z.var(dims, unbiased=False))
    z1, z2 = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    g = torch.randn_like(z)
    _FrozenBatchNorm.apply(
        z1, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps
    ).backward(g)
    F.batch_norm(z2, None, None, bn.weight, bn.bias, True, 0.0, bn.eps).backward(g)
    assert torch.allclose(z1.grad, z2.grad, atol=1e-5)


def test_a_frozen_conv_bn_trains_on_the_eval_graph_values() -> None:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    q = qat.prepare(body, example_inputs=torch.randn(2, 3, 6, 6))
    x = torch.randn(8, 3, 6, 6)
    qat.calibrate(q, [x])
    layer = q[0]
    layer.freeze_bn_stats()
    stats = (layer.bn.running_mean.clone(), layer.bn.running_var.clone())
    q.train()
    y_train = q(x)
    with torch.no_grad():
        y_eval = q.eval()(x)
    # Training values of the frozen layer are the folded graph's (to float rounding: the
    # training forward un-scales the weight, the eval forward folds it).
    scale = float(layer.output_quant.qparams()[0])
    assert (y_train.detach() - y_eval).abs().max() <= scale * 1.0001
    y_train.sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    assert torch.equal(layer.bn.running_mean, stats[0]) and torch.equal(
        layer.bn.running_var, stats[1]
    )
