"""The ``torchscript_x86`` numerics: oneDNN's requantization, and which layers it applies to.

(The kernels themselves are compared bit for bit in tests/export/test_x86_engine.py.)
"""

from __future__ import annotations

import warnings

import pytest
import torch
from export_helpers import Wrap, recipe
from torch import nn

import qat
from qat.quant.numerics import NUMERICS_TARGETS, ONEDNN_MAX_GROUPS, onednn_levels

# A depthwise conv of MobileNetV2 W4A4: 25 · s_in · s_w / s_out = 3.4999998, 2e-7 below a tie.
S_IN, S_W, S_OUT = 0.2058054655790329, 0.19502262771129608, 0.286690890789032


def _levels(acc: float, s_in: float, s_w: float, s_out: float, zero_point: int) -> float:
    out = onednn_levels(torch.tensor([[acc]], dtype=torch.float64), s_in, torch.tensor([s_w]),
                        s_out, zero_point, out_shape=[1, -1])  # fmt: skip
    return float(out)


def test_the_zero_point_is_added_before_rounding() -> None:
    # acc · M = 1/2 exactly: round(0.5) = 0, but round(0.5 + 1) = 2, one level up.
    assert _levels(1.0, 1.0, 1.0, 2.0, zero_point=0) == 0.0
    assert _levels(1.0, 1.0, 1.0, 2.0, zero_point=1) == 1.0
    assert _levels(3.0, 1.0, 1.0, 2.0, zero_point=1) == 1.0  # round(2.5) = 2


def test_the_scales_apply_one_at_a_time() -> None:
    # fbgemm's float32 multiplier puts 25 · M below the tie; oneDNN's steps put it above.
    m = torch.tensor(S_IN, dtype=torch.float32) * torch.tensor(S_W) / torch.tensor(S_OUT)
    assert float(torch.round(25 * m)) == 3.0
    assert _levels(25.0, S_IN, S_W, S_OUT, zero_point=0) == 4.0


def test_bias_and_per_channel_scales() -> None:
    acc = torch.tensor([[2.0, 2.0]], dtype=torch.float64)
    s_w = torch.tensor([0.5, 0.25])
    out = onednn_levels(acc, 1.0, s_w, 1.0, 0, torch.tensor([0.25, -1.0]), out_shape=[1, -1])
    assert out.tolist() == [[1.0, -0.0]]  # round(1.25), round(-0.5)


def _near_tie_layer(layer: nn.Module, shape: tuple[int, ...]) -> tuple[nn.Module, torch.Tensor]:
    """``layer`` at W4A4 on fixed grids whose multipliers lie within 2e-7 of 1/16, biases
    snapped: many sums land next to a rounding tie."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = qat.prepare(Wrap(layer), recipe(4))
        qat.calibrate(q, [torch.rand(*shape) for _ in range(2)])
    q.eval()
    n = q.body.weight_quant.scale.numel()
    g = torch.Generator().manual_seed(n)
    with torch.no_grad():
        q.input_quant.scale.fill_(0.05)
        q.input_quant.zero_point.fill_(0)
        q.body.output_quant.scale.fill_(0.03)
        noise = 1 + (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 4e-7
        q.body.weight_quant.scale.copy_(0.03 / 16 / 0.05 * noise)
    x = torch.rand(*shape, generator=g)
    qat.snap_bias(q, x[:2])
    return q, x


def _outputs(q: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    outs = {}
    for target in NUMERICS_TARGETS:
        with torch.no_grad(), qat.runtime_numerics(q, target=target):
            outs[target] = q(x)
    return outs


def test_convs_up_to_the_group_limit_requantize_as_onednn() -> None:
    c = ONEDNN_MAX_GROUPS
    q, x = _near_tie_layer(nn.Conv2d(c, c, 3, padding=1, groups=c), (8, c, 6, 6))
    outs = _outputs(q, x)
    assert not torch.equal(outs["torchscript_x86"], outs["torchscript"])
    assert not torch.equal(outs["torchscript_x86"], outs["onnx"])


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (nn.Conv2d(ONEDNN_MAX_GROUPS + 1, ONEDNN_MAX_GROUPS + 1, 3, groups=ONEDNN_MAX_GROUPS + 1),
         (8, ONEDNN_MAX_GROUPS + 1, 6, 6)),
        (nn.Linear(64, 32), (64, 64)),
    ],
    ids=["wide-depthwise", "linear"],
)  # fmt: skip
def test_wider_depthwise_convs_and_linears_requantize_as_fbgemm(layer, shape) -> None:
    q, x = _near_tie_layer(layer, shape)
    outs = _outputs(q, x)
    assert torch.equal(outs["torchscript_x86"], outs["torchscript"])


def test_unknown_target_is_refused() -> None:
    q, _ = _near_tie_layer(nn.Linear(4, 4), (4, 4))
    with pytest.raises(ValueError, match="torchscript_x86"), qat.runtime_numerics(q, target="x86"):
        pass
