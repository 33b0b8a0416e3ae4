"""A conv+BN with frozen statistics: the folded graph's values, and that graph's own gradient."""

from __future__ import annotations

import torch
from torch import nn

import qat
from qat.quant.layers import QConvBn2d


def _bn_case(seed: int = 0) -> tuple[torch.Tensor, QConvBn2d]:
    torch.manual_seed(seed)
    z = torch.randn(6, 4, 5, 5) * torch.tensor([0.5, 2.0, 1.0, 3.0]).reshape(1, 4, 1, 1) + 1.5
    layer = QConvBn2d(4, 4, 1)
    bn = layer.bn
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(0, 2)
        bn.running_var.uniform_(0.5, 4)
    return z, layer


def test_the_forward_is_batch_norm_with_the_frozen_statistics() -> None:
    z, layer = _bn_case()
    frozen = layer._frozen_bn(z)
    with torch.no_grad():
        expect = layer.bn.eval()(z)
    assert torch.allclose(frozen, expect, atol=1e-6)


def test_the_gradients_are_the_folded_graphs_own() -> None:
    """``γ/σ · g`` for the input, mean and scale components included (what lets the frozen
    network correct its statistics' drift); ``γ`` and ``β`` get the frozen forward's."""
    z, layer = _bn_case(1)
    bn = layer.bn
    z.requires_grad_(True)
    g = torch.randn_like(z)
    layer._frozen_bn(z).backward(g)
    dims = (0, 2, 3)
    inv_std = torch.rsqrt(bn.running_var + bn.eps).reshape(1, -1, 1, 1)
    f = bn.weight.detach().reshape(1, -1, 1, 1) * inv_std
    assert torch.allclose(z.grad, f * g, atol=1e-6)
    assert float(z.grad.sum(dims).abs().min()) > 1e-3  # the mean component is there
    normalized = (z.detach() - bn.running_mean.reshape(1, -1, 1, 1)) * inv_std
    assert torch.allclose(bn.weight.grad, (g * normalized).sum(dims), atol=1e-5)
    assert torch.allclose(bn.bias.grad, g.sum(dims), atol=1e-5)


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
