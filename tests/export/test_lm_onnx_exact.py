"""The ONNX language-model exports compute what the fake-quant model computes, bit for bit.

Under :func:`qat.runtime_numerics` a GPT's dynamically quantized linears compute ONNX Runtime's
kernels (``MatMulNBits`` int8, ``DynamicQuantizeMatMul``; :mod:`qat.quant.runtime_matmul`) and
its float islands in float64 (:mod:`qat.quant.float_island`), as the exported graph does: the
logits are equal, not close. The kernel emulation is of ONNX Runtime's x86 AVX-512 VNNI
kernels; on other CPUs the exactness tests skip (the agreement thresholds of
test_lm_export.py still apply everywhere).
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

from lm_helpers import SEQ, lm_recipe, lm_test_batches  # noqa: E402


def _has_avx512_vnni() -> bool:
    try:
        return "avx512_vnni" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


needs_vnni = pytest.mark.skipif(
    not _has_avx512_vnni(), reason="emulates ONNX Runtime's x86 AVX-512 VNNI kernels"
)


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


def _gpt128(recipe: str) -> torch.nn.Module:
    """A GPT whose layers ONNX Runtime's int8 kernel takes as emulated (K a multiple of 128)."""
    from qat.models import create_model

    torch.manual_seed(0)
    model = create_model("gpt", d_model=128, n_layers=1, n_heads=2, context_length=SEQ)
    x = lm_test_batches(1)[0][0]
    model = qat.prepare(model, lm_recipe(recipe), example_inputs=x[:2])
    model.train()
    with torch.no_grad():
        model(x)  # weight ranges; the activations are dynamic
    return model.eval()


@needs_vnni
@pytest.mark.parametrize("recipe,kind", [("lm_q4_0", "nbits_int8"), ("lm_w8da8", "dynamic_int8")])
def test_onnx_logits_equal_the_runtime_numerics_of_the_fake_quant_model(
    recipe: str, kind: str, tmp_path: Path
) -> None:
    model = _gpt128(recipe)
    kinds = {ort_linear_kind(m) for m in model.modules() if hasattr(m, "act_quant")}
    assert kind in kinds
    x = lm_test_batches(1)[0][0]
    path = export_lm(model, tmp_path, x[:1], targets=["onnx"])["onnx"]
    for level in (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    ):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        out = torch.from_numpy(sess.run(None, {"input_ids": x.numpy()})[0])
        with torch.no_grad(), qat.runtime_numerics(model):
            ref = model(x)
        assert torch.equal(out, ref), float((out - ref).abs().max())


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
