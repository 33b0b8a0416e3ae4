"""Exact evaluation requantizes integer layers as the runtimes do (float32 multiplier on int32).

The case below is the one MobileNetV2 W4A4 hit in a depthwise conv: input code 5 times weight
level 5 gives an int32 sum of 25, and ``25 · s_in · s_w / s_out`` is 3.4999998, 2e-7 below a
tie. ONNX Runtime and fbgemm round it to 3; quantizing the float sum (``round(y · (1/s_out))``,
two float32 roundings) gave 4, on every output with that sum.

On a CPU with AVX-512 VNNI, PyTorch's default ``x86`` engine runs the conv through oneDNN
instead, which applies the scales one at a time and rounds this near-tie up to 4 (seen on an
AVX-512 VNNI AMD EPYC); the ``torchscript_x86`` numerics reproduce that, so the TorchScript
model is held to the target its engine computes (:func:`numerics_target`).
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
    ENGINE,
    build_integer_model,
    load_torchscript,
    numerics_target,
    quantized_engine,
    save_torchscript,
    trace_integer_model,
)

S_IN, S_W, S_OUT = 0.2058054655790329, 0.19502262771129608, 0.286690890789032


def _near_tie_model() -> nn.Module:
    return pinned_conv(4, S_IN, S_W, S_OUT, weight=5 * S_W)


def _runtimes(q: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Outputs of the traced model, the same model saved and loaded again (both under
    :data:`ENGINE`), and ONNX Runtime."""
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


def _target(runtime: str) -> str:
    return numerics_target() if runtime.startswith("torchscript") else "onnx"


def _reference(q: nn.Module, x: torch.Tensor, target: str) -> torch.Tensor:
    with torch.no_grad(), runtime_numerics(q, target=target):
        return q(x)


def test_exact_evaluation_rounds_a_near_tie_as_each_runtime() -> None:
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
    assert torch.equal(_reference(q, x, "torchscript"), pinned)  # fbgemm's rounding
    # oneDNN's: the scales one at a time put 25 · s_in · s_w / s_out above the tie.
    assert torch.equal(_reference(q, x, "torchscript_x86"), torch.full_like(x, 4 * S_OUT))
    for name, out in _runtimes(q, x).items():
        assert torch.equal(out, _reference(q, x, _target(name))), name


def test_a_bias_snapped_to_within_float_error_adds_its_int32_level_at_a_tie() -> None:
    """A snapped bias is on the int32 grid only to within float32 error: ``b / (s_in·s_w)``
    here is 12501.0005, not the 12501 ONNX Runtime adds. With an int32 sum of −12500 and
    ``M = 0.5`` the output is the tie 0.5, which ONNX Runtime rounds to even (level 0);
    adding the unrounded bias gave 0.50027, level 1."""
    f32 = torch.float32
    s_in, s_w = 0.0123, 0.0077
    scale = float(torch.tensor(s_in, dtype=f32) * torch.tensor(s_w, dtype=f32))
    bias = float(torch.tensor(12501 * scale, dtype=f32))
    assert bias / scale - 12501 > 1e-4  # the float bias is off its level
    q = pinned_conv(8, s_in, s_w, 2 * scale, weight=-50 * s_w, bias=bias)
    x = torch.full((1, 1, 2, 2), 250 * s_in)  # input code 250 · weight level −50
    snap_bias(q, x)
    assert q.body.bias.item() == bias  # already on the grid, as far as float32 goes
    assert torch.equal(_reference(q, x, "onnx"), torch.zeros_like(x))
    for name, out in _runtimes(q, x).items():
        assert torch.equal(out, _reference(q, x, _target(name))), name


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
def test_exact_evaluation_equals_each_runtime_bit_for_bit(bits: int) -> None:
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
    for name, out in _runtimes(q, x).items():
        assert torch.equal(out, _reference(q, x, _target(name))), name


def test_the_engine_is_pinned_only_inside_the_block() -> None:
    before = torch.backends.quantized.engine
    with quantized_engine():
        assert torch.backends.quantized.engine == ENGINE == "x86"
    assert torch.backends.quantized.engine == before
    with (
        pytest.raises(RuntimeError, match=r"not in this build.*export.targets=\[onnx\]"),
        quantized_engine("no_such_engine"),
    ):
        pass
    assert torch.backends.quantized.engine == before


def test_each_engine_loads_exact_against_its_numerics() -> None:
    """The same ``model.ts`` under ``fbgemm`` and ``x86``: each output equals the fake-quant
    model evaluated for that engine; the caller's engine comes back either way."""
    q = _near_tie_model()
    x = torch.full((1, 1, 2, 2), 5 * S_IN)
    snap_bias(q, x)
    traced = trace_integer_model(build_integer_model(q, x, convert(q, x)), x)
    buf = io.BytesIO()
    save_torchscript(traced, buf)
    before = torch.backends.quantized.engine
    for engine in ("fbgemm", "x86"):
        buf.seek(0)
        with torch.no_grad():
            out = load_torchscript(buf, engine=engine)(x)
        assert torch.backends.quantized.engine == before
        assert torch.equal(out, _reference(q, x, numerics_target(engine))), engine
    assert numerics_target("fbgemm") == "torchscript"
    with pytest.raises(ValueError, match="reproduces only"):
        numerics_target("onednn")
    buf.seek(0)
    with pytest.raises(RuntimeError, match="not in this build"):
        load_torchscript(buf, engine="fbgem")
    assert torch.backends.quantized.engine == before
