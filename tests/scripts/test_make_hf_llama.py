"""scripts/make_hf_llama.py: a tokenizer trained here, a Llama pre-trained a few steps, saved as a
folder model=hf loads; the default size is of realistic shape (30-60M parameters)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_hf_llama.py"


def _script():
    spec = importlib.util.spec_from_file_location("make_hf_llama", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_tiny_model_is_built_trained_and_loads(tmp_path: Path, capsys) -> None:
    from transformers import AutoTokenizer

    from qat.models.hf import load_hf_causal_lm

    out = _script().main(
        [
            "--out",
            str(tmp_path / "llama"),
            "--size",
            "tiny",
            "--steps",
            "2",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--max-bytes",
            "600000",
        ]
    )
    log = capsys.readouterr().out
    assert "step 2/2" in log and "val perplexity" in log
    model = load_hf_causal_lm(str(out))
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == model.config.vocab_size == 512
    assert tok.decode(tok("def f(x):\n    return x")["input_ids"]) == "def f(x):\n    return x"


def test_default_size_is_realistic() -> None:
    import torch
    from transformers import LlamaConfig

    shape = _script().SIZES["33m"]
    with torch.device("meta"):
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False))
    params = sum(p.numel() for p in model.parameters())
    assert 30e6 <= params <= 60e6
    # Rows on GGUF's k-quant super-blocks of 256.
    assert shape["hidden_size"] % 256 == 0 and shape["intermediate_size"] % 256 == 0
