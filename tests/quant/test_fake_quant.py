"""Fake quantization equals the formula exactly, and its gradients are the STE / LSQ ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qat.quant.fake_quant import fake_quantize
from qat.quant.lsq import lsq_fake_quantize
from qat.quant.qparams import qrange
from qat.quant.quantizer import FakeQuantizer
from qat.quant.spec import QuantSpec

BITS = [2, 3, 4, 5, 6, 7, 8]


def reference(
    x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """The contract, written out: clamp(round(x · (1/s)) + z) in float32, round half to even."""
    q = torch.clamp(torch.round(x * (1.0 / s)) + z, qmin, qmax)
    return (q - z) * s


def layer_weights() -> dict[str, nn.Module]:
    return {
        "conv": nn.Conv2d(6, 8, 3),
        "depthwise": nn.Conv2d(8, 8, 3, groups=8),
        "linear": nn.Linear(20, 12),
    }


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("layer", ["conv", "depthwise", "linear"])
def test_fake_quant_equals_formula_exactly(
    bits: int, signed: bool, per_channel: bool, layer: str
) -> None:
    weight = layer_weights()[layer].weight.detach() * 3
    spec = QuantSpec(bits=bits, signed=signed, symmetric=signed, per_channel=per_channel)
    fq = FakeQuantizer(spec, role="weight", channels=weight.shape[0], axis=0)
    out = fq(weight)  # first call observes, then quantizes
    scale, zp = fq.qparams()
    qmin, qmax = qrange(bits, signed)
    shape = (-1,) + (1,) * (weight.dim() - 1) if per_channel else ()
    s, z = scale.reshape(shape), zp.float().reshape(shape)
    expected = reference(weight, s, z, qmin, qmax)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    # ... and bitwise what torch's own fused kernels give.
    if per_channel:
        torch_out = torch.fake_quantize_per_channel_affine(weight, scale, zp, 0, qmin, qmax)
    else:
        torch_out = torch.fake_quantize_per_tensor_affine(weight, scale, zp, qmin, qmax)
    torch.testing.assert_close(out, torch_out, atol=0, rtol=0)
    # Every output is on the integer grid.
    levels = out / s + z
    torch.testing.assert_close(levels, torch.round(levels), atol=1e-4, rtol=0)
    assert levels.min() >= qmin - 1e-4 and levels.max() <= qmax + 1e-4


@pytest.mark.parametrize("bits", BITS)
def test_asymmetric_activation_equals_formula(bits: int) -> None:
    x = torch.randn(4, 5, 6, 7) * 2 + 0.7
    fq = FakeQuantizer(QuantSpec(bits=bits, signed=False, symmetric=False), role="activation")
    fq.observe(x)
    out = fq(x)
    scale, zp = fq.qparams()
    qmin, qmax = qrange(bits, False)
    assert qmin <= int(zp) <= qmax and int(zp) > 0  # negative inputs need a nonzero zero point
    torch.testing.assert_close(out, reference(x, scale, zp.float(), qmin, qmax), atol=0, rtol=0)


@pytest.mark.parametrize("zero_point", [0, 37])
def test_compiled_kernel_is_bitwise_the_eager_one(zero_point: int) -> None:
    """Large activations take the torch.compile path: same bits as eager and as torch's kernel."""
    from qat.quant.fake_quant import _fake_quant_forward_eager, fake_quant_forward

    x = (torch.randn(8, 16, 32, 32) * 3).requires_grad_(True)
    assert x.numel() >= fake_quant_forward.MIN_NUMEL
    scale = torch.tensor([0.0173])
    zp = torch.tensor([zero_point], dtype=torch.int32)
    out = fake_quantize(x, scale, zp, 0, 255)
    lo, hi = torch.tensor(0.0), torch.tensor(255.0)
    eager, mask = _fake_quant_forward_eager(
        x.detach(), scale.reshape(()), zp.float().reshape(()), lo, hi
    )
    torch.testing.assert_close(out, eager, atol=0, rtol=0)
    torch.testing.assert_close(
        out, torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255), atol=0, rtol=0
    )
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(x.grad, mask, atol=0, rtol=0)


@pytest.mark.parametrize("serial", [True, False])
def test_the_one_thread_and_the_parallel_kernels_give_the_eager_bits(
    serial: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At two threads, inputs below ``fused.serial_numel`` run each kernel's one-thread
    compilation, larger ones the parallel one: both give the eager kernels' values, ranges and
    gradients, bit for bit (observe-and-quantize forward, STE backward)."""
    from qat.quant import fake_quant

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 16, 32, 32, generator=gen) * 3
    g = torch.randn(x.shape, generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = []
        for eager in (False, True):
            with monkeypatch.context() as m:
                m.setattr(fake_quant.fused, "serial_numel", x.numel() + 1 if serial else 0)
                m.setattr(fake_quant.fused, "failed", eager)
                q = FakeQuantizer(QuantSpec(bits=8, range_method="ema")).train()
                for _ in range(2):  # the second call updates a range it already has
                    xi = (x + 1.5).requires_grad_(True)
                    out = q(xi)
                out.backward(g)
                results.append((out.detach(), xi.grad, q.scale.clone(), q.zero_point.clone()))
        assert ("_observe_quantize", serial) in fake_quant.fused._compiled
        assert ("_ste_grad", serial) in fake_quant.fused._compiled
    finally:
        torch.set_num_threads(threads)
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want) and got.signbit().equal(want.signbit())


def test_reciprocal_matches_division_away_from_ties() -> None:
    """x·(1/s) and x/s only disagree where x/s sits within float rounding of a .5 tie."""
    x = torch.randn(200_000)
    s = torch.tensor([0.0173])
    q_mul = torch.round(x * (1.0 / s))
    q_div = torch.round(x / s)
    diff = q_mul != q_div
    frac = (x / s - torch.floor(x / s) - 0.5).abs()
    assert bool((frac[diff] < 1e-5).all())


def test_round_half_to_even() -> None:
    s = torch.tensor([1.0])
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5])
    out = fake_quantize(x, s, torch.zeros(1, dtype=torch.int32), -8, 7)
    assert out.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0]


@pytest.mark.parametrize("per_channel", [False, True])
def test_ste_gradient_passes_inside_zero_outside(per_channel: bool) -> None:
    x = torch.linspace(-3, 3, 60).reshape(3, 20).requires_grad_(True)
    scale = torch.full((3,), 0.1) if per_channel else torch.tensor([0.1])
    zp = torch.zeros_like(scale, dtype=torch.int32)
    qmin, qmax = -8, 7  # representable range [-0.8, 0.7] (+ half a step of rounding)
    out = fake_quantize(x, scale, zp, qmin, qmax, axis=0 if per_channel else None)
    out.backward(torch.ones_like(out))
    levels = torch.round(x.detach() * (1.0 / torch.tensor(0.1)))
    inside = (levels >= qmin) & (levels <= qmax)
    assert torch.equal(x.grad, inside.float())
    assert inside.any() and (~inside).any()


def lsq_reference(
    x: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    qmin: int,
    qmax: int,
    g: float,
    axis: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LSQ (Esser et al. 2020) in float64: ∂x̂/∂s and ∂x̂/∂x, summed with unit upstream gradient."""
    x64 = x.double()
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    s64, z64 = s.double().reshape(shape), z.double().reshape(shape)
    v = x64 / s64
    q = torch.round(v) + z64
    below, above = q < qmin, q > qmax
    dqds = torch.where(below, qmin - z64, torch.where(above, qmax - z64, torch.round(v) - v))
    dims = [d for d in range(x.dim()) if d != axis] if axis is not None else list(range(x.dim()))
    grad_s = dqds.sum(dim=dims) * g
    grad_x = (~(below | above)).double()
    return grad_s.reshape(-1), grad_x


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("signed", [True, False])
def test_lsq_scale_gradient_matches_paper(bits: int, per_channel: bool, signed: bool) -> None:
    x = (torch.randn(8, 3, 5, 5) * 1.5).requires_grad_(True)
    n = 8 if per_channel else 1
    qmin, qmax = qrange(bits, signed)
    scale = (torch.rand(n) * 0.2 + 0.1).requires_grad_(True)
    zp = torch.zeros(n)
    axis = 0 if per_channel else None
    g = 1.0 / (x.numel() / n * qmax) ** 0.5  # LSQ's gradient scale 1/sqrt(N·Qp)
    out = lsq_fake_quantize(x, scale, zp, qmin, qmax, axis=axis, grad_factor=g)
    out.sum().backward()
    ref_s, ref_x = lsq_reference(x.detach(), scale.detach(), zp, qmin, qmax, g, axis)
    torch.testing.assert_close(scale.grad.double(), ref_s, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), ref_x, rtol=0, atol=0)
    # Forward is the same fake quantization as the plain STE path.
    plain = fake_quantize(x.detach(), scale.detach(), zp, qmin, qmax, axis=axis)
    torch.testing.assert_close(out.detach(), plain, atol=0, rtol=0)


def test_lsq_quantizer_uses_paper_grad_scale() -> None:
    spec = QuantSpec(bits=4, signed=True, symmetric=True, per_channel=True, learned="lsq")
    fq = FakeQuantizer(spec, role="weight", channels=6, axis=0)
    w = torch.randn(6, 4, 3, 3)
    fq(w)  # initialise the scale from the observed range
    fq.enable_observer(False)
    fq(w).sum().backward()
    g = 1.0 / (4 * 3 * 3 * 7) ** 0.5
    ref_s, _ = lsq_reference(w, fq.scale.detach(), torch.zeros(6), -8, 7, g, 0)
    torch.testing.assert_close(fq.scale.grad.double(), ref_s, rtol=1e-5, atol=1e-6)


def test_lsq_learned_zero_point_gradient() -> None:
    x = torch.randn(1000) * 2
    scale = torch.tensor([0.05], requires_grad=True)
    zp = torch.tensor([5.0], requires_grad=True)
    out = lsq_fake_quantize(x, scale, zp, 0, 15, grad_factor=1.0)
    out.sum().backward()
    levels = torch.round(x / 0.05) + 5
    outside = (levels < 0) | (levels > 15)
    torch.testing.assert_close(
        zp.grad, -0.05 * outside.sum().float().reshape(1), rtol=1e-5, atol=1e-5
    )


def test_pact_alpha_gradient_is_clip_indicator() -> None:
    spec = QuantSpec(bits=4, signed=False, symmetric=False, learned="pact")
    fq = FakeQuantizer(spec, role="activation")
    x = torch.linspace(-1, 3, 41)
    fq.observe(torch.tensor([0.0, 2.0]))  # alpha = 2
    fq.enable_observer(False)
    assert float(fq.alpha.detach()) == pytest.approx(2.0)
    out = fq(x)
    out.sum().backward()
    assert float(fq.alpha.grad) == pytest.approx(float((x >= 2.0).sum()))
    assert float(out.detach().max()) == pytest.approx(2.0) and float(out.detach().min()) == 0.0


def test_the_compiled_model_kernels_equal_the_eager_ones() -> None:
    """The kernels used inside torch.compile (one-byte STE codes, a comparison-free ReLU
    gradient: no bool tensors for the partitioner to save) give the eager kernels' values."""
    from qat.quant.fake_quant import (
        STE_PASS,
        _fake_quant_forward_eager,
        _fake_quant_values,
        _ste_grad,
        compiled_relu,
    )

    x = torch.randn(64, 999) * 4
    x[0, :4] = torch.tensor([0.0, -0.0, 0.0173 * 0.5, -0.0173 * 300])
    s, z = torch.tensor(0.0173), torch.tensor(37.0)
    lo, hi = torch.tensor(0.0), torch.tensor(255.0)
    odd = x.clone()
    odd[1, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    for inputs in (x, odd):
        out, codes = torch.compile(_fake_quant_values, dynamic=True)(inputs, s, z, lo, hi)
        ref_out, ref_mask = _fake_quant_forward_eager(inputs.clone(), s, z, lo, hi)
        torch.testing.assert_close(out, ref_out, atol=0, rtol=0, equal_nan=True)
        assert codes.dtype == torch.uint8
        assert torch.equal((codes == STE_PASS).float(), ref_mask)
        assert 0 < ref_mask.sum() < ref_mask.numel()
        g = torch.randn(x.shape)
        grad, ref = torch.compile(_ste_grad, dynamic=True)(g, codes), g * ref_mask
        assert torch.equal(grad, ref) and grad.signbit().equal(ref.signbit())
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    g = torch.randn(x.shape)
    compiled_relu(a).backward(g)
    torch.relu(b).backward(g)
    assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("learned_zp", [False, True])
def test_compiled_lsq_kernels_match_the_eager_ones(
    bits: int, signed: bool, learned_zp: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large per-tensor activation takes the compiled LSQ kernels: values and ∂L/∂x bitwise
    the eager path's, the scale's and zero point's gradients (sums) within float32 rounding."""
    from qat.quant import fake_quant

    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(4, 64, 300, generator=gen) * 1.5
    x.view(-1)[:3] = torch.tensor([0.0, -0.0, 1e-30])
    assert x.numel() >= fake_quant.fused.MIN_NUMEL
    g = torch.randn(x.shape, generator=gen)
    qmin, qmax = qrange(bits, signed)
    results = []
    for compiled in (True, False):
        with monkeypatch.context() as m:
            if not compiled:
                m.setattr(fake_quant.fused, "MIN_NUMEL", x.numel() + 1)
                m.setattr(fake_quant._FusedKernels.takes, "__defaults__", (x.numel() + 1,))
            xi = x.clone().requires_grad_(True)
            scale = torch.tensor([0.11], requires_grad=True)
            zp = torch.tensor([0.0 if signed else 3.0], requires_grad=learned_zp)
            out = lsq_fake_quantize(xi, scale, zp, qmin, qmax, grad_factor=0.01)
            full_size = [t for t in out.grad_fn.saved_tensors if t.numel() == x.numel()]
            assert len(full_size) == (1 if compiled else 2)  # x, or the mask and ∂x̂/∂s
            out.backward(g)
            results.append((out.detach(), xi.grad, scale.grad, zp.grad))
    (out_c, gx_c, gs_c, gz_c), (out_e, gx_e, gs_e, gz_e) = results
    assert torch.equal(out_c, out_e) and out_c.signbit().equal(out_e.signbit())
    assert torch.equal(gx_c, gx_e) and gx_c.signbit().equal(gx_e.signbit())
    # The sums' terms in float64: each sum is within float32 rounding of theirs, whichever
    # order (and threads) it adds them in.
    s, z = torch.tensor(0.11), torch.tensor(0.0 if signed else 3.0)
    v = x * (1.0 / s)
    q = torch.round(v) + z
    clamped = q.clamp(qmin, qmax)
    mask = (clamped == q).double()
    terms_s = g.double() * ((clamped - z).double() - v.double() * mask) * 0.01
    terms_z = g.double() * (1.0 - mask) * -s.double() * 0.01
    for got, terms in ((gs_c, terms_s), (gs_e, terms_s)) + (
        ((gz_c, terms_z), (gz_e, terms_z)) if learned_zp else ()
    ):
        bound = torch.finfo(torch.float32).eps * terms.abs().sum().item()
        assert abs(got.item() - terms.sum().item()) <= bound
    if not learned_zp:
        assert gz_c is None and gz_e is None
    assert not fake_quant.fused.failed
