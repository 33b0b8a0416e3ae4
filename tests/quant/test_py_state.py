"""Bit widths and mode flags are Python state, saved under the keys the buffers had."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qat
from qat.quant.layers import QConvBn2d
from qat.quant.quantizer import FakeQuantizer
from qat.quant.spec import QuantSpec

FLAG_KEYS = ("bit_width", "observer_enabled", "fake_quant_enabled", "initialized")


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 5)
    )


def _prepared() -> nn.Module:
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5)
    model = qat.prepare(_net(), example_inputs=x[:2])
    qat.calibrate(model, [x])
    return model


def test_state_dict_keeps_the_buffer_keys_and_dtypes() -> None:
    q = FakeQuantizer(QuantSpec(bits=6), role="activation")
    sd = q.state_dict()
    assert list(sd)[:4] == list(FLAG_KEYS)  # where the buffers were, before min_val
    assert sd["bit_width"].dtype == torch.int64 and int(sd["bit_width"]) == 6
    assert all(sd[k].dtype == torch.uint8 and sd[k].dim() == 0 for k in FLAG_KEYS[1:])
    assert not any(k in dict(q.named_buffers()) for k in FLAG_KEYS)


def test_flags_round_trip_through_a_strict_load() -> None:
    trained = _prepared()
    qat.anneal_bits(trained, 4)
    qat.set_observers(trained, False)
    qat.set_fake_quant(trained, False, role="weight")
    for m in trained.modules():
        if isinstance(m, QConvBn2d):
            m.freeze_bn_stats()
    sd = trained.state_dict()
    fresh = qat.prepare(_net(), example_inputs=torch.randn(2, 3, 5, 5))
    assert not any(q.is_initialized for _, q in qat.iter_quantizers(fresh))
    fresh.load_state_dict(sd, strict=True)
    for (_, a), (_, b) in zip(
        qat.iter_quantizers(trained), qat.iter_quantizers(fresh), strict=True
    ):
        assert (a.bits, a.observer_enabled, a.fake_quant_enabled, a.initialized) == (
            b.bits,
            b.observer_enabled,
            b.fake_quant_enabled,
            b.initialized,
        )
        assert isinstance(b.bits, int) and isinstance(b.fake_quant_enabled, bool)
    assert all(m.is_bn_frozen for m in fresh.modules() if isinstance(m, QConvBn2d))
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, sd[key]), key


def test_a_missing_flag_fails_a_strict_load_and_passes_a_lax_one() -> None:
    sd = _prepared().state_dict()
    key = next(k for k in sd if k.endswith(".bit_width"))
    del sd[key]
    fresh = _prepared()
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict(sd, strict=True)
    result = fresh.load_state_dict(sd, strict=False)
    assert result.missing_keys == [key] and not result.unexpected_keys


def test_a_non_scalar_flag_is_a_load_error() -> None:
    q = FakeQuantizer(QuantSpec(bits=8), role="activation")
    sd = q.state_dict()
    sd["bit_width"] = torch.tensor([8, 8])
    with pytest.raises(RuntimeError, match="bit_width"):
        q.load_state_dict(sd)
