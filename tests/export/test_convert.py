"""convert(): integer weights / bias, input grids found without tracing, float islands."""

from __future__ import annotations

import warnings

import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from export_helpers import max_steps, pinned_conv, quantize, recipe
from torch import nn

import qat
from qat import snap_bias
from qat.export.convert import convert
from qat.export.onnx import build_onnx_model
from qat.export.torchscript import build_integer_model, trace_integer_model
from qat.ops import Add
from qat.quant.grids import ActGrid


def _batch() -> torch.Tensor:
    return torch.randn(8, 3, 6, 6)


class Functional(nn.Module):
    """Grid-preserving ops written inline: F.relu, F.max_pool2d, view, torch.flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)  # no ReLU fused: its output has a zero point
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 3 * 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))
        h = F.max_pool2d(h, 2)
        h = self.conv2(h)
        h = h.view(h.size(0), -1)[:, : 8 * 3 * 3].reshape(h.size(0), -1)
        return self.fc(torch.flatten(h, 1))


def _runtimes_match(q: nn.Module, x: torch.Tensor, tol: float = 1.0 + 1e-4) -> None:
    converted = convert(q, x[:2])
    with torch.no_grad():
        ref = q(x)
    traced = trace_integer_model(build_integer_model(q, x[:2], converted), x[:2])
    with torch.no_grad():
        ts = traced(x)
    sess = ort.InferenceSession(
        build_onnx_model(q, x[:2], converted).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    onnx_out = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    if converted.output is None:  # float logits: no output step; a level flipped upstream
        atol = 0.01 * float(ref.abs().max())  # moves them by a fraction of a percent
        torch.testing.assert_close(ts, ref, atol=atol, rtol=0)
        torch.testing.assert_close(onnx_out, ref, atol=atol, rtol=0)
        assert torch.equal(ts.argmax(1), ref.argmax(1))
        assert torch.equal(onnx_out.argmax(1), ref.argmax(1))
        return
    scale = converted.output.scale
    assert max_steps(ts, ref, scale) <= tol
    assert max_steps(onnx_out, ref, scale) <= tol


def test_integer_weights_and_bias_are_the_fake_quant_ones() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    q = quantize(Wrap(model), recipe(4), _batch)
    desc = convert(q, _batch()).layers["m.0"]
    layer = q.m[0]
    w, b = layer.folded_params()
    wd = desc.weight
    assert wd.int_weight.dtype == torch.int8
    assert int(wd.int_weight.min()) >= -8 and int(wd.int_weight.max()) <= 7
    # Bitwise the weight the fake-quant forward used.
    assert torch.equal(wd.float_weight, layer.weight_quant(w.detach()))
    s_in = q.input_quant.qparams()[0]
    torch.testing.assert_close(desc.bias_scale, (s_in * wd.scale).float(), rtol=0, atol=0)
    assert desc.bias_int.dtype == torch.int32
    torch.testing.assert_close(
        desc.bias_int.double() * desc.bias_scale.double(),
        b.detach().double(),
        atol=float(desc.bias_scale.max()) / 2 + 1e-9,
        rtol=0,
    )


class Wrap(nn.Module):
    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(x)


def test_input_grids_are_found_through_functional_ops() -> None:
    torch.manual_seed(0)
    q = quantize(Functional(), recipe(8), _batch)
    c = convert(q, _batch())
    conv_out = c.layers["conv"].output
    # F.relu / F.max_pool2d make new tensors on conv's grid: found by value.
    assert c.layers["conv2"].inputs == (conv_out,)
    # view / reshape / flatten share storage with conv2's output: found by storage.
    assert c.layers["fc"].inputs == (c.layers["conv2"].output,)
    assert c.input == c.layers["conv"].inputs[0]
    _runtimes_match(q, torch.randn(16, 3, 6, 6))


def test_layer_called_on_two_grids_is_refused_after_the_module_swap() -> None:
    # A captured graph gives each call its own layer (tests/quant/test_graph_capture.py); the
    # module swap keeps one module, whose one input grid export cannot choose.
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 3, 1)
            self.b = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x)) + self.b(x) * 0

    q = quantize(Twice(), recipe(8), _batch, steps=0, capture="modules")
    with pytest.raises(ValueError, match=r"layer b is called several times on different"):
        convert(q, _batch())


def test_act_grid_container() -> None:
    g = ActGrid(scale=0.5, zero_point=8, qmin=0, qmax=15, bits=4, signed=True, source="x")
    assert g.clamp_levels() == (0, 15) and g.clamp_levels(relu=True) == (8, 15)
    assert g.needs_clamp() and g.real_range(relu=True) == (0.0, 3.5)
    x = torch.tensor([-10.0, -0.25, 0.25, 0.75, 10.0])
    assert g.quantize(x).tolist() == [0, 8, 8, 10, 15]  # round half to even
    assert g.contains(torch.tensor([-4.0, 0.0, 3.5])) and not g.contains(torch.tensor([0.25]))


def test_snap_bias_makes_the_fake_model_add_the_int32_bias() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    q = quantize(Wrap(model), recipe(4), _batch)
    before = convert(q, _batch()).layers["m.0"]
    assert snap_bias(q, _batch()) == ["m.0"]
    after = convert(q, _batch()).layers["m.0"]
    assert torch.equal(after.bias_int, before.bias_int)  # the runtimes' bias did not move
    _, b = q.m[0].folded_params()
    # The fake-quant forward now adds exactly (to a float32 ulp) the int32 bias.
    torch.testing.assert_close(b, after.dequantized_bias, rtol=2e-7, atol=0)


# ----------------------------------------------------------------------------- float islands
class Islands(nn.Module):
    """Hardswish (QAct), a skipped layer (FloatLayer), float weights, float logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.Hardswish()
        self.skipped = nn.Conv2d(8, 8, 1)
        self.wfloat = nn.Conv2d(8, 8, 3, padding=1)
        self.res = Add()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv(x))
        h = self.res(self.skipped(h), self.wfloat(h))
        return self.fc(self.flat(self.pool(h)))


@pytest.mark.parametrize("float_logits", [False, True])
def test_float_islands_match(float_logits: bool) -> None:
    torch.manual_seed(0)
    overrides = [
        {"pattern": "skipped", "skip": True},
        {"pattern": "wfloat", "weight": {"bits": 32}},
    ]
    if float_logits:
        overrides.append({"pattern": "fc", "activation": {"bits": 32}})
    q = quantize(Islands(), recipe(8, overrides=overrides), _batch)
    c = convert(q, _batch())
    assert c.layers["act"].kind == "act" and c.layers["skipped"].kind == "float"
    assert not c.layers["wfloat"].integer and c.layers["conv"].integer
    assert (c.output is None) == float_logits
    _runtimes_match(q, torch.randn(16, 3, 6, 6))


def test_sequential_root_converts() -> None:
    """prepare() keeps input_quant out of an nn.Sequential root's forward: one call, converts."""
    q = quantize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), recipe(8), _batch, steps=0)
    assert convert(q, _batch()).layers


class _Saturating(nn.Module):
    """A conv whose u8×s8 pair sums reach 2·255·|w|max: int16 overflow at full 8-bit weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)  # every weight at the top of its per-channel grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _saturating_model(reduce_range: bool) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    rec = {"weight": {"bits": 8, "reduce_range": reduce_range}, "activation": {"bits": 8}}
    # Inputs near the top of the u8 input grid (zero point 0): every product is maximal.
    x = torch.rand(4, 4, 3, 3) * 0.05 + 0.95
    x[:, :, 0, 0] = 0.0  # the input grid starts at 0: zero point 0, so q(x) ≈ 255
    q = qat.prepare(_Saturating(), rec)
    qat.calibrate(q, [x])
    return q.eval(), x


def test_default_weights_cannot_saturate_x86_int16_pair_sums() -> None:
    # With the default weight.reduce_range, |w| ≤ 64: the worst case still matches exactly on
    # every x86 CPU (VNNI or not).
    q, x = _saturating_model(reduce_range=True)
    assert q.conv.weight_quant.quant_range == (-64, 63)
    _runtimes_match(q, x)


def test_full_range_8_bit_weights_warn_about_saturation() -> None:
    q, x = _saturating_model(reduce_range=False)
    with pytest.warns(UserWarning, match="without VNNI"):
        convert(q, x[:1])


def _biased_conv(s_out: float) -> nn.Module:
    """Input and weight steps 1, bias 0.5: halfway between two int32 levels."""
    return pinned_conv(2, 1.0, 1.0, s_out, weight=1.0, bias=0.5)


def test_snap_bias_warns_when_the_bias_grid_is_coarser_than_the_output_step() -> None:
    # s_in·s_w = 1 against an output step of 0.25: the bias moves by 0.5, two output steps.
    q = _biased_conv(s_out=0.25)
    with pytest.warns(UserWarning, match=r"bias grid .* body \(mean 2\.00, max 2\.00\)"):
        assert snap_bias(q, torch.rand(2, 1, 2, 2)) == ["body"]
    assert float(q.body.bias.detach()) in (0.0, 1.0)  # still snapped: the runtimes add that bias


def test_snap_bias_is_quiet_when_the_bias_grid_is_fine() -> None:
    q = _biased_conv(s_out=50.0)  # the same 0.5 move is 0.01 of an output step
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert snap_bias(q, torch.rand(2, 1, 2, 2)) == ["body"]
