"""The bit-exact ONNX language-model files (``float_islands="float64"``, an opt-in) compute what
the fake-quant model computes, bit for bit.

Under :func:`qat.runtime_numerics` a GPT's dynamically quantized linears compute ONNX Runtime's
kernels (``MatMulNBits`` int8, the int8 GEMMs; :mod:`qat.quant.runtime_matmul`) and
its float islands in float64 (:mod:`qat.quant.float_island`), as the exported graph does: the
logits are equal, not close. ``DynamicQuantizeMatMul`` sums exactly and rounds its epilogue in
a fixed order, so that holds on every x86 CPU. ``MatMulNBits``' int8 kernel combines its
blocks in float32 in an order the emulation takes from ONNX Runtime's AVX-512 VNNI kernel; on
other CPUs (AVX2: the CI's class) it sums in another order, within float32 rounding of the
same value, and where such a difference moves a later layer's Q8_0 code by one level the
logits of that position move by about a level's effect. There the test checks that contract:
next-token agreement >= 99.9%, few positions moved beyond float32 rounding, and a small
largest move.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

import qat
from qat.export.stage_lm import export_lm
from qat.quant.runtime_matmul import _fma32, ort_linear_kind

ort = pytest.importorskip("onnxruntime")

from lm_helpers import SEQ, lm_recipe, lm_test_batches, w8da8_per_tensor  # noqa: E402


def _has_avx512_vnni() -> bool:
    try:
        return "avx512_vnni" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


#: Whether ONNX Runtime runs the kernels :mod:`qat.quant.runtime_matmul` emulates here.
VNNI = _has_avx512_vnni()


def _exact_fma32(a: float, b: float, c: float) -> float:
    """float32(a·b + c) with one rounding (round half to even), from exact rationals."""
    exact = Fraction(a) * Fraction(b) + Fraction(c)
    lo = float(np.float32(float(exact)))  # a float32 next to the exact value
    cands = sorted(
        {np.float32(lo), np.nextafter(np.float32(lo), np.float32(np.inf))}
        | {np.nextafter(np.float32(lo), np.float32(-np.inf))}
    )
    best = min(cands, key=lambda v: (abs(Fraction(float(v)) - exact), int(v.view(np.int32)) & 1))
    return float(best)


def test_fma32_rounds_once_even_where_float64_lands_on_a_float32_midpoint() -> None:
    gen = torch.Generator().manual_seed(0)
    a = (torch.randn(2000, generator=gen) * 100).float()
    b = (torch.randn(2000, generator=gen) * 1e-3).float()
    c = torch.randn(2000, generator=gen).float()
    # a·b + c = a float32 midpoint ∓ 2^-70: float64 rounds onto the midpoint, and rounding
    # that half to even picks the wrong neighbour (c's mantissa is odd).
    u = 2.0**-23
    a = torch.cat([a, torch.tensor([2**-24 * (1 + u), -(2**-24) * (1 + u)] * 2)])
    b = torch.cat([b, torch.tensor([1 - u, 1 - u, -(1 - u), -(1 - u)])])
    c = torch.cat([c, torch.tensor([1 + u, 1 + u, -(1 + u), -(1 + u)])])
    got = _fma32(a, b, c)
    naive = (a.double() * b.double() + c.double()).float()
    assert (naive[-4:] != got[-4:]).all()  # the cases do catch a double rounding
    for i in [*range(0, 2000, 20), *range(2000, 2004)]:
        want = _exact_fma32(float(a[i]), float(b[i]), float(c[i]))
        assert float(got[i]) == want, (i, float(a[i]), float(b[i]), float(c[i]))


def _gpt128(recipe: str | dict) -> torch.nn.Module:
    """A GPT whose layers ONNX Runtime's int8 kernel takes as emulated (K a multiple of 128)."""
    from qat.models import create_model

    torch.manual_seed(0)
    model = create_model("gpt", d_model=128, n_layers=1, n_heads=2, context_length=SEQ)
    x = lm_test_batches(1)[0][0]
    rec = lm_recipe(recipe) if isinstance(recipe, str) else recipe
    model = qat.prepare(model, rec, example_inputs=x[:2])
    model.train()
    with torch.no_grad():
        model(x)  # weight ranges; the activations are dynamic
    return model.eval()


@pytest.mark.parametrize(
    "recipe,kind",
    [("lm_q4_0", "nbits_int8"), ("lm_w8da8", "token_int8"), ("per_tensor", "dynamic_int8")],
)
def test_onnx_logits_equal_the_runtime_numerics_of_the_fake_quant_model(
    recipe: str, kind: str, tmp_path: Path
) -> None:
    """Bit for bit where this CPU runs the emulated kernels (``DynamicQuantizeMatMul``
    everywhere, ``MatMulNBits`` on AVX-512 VNNI); per-token int8 within float32 rounding;
    elsewhere the contract in the docstring."""
    model = _gpt128(w8da8_per_tensor() if recipe == "per_tensor" else recipe)
    kinds = {ort_linear_kind(m) for m in model.modules() if hasattr(m, "act_quant")}
    assert kind in kinds
    x = lm_test_batches(1)[0][0]
    path = export_lm(model, tmp_path, x[:1], targets=["onnx"], float_islands="float64")["onnx"]
    with torch.no_grad(), qat.runtime_numerics(model):
        ref = model(x)
    exact = kind == "dynamic_int8" or (kind == "nbits_int8" and VNNI)
    for level in (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    ):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        out = torch.from_numpy(sess.run(None, {"input_ids": x.numpy()})[0])
        diff = (out - ref).abs()
        if exact:
            assert torch.equal(out, ref), float(diff.max())
            continue
        if kind == "token_int8":
            # ONNX Runtime's float64 LayerNorm rounds a few float32 outputs the other way
            # (one ulp); where that element is its row's max, the row's int8 scale moves by
            # an ulp too: the logits stay within float32 rounding, every top-1 the same.
            assert float(diff.max()) <= 1e-6 * float(ref.abs().max()), float(diff.max())
            assert torch.equal(out.argmax(-1), ref.argmax(-1))
            continue
        # AVX2 here (ORT 1.32, 16 x 64 tokens): 100% agreement, 0.6% of positions moved
        # beyond 1e-4 (a Q8_0 code one level off upstream), largest move 0.7% of max |logit|.
        agreement = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
        moved = float((diff.amax(-1) > 1e-4).float().mean())
        assert agreement >= 0.999, agreement
        assert moved <= 0.02, moved
        assert float(diff.max()) <= 0.02 * float(ref.abs().max()), float(diff.max())
        # The typical logit is the emulation's to within float32 rounding.
        assert float(diff.median()) <= 1e-6 * float(ref.abs().max()), float(diff.median())


def test_float32_islands_are_recorded_and_verified_against_the_plain_model(
    tmp_path: Path,
) -> None:
    import onnx

    from qat.export.onnx.llm import ISLANDS_KEY, build_lm_onnx
    from qat.export.verify_lm import verify_lm_artifacts

    model = _gpt128("lm_w8da8")
    x = lm_test_batches(1)[0][0]
    with pytest.raises(ValueError, match="float_islands='float16'"):
        build_lm_onnx(model, x[:1], float_islands="float16")
    proto = build_lm_onnx(model, x[:1], float_islands="float32")
    assert {p.key: p.value for p in proto.metadata_props}[ISLANDS_KEY] == "float32"
    assert not any(
        n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.DOUBLE
        for n in proto.graph.node
    )
    path = tmp_path / "model.onnx"
    onnx.save(proto, path)
    report = verify_lm_artifacts(model, {"onnx": path}, [(x[:4], x[:4])])
    with torch.no_grad():
        plain = model(x[:4])
    ppl = torch.exp(torch.nn.functional.cross_entropy(plain.flatten(0, 1), x[:4].flatten()))
    # Its reference is the plain (float32) evaluation, not the runtime-numerics one.
    assert report["runtimes"]["onnx"]["reference_perplexity"] == pytest.approx(float(ppl), 1e-6)
