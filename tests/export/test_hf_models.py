"""Hugging Face transformers built from a config (no download): prepare → QAT → export.

transformers 5 has no ``transformers.utils.fx`` and its forwards do not trace, so
``qat.prepare`` falls back to the module swap (with a warning); weight-only and dynamic
activation schemes need no graph. GPT-2 (``Conv1D`` layers) and Llama (RoPE, RMSNorm, GQA)
export to GGUF and ONNX and agree with their fake-quant models; BERT classifies through ONNX.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import qat
from qat.export.lm_io import logits_of
from qat.export.stage_lm import export_lm
from qat.export.verify_lm import check_lm_parity, load_lm_runtime, verify_lm_artifacts
from qat.quant.layers import QConv1D, QEmbedding, QLinear

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from lm_helpers import lm_recipe, lm_test_batches, text_data  # noqa: E402


def _gpt2() -> torch.nn.Module:
    cfg = transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(cfg)


def _llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg)


def _qat(model: torch.nn.Module, recipe: dict, steps: int = 30) -> torch.nn.Module:
    x = lm_test_batches(1)[0][0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qmodel = qat.prepare(model, recipe, example_inputs=x[:2])
    assert qmodel.qat_capture["mode"] == "modules"
    assert any("module swap" in str(w.message) for w in caught)
    if steps == 0:  # post-training: observe the weights on one batch
        qat.calibrate(qmodel, [x], num_batches=1)
        return qmodel.eval()
    opt = torch.optim.AdamW(qmodel.parameters(), lr=3e-3)
    qmodel.train()
    loader = iter(text_data().train_dataloader())
    for _ in range(steps):  # observes the weights, then trains a little: non-flat logits
        ids, targets = next(loader)
        loss = F.cross_entropy(logits_of(qmodel, ids).flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return qmodel.eval()


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_hf_causal_lm_prepare_qat_export_gguf_and_onnx(build, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _qat(build(), lm_recipe("lm_q4_0"))
    kinds = {type(m) for m in model.modules()}
    assert QEmbedding in kinds and (QConv1D in kinds or QLinear in kinds)
    paths = export_lm(model, tmp_path, lm_test_batches(1)[0][0][:1])
    report = verify_lm_artifacts(model, paths, lm_test_batches(2))
    check_lm_parity(report)
    assert report["runtimes"]["gguf"]["agreement"] >= 0.9999


def test_hf_bert_classifier_exports_to_onnx_int8(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        num_labels=3,
    )
    model = _qat(transformers.BertForSequenceClassification(cfg), lm_recipe("lm_w8da8"), steps=0)
    ids = lm_test_batches(1)[0][0]
    paths = export_lm(model, tmp_path, ids[:1], targets=["onnx"])
    out = load_lm_runtime("onnx", paths["onnx"])(ids)
    with torch.no_grad():
        ref = logits_of(model, ids)
    assert out.shape == ref.shape == (16, 3)
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
