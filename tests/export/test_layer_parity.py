"""Single layers and small blocks: TorchScript and ONNX Runtime within one output step.

Every case is exported in-process (no files) for W8A8 / W4A4 and per-channel / per-tensor
weights, and compared element by element with the fake-quant model on a fresh batch.
"""

from __future__ import annotations

import warnings
import zlib

import numpy as np
import onnxruntime as ort
import pytest
import torch
from export_helpers import Wrap, max_steps, quantize, recipe
from torch import nn

from qat import runtime_numerics, snap_bias
from qat.export.convert import convert
from qat.export.ir import ConvertedModel
from qat.export.onnx import build_onnx_model, optimized_op_types
from qat.export.torchscript import build_integer_model, integer_ops, trace_integer_model
from qat.ops import Add, Cat
from qat.quant.runtime_add import qlinear_add_levels, quantized_add_levels

TOL = 1.0 + 1e-4  # one output step (float rounding of the division aside)


def _randomize_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.conv2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.add = Add(relu=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add(self.conv2(self.conv1(x)), x)


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU())
        self.b = nn.Conv2d(8, 6, 3, padding=1)
        self.cat = Cat(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cat([self.a(x), self.b(x), x])


class Tokens(nn.Module):
    """A linear layer on (N, T, K) input (exported as reshape → QGemm → reshape)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


CASES = {
    # name: (model factory, input shape)
    "conv": (lambda: nn.Conv2d(3, 8, 3, padding=1), (3, 8, 8)),
    "conv_stride2": (lambda: nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), (3, 9, 9)),
    "depthwise": (lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8), (8, 6, 6)),
    "linear": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(24, 10)), (24,)),
    "linear_relu": (lambda: nn.Sequential(nn.Linear(24, 16), nn.ReLU()), (24,)),
    "linear_tokens": (Tokens, (4, 12)),
    "convbnrelu": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        ),
        (3, 8, 8),
    ),
    "residual": (Residual, (8, 6, 6)),
    "concat": (Concat, (8, 5, 5)),
}


def _build(name: str, bits: int, per_channel: bool, **rec_extra) -> tuple[nn.Module, tuple]:
    torch.manual_seed(zlib.crc32(f"{name}-{bits}-{per_channel}".encode()))
    factory, shape = CASES[name]
    model = Wrap(factory())
    _randomize_bn(model)

    def batch() -> torch.Tensor:
        return torch.randn(16, *shape)

    q = quantize(model, recipe(bits, per_channel, **rec_extra), batch)
    # The fake-quant model adds the int32 bias the runtimes add (without this, ONNX outputs
    # within s_in·s_w/2 of a level boundary round the other way: see test_model_export).
    snap_bias(q, batch())
    return q, shape


def _tolerance(converted: ConvertedModel) -> float:
    """One output step, plus one level of every input that an integer conv / linear produced.

    An integer layer may round an output that lies within float error (TorchScript) or within
    the int32 bias rounding (ONNX: ``s_in·s_w/2``) of a level boundary the other way; a block
    then sees that input one level off. For a single layer this adds nothing.
    """
    out = converted.output
    last = next(d for d in converted.layers.values() if d.output == out)
    producers = {d.output: d for d in converted.layers.values() if d.kind in ("conv", "linear")}
    extra = sum(g.scale for g in last.inputs if g in producers) / out.scale
    return TOL + extra


def _flips(out: torch.Tensor, ref: torch.Tensor, scale: float) -> int:
    return int(((out - ref).abs() > scale / 2).sum())


def _max_flips(ref: torch.Tensor) -> float:
    """Outputs a level apart: only at float ties (the runtimes round x/s, the fake quantizer
    x·(1/s); the float conv and the integer one accumulate differently). One input tie moves
    up to a handful of the outputs that read it, hence the floor."""
    return max(10, 1e-3 * ref.numel())


def _check(q: nn.Module, shape: tuple) -> None:
    x = torch.randn(32, *shape) * 1.2  # beyond the calibrated range too: clamps are exercised
    converted = convert(q, x[:4])
    with torch.no_grad():
        ref = q(x)
    scale = converted.output.scale
    tol = _tolerance(converted)

    integer = build_integer_model(q, x[:4], converted)
    traced = trace_integer_model(integer, x[:4])
    with torch.no_grad():
        ts_out = traced(x)
    assert max_steps(ts_out, ref, scale) <= tol
    assert _flips(ts_out, ref, scale) <= _max_flips(ref)
    assert "quantized::conv2d" in " ".join(integer_ops(traced)) or "quantized::linear" in " ".join(
        integer_ops(traced)
    )

    proto = build_onnx_model(q, x[:4], converted)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ort_out = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    assert max_steps(ort_out, ref, scale) <= tol
    assert _flips(ort_out, ref, scale) <= _max_flips(ref)
    # Both runtimes produce values on the output grid.
    levels = ort_out / scale
    assert torch.allclose(levels, levels.round(), atol=1e-3)


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
@pytest.mark.parametrize("bits", [8, 4], ids=["w8a8", "w4a4"])
@pytest.mark.parametrize("name", list(CASES))
def test_layer_parity(name: str, bits: int, per_channel: bool) -> None:
    q, shape = _build(name, bits, per_channel)
    _check(q, shape)


@pytest.mark.parametrize("bits", [8, 3])
def test_signed_activations_live_in_the_u8_container(bits: int) -> None:
    """A signed activation grid is shifted into u8 (zero point + 2^(b-1)), values unchanged."""
    q, shape = _build(
        "residual", bits, True, **{"activation": {"bits": bits, "signed": True, "symmetric": True}}
    )
    converted = convert(q, torch.randn(2, *shape))
    grid = converted.layers["body.add"].output
    assert grid.signed and grid.zero_point == 2 ** (bits - 1) and grid.qmax == 2**bits - 1
    _check(q, shape)


def test_relu_with_nonzero_zero_point_becomes_an_integer_clip() -> None:
    """relu then quantize == max(quantize, z): a ReLU whose zero point is not 0 stays exact."""
    q, shape = _build("convbnrelu", 8, True)
    out_q = q.body[0].output_quant
    with torch.no_grad():
        out_q.zero_point.fill_(7)  # e.g. a learned (LSQ+) offset
    _check(q, shape)
    proto = build_onnx_model(q, torch.randn(2, *shape))
    assert "Clip" in [n.op_type for n in proto.graph.node]


def test_weights_are_int8_initializers_with_int32_bias() -> None:
    q, shape = _build("conv", 8, True)
    proto = build_onnx_model(q, torch.randn(2, *shape))
    from onnx import TensorProto, numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    dq_inputs = [
        (inits.get(n.input[0]), n) for n in proto.graph.node if n.op_type == "DequantizeLinear"
    ]
    kinds = {t.data_type for t, _ in dq_inputs if t is not None}
    assert TensorProto.INT8 in kinds and TensorProto.INT32 in kinds
    w_dq = next(n for t, n in dq_inputs if t is not None and t.data_type == TensorProto.INT8)
    assert {a.name: a.i for a in w_dq.attribute}.get("axis") == 0
    # No float weight is quantized inside the graph: every Q reads an activation.
    for n in proto.graph.node:
        if n.op_type == "QuantizeLinear":
            assert n.input[0] not in inits
    w = numpy_helper.to_array(inits[w_dq.input[0]])
    assert w.dtype == np.int8 and w.shape == (8, 3, 3, 3)


def _add_codes(proto, x: torch.Tensor) -> tuple:
    """ORT's input and output codes of the residual add, and the add's quantization params
    (the output's scale from the DQ that reads it: its Q quantizes at scale 1 after Mul(1/s))."""
    from onnx import TensorProto, helper, numpy_helper

    from qat.export.onnx.passes import _Graph

    graph = proto.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    g = _Graph(graph)
    producers, consumers = g.producers(), g.consumers()
    add = next(n for n in graph.node if n.op_type in ("Add", "Sum"))
    dqs = [producers[i] for i in add.input]
    out = add
    while out.op_type != "DequantizeLinear":  # Add → [Mul(1/s)] → Q → [Clip] → DQ
        out = consumers[out.output[0]][0]
    names = [dqs[0].input[0], dqs[1].input[0], out.input[0]]  # the codes after the Clip
    for name in names:
        graph.output.append(helper.make_tensor_value_info(name, TensorProto.UINT8, None))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    a, b, c = sess.run(names, {"input": x.numpy()})
    params = [(inits[n.input[1]], inits[n.input[2]]) for n in (*dqs, out)]
    return a, b, c, params


@pytest.mark.parametrize("bits", [8, 4], ids=["a8", "a4"])
def test_residual_add_runs_qlinear_add_and_the_fake_quant_model_computes_it(
    bits: int, tmp_path
) -> None:
    """The add is ``DQ, DQ → Add → Q``, which ONNX Runtime fuses into ``QLinearAdd``; its output
    codes are :func:`qlinear_add_levels` of its input codes (then the ReLU / 4-bit Clip), and
    the fake-quant add computes the same codes from the same inputs under runtime numerics."""
    q, shape = _build("residual", bits, True)
    x = torch.randn(256, *shape) * 1.2
    proto = build_onnx_model(q, x[:4])
    assert "Add" in [n.op_type for n in proto.graph.node]
    path = tmp_path / "model.onnx"
    path.write_bytes(proto.SerializeToString())
    ops = optimized_op_types(path)
    assert ops["QLinearAdd"] == 1 and "Add" not in ops, ops
    a, b, c, ((sa, za), (sb, zb), (sc, zc)) = _add_codes(proto, x)
    grids = [(float(sa), int(za)), (float(sb), int(zb)), (float(sc), int(zc))]
    levels = qlinear_add_levels(torch.from_numpy(a), torch.from_numpy(b), *grids)
    top = 2**bits - 1  # the grid's top level (its integer Clip below 8 bits)
    expect = levels.clamp(int(zc), top).numpy()  # add + ReLU
    np.testing.assert_array_equal(c.astype(np.float32), expect)
    f32 = np.float32
    xa = torch.from_numpy((a.astype(f32) - f32(za)) * f32(sa))
    xb = torch.from_numpy((b.astype(f32) - f32(zb)) * f32(sb))
    add = q.body.add
    assert add.runtime_input_grids == tuple(grids[:2])  # pinned by snap_bias
    with torch.no_grad(), runtime_numerics(q):
        fq = add(xa, xb)
    np.testing.assert_array_equal(np.rint(fq.numpy() / f32(sc)) + f32(zc), expect)
    # The same input codes through PyTorch's quantized::add_relu, the TorchScript model's add.
    qa, qb = (_qtensor(v, s, z) for v, (s, z) in zip((a, b), grids, strict=False))
    ts = torch.ops.quantized.add_relu(qa, qb, float(sc), int(zc)).int_repr().float()
    with torch.no_grad(), runtime_numerics(q, target="torchscript"):
        fq_ts = add(xa, xb)
    np.testing.assert_array_equal(np.rint(fq_ts.numpy() / f32(sc)) + f32(zc), ts.clamp(max=top))


def _qtensor(levels: np.ndarray | torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """A quint8 tensor holding ``levels`` (the quantized-tensor API warns it is deprecated)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        codes = torch.as_tensor(levels).to(torch.uint8)
        return torch._make_per_tensor_quantized_tensor(codes, scale, zero_point)


@pytest.mark.parametrize("relu", [False, True], ids=["add", "add_relu"])
def test_quantized_add_levels_is_pytorchs_quantized_add(relu: bool) -> None:
    """Random grids and codes, one thread, a length the vectorized loop covers whole:
    :func:`quantized_add_levels` equals ``quantized::add`` on every element, where the
    fake-quant rounding of the dequantized sum (``round((a + b) · (1/s_c))``) does not."""
    gen = torch.Generator().manual_seed(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    plain_differs = 0
    try:
        for _ in range(40):
            sa, sb, sc = (torch.empty(3).uniform_(0.005, 0.1, generator=gen)).tolist()
            za, zb, zc = torch.randint(0, 256, (3,), generator=gen).tolist()
            a, b = torch.randint(0, 256, (2, 128 * 256), generator=gen).float()
            grids = [(sa, za), (sb, zb), (sc, zc)]
            op = torch.ops.quantized.add_relu if relu else torch.ops.quantized.add
            qa, qb = (_qtensor(v, s, z) for v, (s, z) in zip((a, b), grids, strict=False))
            expect = op(qa, qb, sc, zc).int_repr().float()
            levels = quantized_add_levels(a, b, *grids)
            if relu:
                levels = levels.clamp(min=zc)
            assert torch.equal(levels, expect)
            s32 = [torch.tensor(s, dtype=torch.float32) for s in (sa, sb, sc)]
            total = (a - za) * s32[0] + (b - zb) * s32[1]
            if relu:
                total = total.clamp(min=0)
            plain = (torch.round(total * (1 / s32[2])) + zc).clamp(0, 255)
            plain_differs += int((plain != expect).sum())
    finally:
        torch.set_num_threads(threads)
    assert plain_differs > 0
