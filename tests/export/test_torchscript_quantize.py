"""The TorchScript export quantizes float-island outputs as the fake quantizer rounds."""

from __future__ import annotations

import torch

from qat.export.torchscript import _quantize
from qat.quant.grids import ActGrid


def test_island_outputs_round_as_the_fake_quantizer_next_to_half_levels() -> None:
    # DenseNet-121's case: x · (1/s) = 13.500003 rounds to level 14; fbgemm's
    # quantize_per_tensor adds the odd zero point first (fma), lands on the tie 140.5 and
    # rounds to the even 140, one level below.
    grid = ActGrid(scale=0.0453, zero_point=127, qmin=0, qmax=255, bits=8, signed=False, source="t")
    inv = torch.tensor(1.0) / torch.tensor(grid.scale)
    k = torch.arange(-120.0, 120.0).repeat_interleave(64)
    x = (k + 0.5 + 3e-6 * (k.abs() + 1)) / inv + torch.randn(k.numel()) * 1e-9
    expected = torch.round(x * inv) + grid.zero_point  # the fake quantizer: round, then + z
    expected = expected.clamp(0, 255).to(torch.uint8)
    got = _quantize(x, grid)
    assert got.is_quantized and got.q_scale() == grid.scale and got.q_zero_point() == 127
    assert torch.equal(got.int_repr(), expected)
    plain = torch.quantize_per_tensor(x, grid.scale, grid.zero_point, torch.quint8)
    assert not torch.equal(plain.int_repr(), expected)  # the rounding this replaces


def test_a_relu_or_sub_8_bit_grid_clamps_the_levels() -> None:
    grid = ActGrid(scale=0.1, zero_point=3, qmin=0, qmax=15, bits=4, signed=False, source="t")
    x = torch.linspace(-2.0, 3.0, 101)
    assert int(_quantize(x, grid).int_repr().max()) == 15
    assert int(_quantize(x, grid, relu=True).int_repr().min()) == 3


class _ChannelsLastNorm(torch.nn.Module):
    """A GroupNorm island on a channels-last tensor (PoolFormer's convs hand them on)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 1)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).contiguous(memory_format=torch.channels_last)
        h = torch.nn.functional.group_norm(h, 2)
        return self.fc(self.conv2(h).mean((2, 3)))


def test_float_islands_compute_on_the_fake_quant_models_memory_layout() -> None:
    import qat
    from qat.export.torchscript import _FloatIsland, build_integer_model, quantized_engine
    from qat.quant.numerics import runtime_numerics

    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    q = qat.prepare(_ChannelsLastNorm().eval(), example_inputs=x)
    qat.calibrate(q, [x])
    q.eval()
    qat.snap_bias(q, x)
    integer = build_integer_model(q, x[:1])
    islands = {n: m for n, m in integer.body.named_modules() if isinstance(m, _FloatIsland)}
    norm = next(m for n, m in islands.items() if "group_norm" in n)
    assert norm.channels_last[:1] == (True,)  # NCHW before: another summation order
    with torch.no_grad(), runtime_numerics(q, target="torchscript"), quantized_engine():
        assert torch.equal(integer(x), q(x))
