"""BN re-estimation: population statistics, same integer weights, nothing else moved."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qat
from qat.quant.control import iter_quantizers
from qat.quant.layers import QConvBn2d

LSQ3 = {"bits": 3, "per_channel": True, "learned": "lsq", "range_method": "mse"}


def net(weight: dict) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 4),
    )
    # Float activations: the checks compare BN outputs, not activation rounding.
    recipe = {"weight": weight, "activation": {"bits": 32}}
    return qat.prepare(model, recipe)


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(64, 3, 6, 6, generator=g) * 2 + 0.5 for _ in range(n)]


def stale(model: nn.Module, data: list[torch.Tensor]) -> list[QConvBn2d]:
    """A calibrated model whose running statistics describe some other network."""
    qat.calibrate(model, data, num_batches=2)
    layers = [m for m in model.modules() if isinstance(m, QConvBn2d)]
    with torch.no_grad():
        for m in layers:
            m.bn.running_mean.uniform_(-2, 2)
            m.bn.running_var.uniform_(0.05, 20)
    return layers


def train_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The training graph's output (batch-statistics BN), on a copy: BN would update its
    running statistics, and with them the fold factors."""
    model = copy.deepcopy(model).train()
    for _, q in iter_quantizers(model):
        q.eval()
    with torch.no_grad():
        return model(x)


def folded_weights(layers: list[QConvBn2d]) -> list[torch.Tensor]:
    """The integer model's weights, in the conv's units: ``fq(W·f) / f``."""
    out = []
    with torch.no_grad():
        for m in layers:
            f = qat.quant.fold.bn_fold_factor(m.bn).reshape(-1, 1, 1, 1)
            q = copy.deepcopy(m.weight_quant).eval()  # in training, LSQ would cap its scale
            out.append(q(m.weight * f) / f)
    return out


def test_eval_graph_gets_the_batch_statistics_and_keeps_the_integer_weights() -> None:
    model, data = net(LSQ3), batches(4)
    layers = stale(model, data)
    x = torch.cat(data)  # estimated on the same data it is checked on
    batch_stats = train_forward(model, x)
    weights = folded_weights(layers)
    model.eval()
    with torch.no_grad():
        before = model(x)

    names = qat.reestimate_bn(model, [x])
    assert names == ["0", "3"]
    for w, w_after in zip(weights, folded_weights(layers), strict=True):
        # Same integer weights: the grid moved with the fold factor (to rounding of f ratios).
        torch.testing.assert_close(w_after, w, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        after = model(x)
    # Population (here: this batch's) statistics in the eval graph; the unbiased variance
    # BN keeps for running statistics differs from the batch's by n/(n-1), n = 64·36.
    torch.testing.assert_close(after, batch_stats, rtol=1e-3, atol=1e-3)
    assert (before - batch_stats).abs().max() > 10 * (after - batch_stats).abs().max()
    assert not model.training


def test_training_forward_is_unchanged_and_only_bn_and_weight_grids_move() -> None:
    model, data = net(LSQ3), batches(3)
    stale(model, data)
    model.train()
    y0 = train_forward(model, data[0])
    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    qat.reestimate_bn(model, data[1:], num_batches=2)
    assert model.training and all(m.training for m in model.modules())
    moved = {k for k, v in model.state_dict().items() if not torch.equal(v, state0[k])}
    expected = {f"{i}.bn.{s}" for i in ("0", "3") for s in ("running_mean", "running_var")}
    expected |= {
        f"{i}.weight_quant.{s}" for i in ("0", "3") for s in ("scale", "min_val", "max_val")
    }
    assert moved == expected
    torch.testing.assert_close(train_forward(model, data[0]), y0, rtol=1e-4, atol=1e-4)


def test_frozen_layers_are_left_alone() -> None:
    model, data = net(LSQ3), batches(2)
    first, second = stale(model, data)
    first.freeze_bn_stats()
    mean = first.bn.running_mean.clone()
    assert qat.reestimate_bn(model, data) == ["3"]
    assert torch.equal(first.bn.running_mean, mean)
    assert not torch.equal(second.bn.running_mean, mean[: second.out_channels])


def test_per_tensor_weights_warn_that_they_may_re_round() -> None:
    model, data = net({"bits": 4, "per_channel": False}), batches(2)
    stale(model, data)
    with pytest.warns(UserWarning, match="per tensor"):
        qat.reestimate_bn(model, data)


def test_bad_input_changes_nothing() -> None:
    model, data = net(LSQ3), batches(2)
    stale(model, data)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no batches"):
        qat.reestimate_bn(model, [])
    with pytest.raises(ValueError, match="num_batches=0"):
        qat.reestimate_bn(model, data, num_batches=0)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
