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
