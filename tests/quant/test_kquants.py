"""GGUF k-quant grids (Q4_K, Q6_K): the fake-quant values are what the packed file decodes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qat.quant.kquants import KQUANT_GRIDS, kquant_fake_quantize, kquant_params
from qat.quant.spec import QuantSpec

gguf = pytest.importorskip("gguf")


def _blocks(seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.randn(48, 256) * torch.rand(48, 1)
    x[3] = 0.0  # an all-zero super-block
    x[5, :40] *= 30  # one sub-block far larger than the rest
    x[7] = x[7].abs()  # no negative values: Q4_K's min is 0
    return x


@pytest.mark.parametrize("grid", list(KQUANT_GRIDS))
def test_packed_blocks_decode_to_the_fake_quant_values(grid: str) -> None:
    from qat.export.gguf import pack_kquant

    x = _blocks()
    params = kquant_params(x, grid)
    packed = pack_kquant(params, grid)
    assert packed.shape == (48, 144 if grid == "q4_k" else 210)
    qtype = getattr(gguf.GGMLQuantizationType, grid.upper())
    decoded = gguf.quants.dequantize(packed.reshape(-1), qtype).reshape(48, 256)
    assert np.array_equal(decoded, params["values"].numpy())
    assert torch.equal(kquant_fake_quantize(x, grid), params["values"])
    assert float(params["values"][3].abs().max()) == 0.0
    # Close to the input: relative error of a 4-bit / 6-bit grid.
    rel = float((params["values"] - x).pow(2).mean() / x.pow(2).mean())
    assert rel < (0.02 if grid == "q4_k" else 0.002)


@pytest.mark.parametrize("grid", list(KQUANT_GRIDS))
def test_straight_through_gradient(grid: str) -> None:
    x = _blocks(1).requires_grad_()
    kquant_fake_quantize(x, grid).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert set(x.grad.unique().tolist()) <= {0.0, 1.0}
    assert float(x.grad.mean()) > 0.95  # scales cover their blocks: almost nothing clipped


def test_spec_k_grids_need_blocks_of_256_and_weights() -> None:
    QuantSpec(bits=4, per_channel=True, group_size=256, grid="q4_k")
    with pytest.raises(ValueError, match="blocks of 256"):
        QuantSpec(bits=4, per_channel=True, group_size=32, grid="q4_k")
    with pytest.raises(ValueError, match="k-quant grids are for weights"):
        QuantSpec(bits=6, group_size=256, grid="q6_k", dynamic="token")


def test_k_grid_layers_are_refused_outside_gguf() -> None:
    from qat.export.lm_weights import quant_weight
    from qat.quant.layers import QLinear

    spec = QuantSpec(bits=4, per_channel=True, group_size=256, grid="q4_k")
    layer = QLinear.from_float(torch.nn.Linear(256, 8), spec, None).train()
    layer(torch.randn(2, 256))
    with pytest.raises(ValueError, match=r"targets=\[gguf\]"):
        quant_weight(layer.eval(), "fc")
