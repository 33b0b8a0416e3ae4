"""Exact evaluation requantizes integer layers as the runtimes do (float32 multiplier on int32).

The case below is the one MobileNetV2 W4A4 hit in a depthwise conv: input code 5 times weight
level 5 gives an int32 sum of 25, and ``25 · s_in · s_w / s_out`` is 3.4999998, 2e-7 below a
tie. Both runtimes round it to 3; quantizing the float sum (``round(y · (1/s_out))``, two float32
roundings) gave 4, on every output with that sum.

"Both runtimes" means ONNX Runtime and TorchScript on PyTorch's fbgemm kernels. On a CPU with
VNNI, PyTorch's default ``x86`` engine runs the conv through oneDNN instead, which rounds this
near-tie up to 4 (seen 2026-12-02 on an AVX-512 VNNI AMD EPYC; fbgemm and ONNX Runtime gave 3
on the same machine), so the TorchScript export builds and loads under fbgemm whatever engine the
caller has set; the tests below run it under the default engine to hold it to that.
"""

from __future__ import annotations

import io

import onnxruntime as ort
import pytest
import torch
from export_helpers import Wrap, pinned_conv, quantize, recipe
from torch import nn

from qat import runtime_numerics, snap_bias
from qat.export.convert import convert
from qat.export.onnx import build_onnx_model
from qat.export.torchscript import (
    build_integer_model,
    load_torchscript,
    quantized_engine,
    save_torchscript,
    trace_integer_model,
)

S_IN, S_W, S_OUT = 0.2058054655790329, 0.19502262771129608, 0.286690890789032


def _near_tie_model() -> nn.Module:
    return pinned_conv(4, S_IN, S_W, S_OUT, weight=5 * S_W)


def _runtimes(q: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs of the traced model, the same model saved and loaded again, and ONNX Runtime."""
    converted = convert(q, x)
    engine = torch.backends.quantized.engine
    traced = trace_integer_model(build_integer_model(q, x, converted), x)
    buf = io.BytesIO()
    save_torchscript(traced, buf)
    buf.seek(0)
    loaded = load_torchscript(buf)
    assert torch.backends.quantized.engine == engine  # the caller's engine is left as it was
    with torch.no_grad():
        ts, ts_loaded = traced(x), loaded(x)
    proto = build_onnx_model(q, x, converted)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return {
        "torchscript": ts,
        "torchscript_loaded": ts_loaded,
        "onnx": torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]),
    }


def test_exact_evaluation_rounds_a_near_tie_as_both_runtimes() -> None:
    q = _near_tie_model()
    x = torch.full((1, 1, 2, 2), 5 * S_IN)
    with torch.no_grad(), runtime_numerics(q):
        unpinned = q(x)
    snap_bias(q, x)
    assert q.body.runtime_input_scale == pytest.approx(S_IN)
    with torch.no_grad(), runtime_numerics(q):
        pinned = q(x)
    # Quantizing the float sum rounds the wrong way; the runtimes' arithmetic does not.
    assert torch.equal(unpinned, torch.full_like(x, 4 * S_OUT))
    assert torch.equal(pinned, torch.full_like(x, 3 * S_OUT))
    for name, out in _runtimes(q, x).items():
        assert torch.equal(out, pinned), name


def test_input_off_the_pinned_grid_falls_back_to_the_float_sum() -> None:
    q = _near_tie_model()
    x = torch.full((1, 1, 2, 2), 5 * S_IN)
    snap_bias(q, x)
    with torch.no_grad():
        q.input_quant.scale.fill_(S_IN * 1.01)  # ranges moved after snap_bias
        with runtime_numerics(q):
            out = q(x)
        q.body.runtime_input_scale = None
        with runtime_numerics(q):
            ref = q(x)
    assert torch.equal(out, ref)


def test_training_and_plain_eval_ignore_the_pinned_grid() -> None:
    q = _near_tie_model()
    x = torch.full((1, 1, 2, 2), 5 * S_IN)
    snap_bias(q, x)
    with torch.no_grad():
        assert torch.equal(q(x), torch.full_like(x, 4 * S_OUT))  # no runtime_numerics


@pytest.mark.parametrize("bits", [8, 4])
def test_exact_evaluation_equals_both_runtimes_bit_for_bit(bits: int) -> None:
    """Depthwise + pointwise conv-BN-ReLU blocks and a linear head: every output identical."""
    torch.manual_seed(bits)
    body = nn.Sequential(
        nn.Conv2d(3, 16, 1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 8, 1),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 10),
    )

    def batch() -> torch.Tensor:
        return torch.randn(16, 3, 6, 6)

    q = quantize(Wrap(body), recipe(bits), batch)
    x = batch()
    snap_bias(q, x[:4])
    with torch.no_grad(), runtime_numerics(q):
        ref = q(x)
    for name, out in _runtimes(q, x).items():
        assert torch.allclose(out, ref, rtol=0, atol=1e-5), name


def test_the_engine_is_pinned_only_inside_the_block() -> None:
    before = torch.backends.quantized.engine
    with quantized_engine():
        assert torch.backends.quantized.engine == "fbgemm"
    assert torch.backends.quantized.engine == before
    with (
        pytest.raises(RuntimeError, match=r"not in this build.*export.targets=\[onnx\]"),
        quantized_engine("no_such_engine"),
    ):
        pass
    assert torch.backends.quantized.engine == before


def test_load_under_x86_for_speed_stays_within_one_output_level() -> None:
    """``load_torchscript(engine="x86")`` packs for the x86 engine (oneDNN convs on VNNI), so a
    near-tie may land one level off, never more; the caller's engine comes back either way."""
    q = _near_tie_model()
    x = torch.full((1, 1, 2, 2), 5 * S_IN)
    snap_bias(q, x)
    traced = trace_integer_model(build_integer_model(q, x, convert(q, x)), x)
    buf = io.BytesIO()
    save_torchscript(traced, buf)
    before = torch.backends.quantized.engine
    outs = {}
    for engine in ("fbgemm", "x86"):
        buf.seek(0)
        with torch.no_grad():
            outs[engine] = load_torchscript(buf, engine=engine)(x)
        assert torch.backends.quantized.engine == before
    assert torch.equal(outs["fbgemm"], torch.full_like(x, 3 * S_OUT))
    assert (outs["x86"] - outs["fbgemm"]).abs().max() <= S_OUT * 1.0001
    buf.seek(0)
    with pytest.raises(RuntimeError, match="not in this build"):
        load_torchscript(buf, engine="fbgem")
    assert torch.backends.quantized.engine == before
