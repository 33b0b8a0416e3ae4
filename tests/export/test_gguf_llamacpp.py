"""The exported GGUF files in real llama.cpp (``llama-cpp-python``, the ``llamacpp`` extra).

Slow: CI installs the extra (built from source) before its slow stage. Per family the file
loads, tokenizes text exactly as the Hugging Face tokenizer does, agrees with the fake-quant
model on ≥ 99.9% of next tokens with perplexity within 0.1%, and 32 greedy tokens from a prompt
equal the fake-quant model's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qat.export.gguf import export_gguf
from qat.export.verify_lm import check_lm_parity, verify_lm_artifacts

pytestmark = pytest.mark.slow

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")


@pytest.fixture(autouse=True)
def _llama_cpp() -> None:
    # In a fixture, not at import: the default run deselects these slow tests without a skip.
    pytest.importorskip("llama_cpp")


from hf_folder import stdlib_sample  # noqa: E402
from lm_helpers import lm_recipe  # noqa: E402
from test_gguf_families import FAMILIES, SEQ, prepared_family, save_spm_llama  # noqa: E402

from qat.export.gguf_runner import LlamaCppRunner  # noqa: E402


@torch.no_grad()
def _greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    for _ in range(n):
        nxt = model(ids).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt) :].tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_runs_in_llama_cpp(family: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, folder, ids = prepared_family(tmp_path, family, steps=80)
    path = export_gguf(model, tmp_path / "model.gguf")
    runner = LlamaCppRunner(path)

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    text = stdlib_sample(3)[2].read_text()[:4000]
    assert runner.tokenize(text) == tok(text, add_special_tokens=False)["input_ids"]

    batches = [(ids[i : i + 4, :SEQ], ids[i : i + 4, 1 : SEQ + 1]) for i in (0, 4, 8, 12)]
    report = verify_lm_artifacts(model, {"gguf": path}, batches)
    assert "gguf_llamacpp" in report["runtimes"]  # real llama.cpp beside the PyTorch runner
    check_lm_parity(report, min_agreement=0.999, max_ppl_rel_diff=0.001)

    prompt = ids[0, :16].tolist()
    assert runner.greedy(prompt, 32) == _greedy(model, prompt, 32)


def test_sentencepiece_style_vocab_tokenizes_as_hugging_face(tmp_path: Path) -> None:
    import qat

    folder = save_spm_llama(tmp_path / "spm")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    ids = torch.randint(0, 600, (2, 16))
    model = qat.prepare(model, lm_recipe("lm_q8_0"), example_inputs=ids)
    model.train()
    model(ids)
    runner = LlamaCppRunner(export_gguf(model.eval(), tmp_path / "model.gguf"))
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    text = stdlib_sample(3)[2].read_text()[:4000] + " héllo wörld ☃"
    assert runner.tokenize(text) == tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("recipe", ["lm_q4_k_m", "lm_q6_k"])
def test_kquant_file_runs_in_llama_cpp(recipe: str, tmp_path: Path) -> None:
    """Q4_K_M / Q6_K: llama.cpp loads the blocks as written; it rounds the matmul inputs to
    Q8_K, which the preset's float activations do not model, so the check is statistical."""
    model, _, ids = prepared_family(tmp_path, "llama", recipe=recipe, steps=80, hidden=256)
    path = export_gguf(model, tmp_path / "model.gguf")
    batches = [(ids[i : i + 4, :SEQ], ids[i : i + 4, 1 : SEQ + 1]) for i in (0, 4, 8, 12)]
    report = verify_lm_artifacts(model, {"gguf": path}, batches)
    assert "gguf_llamacpp" in report["runtimes"]  # real llama.cpp beside the PyTorch runner
    check_lm_parity(report, min_agreement=0.999, max_ppl_rel_diff=0.001)
