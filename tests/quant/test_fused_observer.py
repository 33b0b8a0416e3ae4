"""The fused observe-and-quantize kernel gives bitwise the eager observer's numbers."""

from __future__ import annotations

import copy

import pytest
import torch

from qat.quant import fake_quant, fused_observer
from qat.quant.quantizer import FakeQuantizer, NonFiniteError
from qat.quant.spec import QuantSpec

STATE = ("min_val", "max_val", "scale", "zero_point")

#: name → (spec keywords, role, input shape, relu)
CASES = {
    "u8_asym_ema": ({"signed": False, "symmetric": False}, "activation", (4, 64, 32, 17), False),
    "s8_sym_ema": ({"signed": True, "symmetric": True}, "activation", (4, 50, 130), False),
    "u8_sym_minmax": (
        {"signed": False, "symmetric": True, "range_method": "minmax"},
        "activation",
        (4, 64, 300),
        False,
    ),
    "s8_asym_minmax": (
        {"signed": True, "symmetric": False, "range_method": "minmax"},
        "activation",
        (7, 33),
        False,
    ),
    "u8_asym_relu": ({"signed": False, "symmetric": False}, "activation", (4, 16, 9, 9), True),
    "s8_sym_relu": ({"signed": True, "symmetric": True}, "activation", (4, 16, 9, 9), True),
    "conv_weight": (
        {"signed": True, "symmetric": True, "per_channel": True, "range_method": "minmax"},
        "weight",
        (16, 8, 3, 3),
        False,
    ),
    "linear_weight_reduce_range": (
        {"signed": True, "per_channel": True, "range_method": "minmax", "reduce_range": True},
        "weight",
        (384, 128),
        False,
    ),
}


def _eager_call(q: FakeQuantizer, x: torch.Tensor, relu: bool, mp: pytest.MonkeyPatch):
    with mp.context() as m:
        m.setattr(fused_observer, "applies", lambda *a: False)
        return q(x, relu=relu)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_observer_is_bitwise_the_eager_one(
    bits: int, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    kwargs, role, shape, relu = CASES[case]
    spec = QuantSpec(bits=bits, ema_decay=0.9, **kwargs)
    channels = shape[0] if spec.per_channel else 1
    fused_q = FakeQuantizer(spec, role=role, channels=channels).train()
    eager_q = copy.deepcopy(fused_q)
    gen = torch.Generator().manual_seed(bits)
    for step in range(4):  # the first call starts the range, the others move it
        x = torch.randn(shape, generator=gen) * (0.5 + step) + 0.3 * step
        x.view(-1)[:4] = torch.tensor([-0.0, 0.0, 1e-30, -1e-30])
        if relu and step == 2:
            # A range observed without the ReLU: the zero point leaves qmin, so the ReLU
            # runs as its own op instead of being the clamp.
            with torch.no_grad():
                for q in (fused_q, eager_q):
                    q.min_val.fill_(-3.0)
        assert fused_observer.applies(fused_q, x, relu)
        xf, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out_f, out_e = fused_q(xf, relu=relu), _eager_call(eager_q, xe, relu, monkeypatch)
        assert torch.equal(out_f, out_e) and out_f.signbit().equal(out_e.signbit()), step
        g = torch.randn(shape, generator=gen)
        out_f.backward(g)
        out_e.backward(g)
        assert torch.equal(xf.grad, xe.grad) and xf.grad.signbit().equal(xe.grad.signbit())
        for name in STATE:
            a, b = getattr(fused_q, name), getattr(eager_q, name)
            assert a.dtype == b.dtype and torch.equal(a, b), (step, name)
        assert fused_q.is_initialized
    assert not fake_quant.fused.failed  # the compiled kernels ran, not their eager fallback


def test_a_non_finite_batch_raises_and_keeps_the_range() -> None:
    q = FakeQuantizer(QuantSpec(bits=8, signed=False, symmetric=False), role="activation")
    q.train()(torch.randn(8, 64, 256))
    before = {name: getattr(q, name).clone() for name in STATE}
    x = torch.randn(8, 64, 256)
    x[3, 2, 1] = float("nan")
    assert fused_observer.applies(q, x, False)
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        q(x)
    for name, value in before.items():
        assert torch.equal(getattr(q, name), value), name


def test_layers_of_any_shape_and_layout_share_one_compiled_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Per-tensor kernels run on a 1-D view of memory and per-channel ones on (C, K) rows, so
    a model's many shapes (a ViT has ranks 2-4, permuted attention tensors, size-1 dims) do not
    recompile them per layer; past Dynamo's recompile limit they used to fall back to eager.
    Three configurations here: activations without and with a range history, weights."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    acts = [
        torch.randn(6, 50, 64, generator=gen),
        torch.randn(6, 4, 50, 50, generator=gen),
        torch.randn(6, 50, 3, 4, 16, generator=gen).permute(2, 0, 3, 1, 4)[0],  # q of qkv
        torch.randn(6, 64, 7, 7, generator=gen).transpose(1, 3),
        torch.randn(300, generator=gen),
    ]
    weights = [torch.randn(64, 1, 4, 4, generator=gen), torch.randn(192, 64, generator=gen)]
    with torch._dynamo.config.patch(recompile_limit=3, fail_on_recompile_limit_hit=True):
        for x, role in [(a, "activation") for a in acts] + [(w, "weight") for w in weights]:
            per_channel = role == "weight"
            spec = QuantSpec(bits=8, per_channel=per_channel, range_method="minmax")
            channels = x.shape[0] if per_channel else 1
            fused_q = FakeQuantizer(spec, role=role, channels=channels).train()
            eager_q = copy.deepcopy(fused_q)
            for _ in range(2):  # the second call keeps a history (another configuration)
                out_f = fused_q(x.detach().requires_grad_())
                out_e = _eager_call(eager_q, x.detach().requires_grad_(), False, monkeypatch)
                assert out_f.shape == x.shape and out_f.stride() == out_e.stride()
                assert torch.equal(out_f, out_e)
                g = torch.randn(x.shape, generator=gen)
                xa, xb = x.detach().requires_grad_(), x.detach().requires_grad_()
                fused_q(xa).backward(g)
                _eager_call(eager_q, xb, False, monkeypatch).backward(g)
                assert torch.equal(xa.grad, xb.grad)
    assert not fake_quant.fused.failed


def test_a_first_call_under_inference_mode_leaves_training_working() -> None:
    """BN re-estimation and Lightning's validation run the model under inference mode; the
    grid and moving-average constants the kernels cache must not be inference tensors, which
    the next training step could not save for its backward."""
    fake_quant._CONSTANTS.clear()
    q = FakeQuantizer(QuantSpec(bits=8, signed=False, symmetric=False), role="activation")
    q.train()
    with torch.inference_mode():
        q(torch.randn(4, 64, 300))  # starts the range and fills the caches
        q(torch.randn(4, 64, 300))
    x = torch.randn(4, 64, 300, requires_grad=True)
    assert fused_observer.applies(q, x, False)
    q(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    frozen = FakeQuantizer(QuantSpec(bits=8), role="activation").train()
    frozen(torch.randn(4, 64, 300))
    frozen.observer_enabled = False  # the plain fake-quant kernel, grid cached under inference
    fake_quant._CONSTANTS.clear()
    with torch.inference_mode():
        frozen(torch.randn(4, 64, 300))
    y = torch.randn(4, 64, 300, requires_grad=True)
    frozen(y).sum().backward()
    assert y.grad is not None


@pytest.mark.parametrize("observe", [True, False])
def test_the_backward_keeps_one_byte_per_element_not_the_input(observe: bool) -> None:
    """The fused kernels save one-byte STE codes for the backward instead of the float input,
    which the backward would read back from memory and which stays alive until then."""
    spec = QuantSpec(bits=8, signed=False, symmetric=False, range_method="ema")
    q = FakeQuantizer(spec, role="activation")
    q.train()(torch.randn(4, 64, 300))
    q.observer_enabled = observe
    x = (torch.randn(4, 64, 300) * 3).requires_grad_(True)  # outside the (moving) range: clips
    out = q(x)
    saved = out.grad_fn.saved_tensors
    assert [(t.dtype, t.numel()) for t in saved] == [(torch.uint8, x.numel())]
    out.backward(torch.ones_like(out))
    assert x.grad is not None and 0 < x.grad.sum() < x.numel()
