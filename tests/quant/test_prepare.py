"""prepare(): fusion, overrides, control flow and kwargs; calibrate(); optimizer state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qat
from qat.ops import Add, Cat
from qat.quant.layers import FloatLayer, QAct, QAdd, QConv2d, QConvBn2d, QLinear


class Net(nn.Module):
    """A small residual net with a concat, as the models in qat.models write them."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.body = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 1, bias=False),
            nn.BatchNorm2d(8),
        )
        self.add = Add(relu=True)
        self.side = nn.Conv2d(8, 4, 1)
        self.cat = Cat(dim=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(12, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = self.add(self.body(h), h)
        h = self.cat([h, self.side(h)])
        return self.fc(self.flat(self.pool(h)))


class KwargsNet(nn.Module):
    """Control flow and keyword arguments: no tracer could capture this forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(
        self, image: torch.Tensor, *, mode: str = "mean", scale: float = 1.0
    ) -> torch.Tensor:
        h = self.relu(self.bn(self.conv(image)))
        h = h.mean(dim=(2, 3)) if mode == "mean" else h.amax(dim=(2, 3))
        for _ in range(int(scale)):
            h = h * 1.0
        return self.fc(h)


def test_prepare_swaps_and_fuses() -> None:
    model = qat.prepare(Net())
    assert isinstance(model.stem[0], QConvBn2d) and model.stem[0].relu
    assert isinstance(model.stem[1], nn.Identity) and isinstance(model.stem[2], nn.Identity)
    assert isinstance(model.body[0], QConvBn2d) and model.body[0].groups == 8 and model.body[0].relu
    assert isinstance(model.body[3], QConvBn2d) and not model.body[3].relu
    assert isinstance(model.add, QAdd) and model.add.relu
    assert isinstance(model.side, QConv2d) and isinstance(model.fc, QLinear)
    assert isinstance(model.pool, QAct)
    assert hasattr(model, "input_quant")
    assert qat.is_prepared(model)
    with pytest.raises(ValueError, match="only once"):
        qat.prepare(model)


def test_prepare_leaves_original_untouched() -> None:
    net = Net()
    qat.prepare(net)
    assert not qat.is_prepared(net) and isinstance(net.stem[0], nn.Conv2d)


def test_overrides_by_pattern() -> None:
    recipe = {
        "weight": {"bits": 4},
        "activation": {"bits": 4},
        "overrides": [
            {"pattern": "stem.*", "weight": {"bits": 8}, "activation": {"bits": 8}},
            {"pattern": "fc", "skip": True, "activation": {"bits": 32}},
        ],
    }
    model = qat.prepare(Net(), recipe)
    assert model.stem[0].weight_quant.bits == 8 and model.stem[0].output_quant.bits == 8
    assert model.body[0].weight_quant.bits == 4
    assert isinstance(model.fc, FloatLayer) and not model.fc.output_quant.enabled


def test_unknown_override_pattern_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"'clasifier\*' matches no quantizable layer.*stem\.0"):
        qat.prepare(Net(), {"overrides": [{"pattern": "clasifier*", "weight": {"bits": 8}}]})


def test_control_flow_and_kwargs_model() -> None:
    recipe = {"fuse": [["conv", "bn", "relu"]]}
    model = qat.prepare(KwargsNet(), recipe)
    assert isinstance(model.conv, QConvBn2d) and model.conv.relu
    x = torch.randn(4, 1, 6, 6)
    missing = qat.calibrate(model, [{"image": x, "mode": "max", "scale": 2.0}])
    assert missing == []
    out = model(image=x, mode="max", scale=3.0)
    assert out.shape == (4, 3)
    out_pos = model(x, mode="mean")
    assert out_pos.shape == (4, 3)
    assert model.input_quant.is_initialized


def test_bad_fuse_group() -> None:
    with pytest.raises(ValueError, match="no module named"):
        qat.prepare(KwargsNet(), {"fuse": [["conv", "batchnorm"]]})
    with pytest.raises(ValueError, match="has types"):
        qat.prepare(KwargsNet(), {"fuse": [["fc", "bn"]]})


def test_calibrate_initialises_every_quantizer() -> None:
    model = qat.prepare(Net(), {"weight": {"bits": 4}, "activation": {"bits": 4}})
    batches = [(torch.randn(8, 1, 8, 8), torch.zeros(8)) for _ in range(3)]
    assert qat.calibrate(model, batches, num_batches=2) == []
    assert qat.uninitialized_quantizers(model) == []
    for _, q in qat.iter_quantizers(model):
        assert q.is_initialized and not bool(q.observer_enabled) and bool(q.fake_quant_enabled)
    with pytest.raises(ValueError, match="prepared model"):
        qat.calibrate(Net(), batches)


def test_calibrate_reports_unreached_quantizers() -> None:
    model = qat.prepare(KwargsNet(), {"fuse": [["conv", "bn", "relu"]]})
    model.extra = qat.QLinear.from_float(nn.Linear(2, 2))  # never called by forward
    with pytest.warns(UserWarning, match="saw no calibration data"):
        missing = qat.calibrate(model, [torch.randn(2, 1, 4, 4)])
    assert missing == ["extra.weight_quant", "extra.output_quant"]


@pytest.mark.parametrize("learned", ["none", "lsq", "pact"])
def test_bit_width_change_keeps_optimizer_state(learned: str) -> None:
    act_learned = learned
    w_learned = "lsq" if learned != "none" else "none"
    recipe = {
        "weight": {"bits": 4, "learned": w_learned},
        "activation": {"bits": 4, "learned": act_learned},
    }
    model = qat.prepare(Net(), recipe)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    qat.calibrate(model, [x])
    qat.set_observers(model, learned == "none")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()

    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    params = dict(model.named_parameters())
    state_before = {n: opt.state[p]["step"].clone() for n, p in params.items()}
    for bits in (6, 4):
        qat.anneal_bits(model, bits)
        step()
    assert all(q.bits == 4 for _, q in qat.iter_quantizers(model))
    assert dict(model.named_parameters()).keys() == params.keys()
    for name, p in model.named_parameters():
        assert p is params[name], name
        assert float(opt.state[p]["step"]) == float(state_before[name]) + 2, name


def test_anneal_respects_per_layer_targets() -> None:
    recipe = {
        "weight": {"bits": 4},
        "activation": {"bits": 4},
        "overrides": [{"pattern": "fc", "weight": {"bits": 8}, "activation": {"bits": 8}}],
    }
    model = qat.prepare(Net(), recipe)
    qat.anneal_bits(model, 8)
    assert all(q.bits == 8 for _, q in qat.iter_quantizers(model))
    qat.anneal_bits(model, 2)
    assert model.body[0].weight_quant.bits == 4 and model.fc.weight_quant.bits == 8


def test_prepared_model_state_dict_round_trip() -> None:
    recipe = {"weight": {"bits": 4, "learned": "lsq"}, "activation": {"bits": 4, "learned": "pact"}}
    a = qat.prepare(Net(), recipe)
    x = torch.randn(8, 1, 8, 8)
    qat.calibrate(a, [x])
    a.train()
    a(x).sum().backward()
    qat.anneal_bits(a, 3)
    b = qat.prepare(Net(), recipe)
    b.load_state_dict(a.state_dict())
    a.eval()
    b.eval()
    assert torch.equal(a(x), b(x))


def test_nan_activation_stops_with_the_layer_name() -> None:
    model = qat.prepare(Net())
    qat.calibrate(model, [torch.randn(4, 1, 8, 8)])
    qat.set_observers(model, True)
    model.train()
    with torch.no_grad():
        model.body[3].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(qat.NonFiniteError, match=r"'body\.3\.(weight|output)_quant'"):
        model(torch.randn(4, 1, 8, 8))
    assert model.body[3].weight_quant.name == "body.3.weight_quant"


def test_sequential_root_runs_input_quant_once() -> None:
    seq = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3)
    )
    model = qat.prepare(seq)
    x = torch.randn(2, 1, 8, 8)
    qat.calibrate(model, [x])
    calls = []
    model.input_quant.register_forward_hook(lambda *_: calls.append(1))
    out = model(x)
    assert out.shape == (2, 3) and len(calls) == 1
    assert isinstance(model, nn.Sequential) and "input_quant" in dict(model.named_children())
