"""``export.targets=[genai]``: onnxruntime-genai generates, with its KV cache, the fake-quant
model's greedy tokens from the exported folder, whose weights are the trained grids."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from hf_folder import make_hf_folder
from lm_helpers import fake_quant_hf, w8da8_per_tensor

import qat
from qat.export.lm_io import logits_of
from qat.export.onnx.genai import build_genai_folder
from qat.export.onnx.genai_runtime import genai_generate, greedy_tokens, load_genai_runtime


@pytest.mark.parametrize(
    "recipe,op",
    [
        ("lm_w4g32", "MatMulNBits"),
        ("lm_w8da8", "MatMulInteger"),
        ("per_tensor", "DynamicQuantizeMatMul"),
    ],
)
def test_genai_generates_the_fake_quant_models_greedy_tokens(
    hf_dir: Path, tmp_path: Path, recipe: str, op: str
) -> None:
    qmodel = fake_quant_hf(hf_dir, w8da8_per_tensor() if recipe == "per_tensor" else recipe)
    out = tmp_path / "genai"
    report = build_genai_folder(qmodel, out)
    assert {"model.onnx", "genai_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    # Every projection of both blocks and the lm_head is one quantized kernel (q/k/v fused).
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    assert ops.count("MatMul") == 0 and ops.count("GroupQueryAttention") == 2
    assert sum(o in (op, "MatMulNBits") for o in ops) == len(report["nodes"]) == 2 * 5 + 1
    assert ops.count(op) >= 2 * 5

    tokenizer = qat.hf_folder.load_hf_tokenizer(hf_dir)
    prompt = tokenizer("def wrap(text, width=70):\n    return")["input_ids"]
    expected = greedy_tokens(qmodel, prompt, 32)
    assert len(expected) == 32  # no early end-of-sequence: all 32 compared
    assert genai_generate(out, prompt, 32) == expected

    # The whole-sequence logits (the verify step's runtime) are the fake-quant model's.
    ids = torch.tensor([prompt + expected])
    with torch.no_grad():
        ref = logits_of(qmodel, ids)
    got = load_genai_runtime(out)(ids)
    if recipe != "per_tensor":  # per-tensor dynamic activations see the whole sequence here
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    assert bool((got.argmax(-1) == ref.argmax(-1)).all())


def test_genai_refuses_asymmetric_per_token_activations_before_any_work(
    hf_dir: Path, tmp_path: Path
) -> None:
    qmodel = fake_quant_hf(hf_dir, "lm_8da4w", steps=0)
    with pytest.raises(ValueError, match="cannot reproduce: train with quant=lm_w4a8"):
        build_genai_folder(qmodel, tmp_path / "genai")
    assert not (tmp_path / "genai").exists()


@pytest.mark.parametrize("q8_ops", [True, False])
def test_genai_q4_0_runs_the_int8_kernel_on_q8_0_blocks(
    hf_dir: Path, tmp_path: Path, q8_ops: bool
) -> None:
    """llama.cpp's scheme (Q4_0 weights, Q8_0 activations): MatMulNBits at accuracy level 4
    (ORT's int8 kernel on blocks of 32), after the fake-quant model's Q8_0 rounding as float
    ops (``q8_ops``) or on the input rescaled to Q8_0's fp16 block scale (ORT rounds it to int8
    blocks itself); logits of the whole sequence match the fake-quant model's up to summation
    order and float32 rounding of the rescale."""
    qmodel = fake_quant_hf(hf_dir, "lm_q4_0", steps=0)
    out = tmp_path / "genai"
    report = build_genai_folder(qmodel, out, q8_ops=q8_ops)
    ops = "q8_0+" if q8_ops else "d16+"
    assert set(report["nodes"].values()) == {f"{ops}nbits4_g32_acc4", f"{ops}nbits8_g32_acc4"}
    graph = onnx.load(str(out / "model.onnx")).graph
    levels = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute}
    assert 4 in levels
    # Four inputs per block (qkv, o, gate = up, down) and the lm_head's: gate and up read one
    # input, rounded (or rescaled) once.
    assert sum(n.op_type == "Sign" for n in graph.node) == (2 * 4 + 1 if q8_ops else 0)
    assert sum(n.op_type == "ReduceMax" for n in graph.node) == 2 * 4 + 1
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = logits_of(qmodel, ids)
    got = load_genai_runtime(out)(ids)
    # ORT's int8 kernel sums blocks in its own order (exact only for K a multiple of its 128-wide
    # tiles on VNNI; here K = 64): differences of float32 summation, not of the grid.
    torch.testing.assert_close(got, ref, atol=1e-2, rtol=0)
    assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.95


def test_genai_w4a8_runs_the_int8_kernel_with_nothing_before_it(
    hf_dir: Path, tmp_path: Path
) -> None:
    """lm_w4a8 trains on the grid MatMulNBits' int8 compute rounds its input to (int8 blocks of
    32, float32 scale): the builder's int4 layout, no op before the kernel, the model's tokens."""
    qmodel = fake_quant_hf(hf_dir, "lm_w4a8")
    out = tmp_path / "genai"
    report = build_genai_folder(qmodel, out)
    assert set(report["nodes"].values()) == {"nbits4_g32_acc4"}  # the output layer too
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 2 * 5 + 1 and "ReduceMax" not in ops
    prompt = qat.hf_folder.load_hf_tokenizer(hf_dir)("import os\nclass A:")["input_ids"]
    assert genai_generate(out, prompt, 32) == greedy_tokens(qmodel, prompt, 32)


@pytest.mark.parametrize("family", ["qwen2", "gemma"])
def test_genai_other_families_generate_the_fake_quant_models_tokens(
    tmp_path: Path, family: str
) -> None:
    """Qwen2 (q/k/v biases after the fused projection) and Gemma (scaled embeddings, 1 + w
    norms): the builder's graph around the trained kernels, the same 32 greedy tokens."""
    path = make_hf_folder(tmp_path / family, family=family)
    qmodel = fake_quant_hf(path, "lm_w4g32", steps=0)
    build_genai_folder(qmodel, tmp_path / "genai")
    prompt = qat.hf_folder.load_hf_tokenizer(path)("import os\nclass A:")["input_ids"]
    expected = greedy_tokens(qmodel, prompt, 32)
    assert genai_generate(tmp_path / "genai", prompt, 32) == expected
