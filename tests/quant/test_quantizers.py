"""FakeQuantizer state: modes, bit-width changes, guards, observers, state_dict."""

from __future__ import annotations

import math

import pytest
import torch

from qat.quant.qparams import guard_scale, qparams_from_range, qrange
from qat.quant.quantizer import FakeQuantizer
from qat.quant.spec import QuantSpec


def test_qrange() -> None:
    assert qrange(8, True) == (-128, 127)
    assert qrange(8, True, narrow_range=True) == (-127, 127)
    assert qrange(4, False) == (0, 15)
    assert qrange(2, True) == (-2, 1)


def test_guard_scale_never_zero_negative_nan_inf() -> None:
    raw = torch.tensor([0.0, -1.0, float("nan"), float("inf"), 1e-30, 0.5])
    guarded = guard_scale(raw)
    assert bool(torch.isfinite(guarded).all()) and bool((guarded > 0).all())
    assert guarded[-1] == 0.5


def test_zero_range_gives_usable_scale() -> None:
    scale, zp = qparams_from_range(torch.zeros(3), torch.zeros(3), -128, 127, True, True)
    assert torch.equal(scale, torch.ones(3)) and torch.equal(zp, torch.zeros(3, dtype=torch.int32))


def test_modes() -> None:
    fq = FakeQuantizer(QuantSpec(bits=4, signed=False, symmetric=False), role="activation")
    x = torch.rand(100) * 4
    # Never observed: passes through, reports uninitialized.
    fq.enable_observer(False)
    assert torch.equal(fq(x), x) and not fq.is_initialized
    # Observe-only: statistics move, output is float.
    fq.enable_observer(True).enable_fake_quant(False)
    assert torch.equal(fq(x), x) and fq.is_initialized
    # Quantize with frozen ranges.
    fq.enable_observer(False).enable_fake_quant(True)
    before = fq.scale.clone()
    out = fq(x * 10)
    assert torch.equal(fq.scale, before)
    assert len(torch.unique(out)) <= 16
    # Eval mode never moves ranges, even with the observer on.
    fq.enable_observer(True).eval()
    fq(x * 100)
    assert torch.equal(fq.scale, before)


def test_ema_and_minmax_history() -> None:
    ema = FakeQuantizer(
        QuantSpec(bits=8, signed=False, symmetric=False, range_method="ema", ema_decay=0.5)
    )
    mm = FakeQuantizer(QuantSpec(bits=8, signed=False, symmetric=False, range_method="minmax"))
    for q in (ema, mm):
        q.observe(torch.tensor([0.0, 2.0]))
        q.observe(torch.tensor([0.0, 4.0]))
    assert float(ema.max_val) == pytest.approx(3.0)
    assert float(mm.max_val) == pytest.approx(4.0)


def test_weight_observer_tracks_current_tensor_only() -> None:
    q = FakeQuantizer(QuantSpec(bits=8, per_channel=True), role="weight", channels=2)
    q.observe(torch.tensor([[1.0, -3.0], [2.0, 0.5]]))
    q.observe(torch.tensor([[1.0, -1.0], [0.5, 0.5]]))
    assert q.max_val.tolist() == [1.0, 0.5] and q.min_val.tolist() == [-1.0, 0.5]


@pytest.mark.parametrize("method", ["percentile", "mse"])
def test_calibration_methods_clip_outliers(method: str) -> None:
    x = torch.randn(100_000)
    x[0] = 20.0  # one outlier: at 4 bits, clipping it costs less than a 20x coarser grid
    q = FakeQuantizer(
        QuantSpec(bits=4, signed=True, symmetric=True, range_method=method, percentile=99.9)
    )
    mm = FakeQuantizer(QuantSpec(bits=4, signed=True, symmetric=True, range_method="minmax"))
    q.observe(x)
    mm.observe(x)
    assert float(q.scale) < float(mm.scale) / 2
    err = (q(x) - x)[1:].pow(2).mean()
    err_mm = (mm(x) - x)[1:].pow(2).mean()
    assert err < err_mm


def test_set_bits_rescales_observed_ranges() -> None:
    q = FakeQuantizer(QuantSpec(bits=8, signed=True, symmetric=True))
    q.observe(torch.tensor([-1.0, 1.27]))
    assert float(q.scale) == pytest.approx(1.27 / 127)
    q.set_bits(4)
    assert float(q.scale) == pytest.approx(1.27 / 7)
    assert q.quant_range == (-8, 7)
    with pytest.raises(ValueError, match="bits=1"):
        q.set_bits(1)


def test_set_bits_keeps_lsq_clip_range_and_parameter() -> None:
    q = FakeQuantizer(QuantSpec(bits=8, signed=True, symmetric=True, learned="lsq"))
    q.observe(torch.tensor([-1.0, 1.27]))
    param = q.scale
    clip = float(q.scale.detach()) * 255
    q.set_bits(4)
    assert q.scale is param
    assert float(q.scale.detach()) * 15 == pytest.approx(clip)


def test_lsq_scale_reinitialised_from_next_training_batch_after_bit_change() -> None:
    """At 2 bits the 8-bit clip range rounds most weights to zero: the scale starts afresh."""
    spec = QuantSpec(bits=8, signed=True, symmetric=True, range_method="mse", learned="lsq")
    q = FakeQuantizer(spec, role="weight")
    w = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    q.enable_observer(True).observe(w)
    q.enable_observer(False)
    param = q.scale
    q.set_bits(2)
    kept = float(q.scale.detach())  # the 8-bit clip range re-expressed on the 2-bit grid
    q.eval()
    q(w)  # evaluation never moves a range
    assert float(q.scale.detach()) == kept
    q.train()
    q(w)
    assert q.scale is param and float(q.scale.detach()) < kept / 2
    fresh = FakeQuantizer(QuantSpec(bits=2, signed=True, symmetric=True, range_method="mse"))
    fresh.observe(w)
    assert float(q.scale.detach()) == pytest.approx(float(fresh.scale))
    zeros = float((torch.round(w / q.scale.detach()) == 0).float().mean())
    assert zeros < 0.6
    q.scale.data.mul_(1.5)  # as training would move it: no second re-initialisation
    q(w)
    assert float(q.scale.detach()) == pytest.approx(1.5 * float(fresh.scale))


def test_float_bits_pass_through() -> None:
    q = FakeQuantizer(QuantSpec(bits=8, signed=False, symmetric=False))
    x = torch.rand(10)
    q.observe(x)
    q.set_bits(16)
    assert torch.equal(q(x), x) and not q.enabled
    q.set_bits(8)
    assert not torch.equal(q(x), x)


@pytest.mark.parametrize("learned", ["none", "lsq", "pact"])
def test_state_dict_round_trip(learned: str) -> None:
    per_channel = learned != "pact"
    spec = QuantSpec(bits=5, signed=True, symmetric=True, per_channel=per_channel, learned=learned)
    a = FakeQuantizer(spec, role="weight" if per_channel else "activation", channels=4)
    a.observe(torch.randn(4, 9))
    a.set_bits(3)
    a.enable_observer(False)
    a(torch.randn(4, 9))  # an LSQ scale re-initialises on the first training batch at 3 bits
    b = FakeQuantizer(spec, role=a.role, channels=4)
    b.load_state_dict(a.state_dict())
    assert b.bits == 3 and b.is_initialized and not bool(b.observer_enabled)
    x = torch.randn(4, 9)
    assert torch.equal(a(x), b(x))
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


def test_relu_fusion_is_exact() -> None:
    q = FakeQuantizer(QuantSpec(bits=4, signed=False, symmetric=False))
    x = torch.randn(1000)
    q.observe(x, relu=True)
    assert int(q.zero_point) == 0 and float(q.min_val) == 0.0
    assert torch.equal(q(x, relu=True), q(torch.relu(x)))


def test_lsq_grad_factor() -> None:
    q = FakeQuantizer(QuantSpec(bits=4, per_channel=True, learned="lsq"), role="weight", channels=8)
    assert q.lsq_grad_factor(torch.zeros(8, 3, 3, 3)) == pytest.approx(1 / math.sqrt(27 * 7))


@pytest.mark.parametrize("role", ["weight", "activation"])
def test_lsq_scale_capped_at_min_max_step_in_training(role: str) -> None:
    """A learned step above the min/max step would let every value round to zero."""
    per_channel = role == "weight"
    spec = QuantSpec(
        bits=2, signed=per_channel, symmetric=per_channel, per_channel=per_channel, learned="lsq"
    )
    q = FakeQuantizer(spec, role=role, channels=3)
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    q.enable_observer(True).observe(x)
    q.enable_observer(False)
    minmax = q.scale.detach().clone()
    expected = minmax.clone()
    with torch.no_grad():
        q.scale.mul_(1e6)
        if per_channel:
            q.scale[0] = expected[0] = minmax[0] / 2  # below the cap: left alone
    q.eval()
    q(x)
    assert float(q.scale.detach().max()) > 1.0  # evaluation changes nothing
    q.train()
    out = q(x)
    assert torch.allclose(q.scale.detach(), expected)
    assert bool((out != 0).any())


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("kind", ["u_asym", "s_sym", "u_sym", "s_asym"])
@pytest.mark.parametrize("relu", [False, True])
def test_the_compiled_lsq_cap_is_bitwise_the_eager_one(
    bits: int, kind: str, relu: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large per-tensor activation caps its LSQ scale in one compiled pass: the same scale,
    to the bit, as the eager reductions and qparams; a non-finite batch caps nothing."""
    from qat.quant import ranges

    signed, symmetric = kind.startswith("s"), kind.endswith("_sym")
    spec = QuantSpec(bits=bits, signed=signed, symmetric=symmetric, learned="lsq")
    gen = torch.Generator().manual_seed(bits)
    batches = [torch.randn(4, 64, 300, generator=gen) * (1 + i) + 0.3 * i for i in range(3)]
    batches[1].view(-1)[7] = float("nan")
    for compiled in (True, False):
        q = FakeQuantizer(spec, role="activation").train()
        q(batches[0])  # starts the learned scale from the observed range
        scales = []
        with monkeypatch.context() as m:
            if not compiled:
                m.setattr(ranges, "_fuses_cap", lambda *a: False)
            for start, x in zip((1e3, 1e3, 1e-4), batches, strict=True):
                with torch.no_grad():
                    q.scale.fill_(start)  # above the cap (capped), or below it (kept)
                assert ranges._fuses_cap(q, x) == compiled
                ranges.cap_lsq_scale(q, x, *q.quant_range, relu)
                scales.append(q.scale.detach().clone())
        if compiled:
            fused_scales = scales
    for a, b in zip(fused_scales, scales, strict=True):
        assert torch.equal(a, b)
    assert float(fused_scales[1]) == 1e3 and float(fused_scales[2]) == pytest.approx(1e-4)
    assert float(fused_scales[0]) < 10.0  # capped at the batch's min/max step
