"""LLM quantization schemes against their formulas (atol=0) and GGUF's grids bit for bit.

Per-group weights (affine and LSQ), dynamic per-token / per-tensor activations, GGUF's Q8_0 /
Q4_0 (``gguf.quants`` is the reference: it reproduces ggml's C quantizers), and the spec fields
that select them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import qat
from qat.quant.layers import QEmbedding, QLinear
from qat.quant.spec import QuantSpec, Recipe

gguf = pytest.importorskip("gguf")


def _weights(out: int = 24, inp: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    # Heavy tails and special blocks: an all-zero block, opposite-signed ties of |max|.
    w[0, :32] = 0.0
    w[1, 3], w[1, 9] = 0.2, -0.2
    w[2, 40], w[2, 41] = -0.3, 0.3
    w[3] *= 40.0
    return w


def _linear(weight_spec: dict, w: torch.Tensor) -> QLinear:
    spec = QuantSpec.from_dict(weight_spec, base=qat.quant.spec.default_weight_spec())
    layer = QLinear(w.shape[1], w.shape[0], weight_spec=spec, activation_spec=QuantSpec(bits=32))
    with torch.no_grad():
        layer.weight.copy_(w)
    layer.train()
    layer.weight_quant(layer.weight)  # observe
    return layer.eval()


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (8, 128), (3, 32)])
def test_per_group_weights_equal_their_formula(bits: int, group: int) -> None:
    w = _weights()
    layer = _linear({"bits": bits, "group_size": group, "reduce_range": False}, w)
    got = layer.weight_quant(layer.weight).detach()
    # Formula, in numpy float32: one symmetric scale amax / qmax per group of each row.
    qmax = 2 ** (bits - 1) - 1
    v = w.numpy().astype(np.float32).reshape(-1, group)
    scale = np.abs(v).max(axis=1) / np.float32(qmax)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    inv = (np.float32(1.0) / scale)[:, None]
    expected = np.clip(np.round(v * inv), -qmax - 1, qmax) * scale[:, None]
    assert torch.equal(got, torch.from_numpy(expected.reshape(w.shape).astype(np.float32)))


def test_lsq_group_scales_learn_with_lsq_gradients() -> None:
    w = _weights(8, 64)
    layer = _linear({"bits": 4, "group_size": 32, "learned": "lsq"}, w)
    q = layer.weight_quant
    assert isinstance(q.scale, nn.Parameter) and q.scale.shape == (16,)
    layer.train()
    q.enable_observer(False)
    out = q(layer.weight)
    v = w.reshape(-1, 32)
    s = q.scale.detach()[:, None]
    expected = torch.clamp(torch.round(v * (1.0 / s)), -8, 7) * s
    assert torch.equal(out.detach(), expected.reshape(w.shape))
    out.sum().backward()
    # LSQ's step-size gradient per group: sum of (round(v/s) − v/s) inside, clip level outside,
    # times 1/sqrt(N·Qp) with N = 32 elements per scale.
    r = v * (1.0 / s)
    inside = (torch.round(r) >= -8) & (torch.round(r) <= 7)
    d = torch.where(inside, torch.round(r) - r, torch.clamp(torch.round(r), -8, 7))
    grad = d.sum(dim=1) / (32 * 7) ** 0.5
    torch.testing.assert_close(q.scale.grad, grad, rtol=1e-5, atol=1e-6)


def _dynamic_reference(x: np.ndarray, qmin: int, qmax: int, axis: int | None) -> np.ndarray:
    """ONNX's DynamicQuantizeLinear arithmetic, over ``axis`` (None: the whole tensor)."""
    lo = np.minimum(x.min(axis=axis, keepdims=True), 0).astype(np.float32)
    hi = np.maximum(x.max(axis=axis, keepdims=True), 0).astype(np.float32)
    scale = ((hi - lo) / np.float32(qmax - qmin)).astype(np.float32)
    scale = np.where(hi == lo, np.float32(1), scale).astype(np.float32)
    zp = np.round(np.clip(np.float32(qmin) - lo / scale, qmin, qmax)).astype(np.float32)
    q = np.clip(np.round(x / scale) + zp, qmin, qmax)
    return ((q - zp) * scale).astype(np.float32)


#: Activation shapes below and above the fused kernels' ``MIN_NUMEL``: eager ops, then the
#: compiled kernel (``qat.quant.dynamic._fused_dynamic_quantize``).
SIZES = [(3, 7, 64), (16, 70, 64)]


@pytest.mark.parametrize("shape", SIZES)
@pytest.mark.parametrize(
    "dynamic,signed", [("token", True), ("token", False), ("tensor", False), ("tensor", True)]
)
def test_dynamic_activations_equal_their_formula(
    dynamic: str, signed: bool, shape: tuple[int, ...]
) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g) * 3
    x[0, 0] = 0.0  # an all-zero token
    x[1, 2] = x[1, 2].abs() + 1  # an all-positive one
    spec = QuantSpec(bits=8, signed=signed, symmetric=False, dynamic=dynamic)
    quant = qat.FakeQuantizer(spec)
    got = quant(x)
    qmin, qmax = (-128, 127) if signed else (0, 255)
    expected = _dynamic_reference(x.numpy(), qmin, qmax, -1 if dynamic == "token" else None)
    assert torch.equal(got, torch.from_numpy(expected))
    # Straight through: the gradient is the identity.
    xr = x.clone().requires_grad_(True)
    quant(xr).sum().backward()
    assert torch.equal(xr.grad, torch.ones_like(x))


def _gguf_roundtrip(x: torch.Tensor, qtype: object) -> torch.Tensor:
    q = gguf.quants.quantize(x.numpy().astype(np.float32), qtype)
    return torch.from_numpy(gguf.quants.dequantize(q, qtype).astype(np.float32)).reshape(x.shape)


@pytest.mark.parametrize("grid", ["q8_0", "q4_0"])
def test_gguf_weight_grids_equal_gguf_quants_bit_for_bit(grid: str) -> None:
    qtype = getattr(gguf.GGMLQuantizationType, grid.upper())
    bits = 8 if grid == "q8_0" else 4
    for seed in range(3):
        w = _weights(32, 256, seed)
        # Values on exact half steps of a block's grid (ties for the rounding rule).
        w[4, :32] = torch.arange(32, dtype=torch.float32) * 0.25 - 4.0
        layer = _linear({"bits": bits, "group_size": 32, "grid": grid}, w)
        got = layer.weight_quant(layer.weight).detach()
        assert torch.equal(got, _gguf_roundtrip(w, qtype)), f"seed {seed}"


@pytest.mark.parametrize("shape", [(2, 5, 96), (16, 70, 96)])
def test_q8_0_activations_equal_gguf_quants_bit_for_bit(shape: tuple[int, ...]) -> None:
    spec = QuantSpec(bits=8, group_size=32, grid="q8_0", dynamic="token")
    x = torch.randn(*shape) * 4
    x[0, 0, :32] = torch.arange(32, dtype=torch.float32) * 0.5 - 8.0
    x[0, 0, 31] = 127.0  # d = 1: the half steps above are ties of the rounding
    x[0, 1, :32] = 0.0  # a block with d = 0
    got = qat.FakeQuantizer(spec)(x)
    ref = _gguf_roundtrip(x.reshape(-1, shape[-1]), gguf.GGMLQuantizationType.Q8_0)
    assert torch.equal(got, ref.reshape(x.shape))


@pytest.mark.parametrize("serial", [True, False])
@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(bits=8, signed=True, symmetric=False, dynamic="token"),
        QuantSpec(bits=8, signed=True, symmetric=True, dynamic="token"),
        QuantSpec(bits=8, signed=False, symmetric=True, dynamic="tensor"),
        QuantSpec(bits=4, signed=True, symmetric=True, dynamic="token", group_size=32),
        QuantSpec(bits=8, signed=False, symmetric=False, dynamic="token", group_size=64),
        QuantSpec(bits=8, group_size=32, grid="q8_0", dynamic="token"),
    ],
    ids=["token", "token-sym", "tensor-sym-unsigned", "group32-4bit", "group64", "q8_0"],
)
def test_the_compiled_dynamic_kernel_is_bitwise_the_eager_one(
    spec: QuantSpec, serial: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large activations take one compiled kernel (on one thread or two), with the eager
    ops' values bit for bit, sign of zero included; a slice is quantized as its copy."""
    from qat.quant import fake_quant
    from qat.quant.dynamic import _fused_dynamic_quantize, dynamic_quantize

    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 70, 128, generator=g) * 3
    x[0, 0] = 0.0
    x[0, 1] = -x[0, 1].abs()  # an all-negative token
    x[1, :, :5] = torch.tensor([0.5, -0.5, 1.5, -0.0, 2.5])
    assert x.numel() >= fake_quant.fused.MIN_NUMEL
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(fake_quant.fused, "serial_numel", x.numel() + 1 if serial else 0)
    try:
        for inputs in (x, x[:, :, :64]):
            got, want = _fused_dynamic_quantize(inputs, spec), dynamic_quantize(inputs, spec)
            assert torch.equal(got, want) and got.signbit().equal(want.signbit())
            assert got.shape == inputs.shape
    finally:
        torch.set_num_threads(threads)
    assert ("_dynamic_rows", serial) in fake_quant.fused._compiled
    assert not fake_quant.fused.failed


def test_embedding_weight_only_per_group() -> None:
    emb = nn.Embedding(40, 64)
    recipe = {
        "embedding": {"bits": 4, "group_size": 32, "grid": "q4_0"},
        "activation": {"bits": 32},
    }
    model = qat.prepare(nn.Sequential(emb), recipe, capture="modules")
    qemb = model[0]
    assert isinstance(qemb, QEmbedding)
    qemb.train()
    ids = torch.arange(40).reshape(4, 10)
    out = qemb(ids)
    table = _gguf_roundtrip(emb.weight.detach(), gguf.GGMLQuantizationType.Q4_0)
    assert torch.equal(out.detach(), table[ids])


def test_grouped_quantizer_switched_off_passes_the_tensor_itself() -> None:
    # Lightning's model summary counts FLOPs under no_grad with hooks on the autograd graph;
    # a reshape round trip of the table there has requires_grad and no grad_fn (a crash).
    from torch.utils.flop_counter import FlopCounterMode

    recipe = {
        "embedding": {"bits": 4, "group_size": 32, "grid": "q4_0"},
        "activation": {"bits": 32},
    }
    model = qat.prepare(nn.Sequential(nn.Embedding(40, 64)), recipe, capture="modules")
    qemb = model[0]
    qemb.weight_quant.enable_fake_quant(False)
    assert qemb.weight_quant(qemb.weight) is qemb.weight
    with torch.no_grad(), FlopCounterMode(display=False):
        out = model(torch.arange(40).reshape(4, 10))
    assert torch.equal(out, qemb.weight.detach()[torch.arange(40).reshape(4, 10)])


@pytest.mark.parametrize(
    "fields,key",
    [
        ({"group_size": 48}, "group_size=48"),
        ({"dynamic": "row"}, "dynamic='row'"),
        ({"grid": "q5_0"}, "grid='q5_0'"),
        ({"grid": "q4_0", "bits": 4}, "group_size=0"),
        ({"grid": "q4_0", "bits": 8, "group_size": 32}, "bits=8"),
        ({"dynamic": "token", "learned": "lsq"}, "learned='lsq'"),
        ({"dynamic": "tensor", "group_size": 32, "per_channel": False}, "group_size=32"),
        ({"group_size": 32, "per_channel": False}, "group_size=32"),
    ],
)
def test_bad_llm_fields_name_the_field(fields: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        QuantSpec(**{"per_channel": "group_size" in fields, **fields})


def test_recipe_refuses_static_grouped_activations_and_dynamic_weights() -> None:
    with pytest.raises(ValueError, match=r"group_size=32 is invalid.*dynamic=token"):
        Recipe.from_dict({"activation": {"group_size": 32}})
    with pytest.raises(ValueError, match=r"Recipe\.activation\.group_size=32"):
        Recipe.from_dict({"activation": {"group_size": 32, "per_channel": True}})
    with pytest.raises(ValueError, match=r"Recipe\.weight\.dynamic='token'"):
        Recipe.from_dict({"weight": {"dynamic": "token", "per_channel": False}})


def test_group_size_that_does_not_divide_names_the_layer() -> None:
    model = nn.Sequential(nn.Linear(48, 8))
    with pytest.raises(ValueError, match=r"layer '0'.*does not divide the input size 48"):
        qat.prepare(model, {"weight": {"bits": 4, "group_size": 32}}, capture="modules")
