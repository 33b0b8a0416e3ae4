"""``torch.compile`` of a fake-quant model trains: live and frozen BN, observers on."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qat
from qat.quant.layers import QConvBn2d


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)) + h)
        return self.fc(h.mean(dim=(2, 3)))


# About a minute on 2 cores: inductor compiles the forward and the backward.
@pytest.mark.slow
@pytest.mark.parametrize("frozen", [False, True], ids=["live_bn", "frozen_bn"])
def test_a_compiled_fake_quant_model_trains_like_the_eager_one(frozen: bool) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    model = qat.prepare(_Net(), example_inputs=x[:2])
    qat.calibrate(model, [x])
    if frozen:
        for m in model.modules():
            if isinstance(m, QConvBn2d):
                m.freeze_bn_stats()
    eager, compiled = model.train(), copy.deepcopy(model).train()
    step = torch.compile(compiled)
    losses = {}
    for name, net, fn in (("eager", eager, eager), ("compiled", compiled, step)):
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        for _ in range(2):  # the second step runs on what the first one updated
            loss = nn.functional.cross_entropy(fn(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses[name] = float(loss)
    assert abs(losses["eager"] - losses["compiled"]) < 1e-3, losses
    for (name, a), b in zip(
        eager.state_dict().items(), compiled.state_dict().values(), strict=True
    ):
        assert torch.allclose(a.float(), b.float(), atol=1e-4), name  # BN statistics too


@pytest.mark.slow
def test_a_calibrated_training_model_compiles_to_one_graph() -> None:
    """Bit widths and mode flags are Python state: Dynamo traces every branch on them."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    model = qat.prepare(_Net(), example_inputs=x[:2])
    qat.calibrate(model, [x])
    explanation = torch._dynamo.explain(model.train())(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
