"""``python train.py +experiment=hf_* model.path=<folder>``, shrunk to seconds: a saved Hugging
Face folder and your own text in; QAT; the exported files verified against the fake-quant
model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hf_folder import stdlib_sample
from lit_helpers import HF_TINY, compose_train

from qat.lit.train import train

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")

#: A few batches of short windows.


def _jsonl(path: Path) -> Path:
    """Your text as JSON lines: a record per stdlib file, the text under ``content``."""
    rows = [{"content": p.read_text(), "source": p.name} for p in stdlib_sample()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_hf_w4g32_with_distillation_and_lora_writes_a_checkpoint_transformers_loads(
    hf_dir: Path, tmp_path: Path
) -> None:
    data = _jsonl(tmp_path / "corpus.jsonl")
    overrides = [
        "+experiment=hf_w4g32",
        f"model.path={hf_dir}",
        f"data.files=[{data}]",
        "data.text_field=content",
        "module.distill_weight=0.5",
        "model.gradient_checkpointing=true",
        "module.lora_rank=4",  # adapters through the quantizer, merged before export
        *HF_TINY,
    ]
    train(compose_train(overrides, tmp_path / "run"))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "ok"
    export = results["export"]
    assert set(export["artifacts"]) == {"hf", "onnx"}
    runtimes = export["parity"]["runtimes"]
    # transformers computes the fake-quant model's arithmetic: dequantized int4 weights exact.
    assert runtimes["hf"]["agreement"] == 1.0 and runtimes["hf"]["max_abs_diff"] <= 1e-5
    assert runtimes["onnx"]["agreement"] >= 0.99
    hf = Path(export["artifacts"]["hf"])
    assert (hf / "tokenizer.json").is_file() and (hf / "model.safetensors").is_file()
    assert results["peak_memory"]["cpu_rss_bytes"] > 0
    # The distillation term was in the loss (logged beside the cross-entropy).
    (metrics,) = (tmp_path / "run").rglob("metrics.csv")
    assert "train/distill_loss" in metrics.read_text().splitlines()[0].split(",")


@pytest.mark.slow
def test_hf_q4_0_writes_gguf_and_onnx(hf_dir: Path, tmp_path: Path) -> None:
    overrides = ["+experiment=hf_q4_0", f"model.path={hf_dir}", *HF_TINY, "data.max_bytes=60000"]
    # A random model's logits are near-ties: the stage runs and reports (parity targets are
    # held on trained models in tests/export).
    train(compose_train([*overrides, "export.fail_on_parity=false"], tmp_path / "run"))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["export"]["artifacts"]) == {"gguf", "onnx"}
    runtimes = results["export"]["parity"]["runtimes"]
    assert runtimes["gguf"]["agreement"] >= 0.99 and runtimes["onnx"]["agreement"] >= 0.99
