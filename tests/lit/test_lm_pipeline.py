"""The language-model pipeline: ``train(cfg)`` of the LM experiments, shrunk to seconds.

``+experiment=gpt_int4`` (float pre-training → Q4_0 QAT → GGUF + ONNX export → verification)
with a tiny GPT and a few batches; bad LM configs fail in one line naming the key.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from lit_helpers import compose_train

from qat.lit.config import ConfigError, validate_config
from qat.lit.train import train

pytest.importorskip("gguf")
pytest.importorskip("onnxruntime")

#: A tiny GPT on a small slice of stdlib text, a few batches per epoch.
TINY = [
    "model.d_model=32",
    "model.n_layers=1",
    "model.n_heads=2",
    "data.seq_len=32",
    "data.batch_size=8",
    "data.max_bytes=200000",
    "data.val_bytes=20000",
    "data.test_bytes=20000",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "~callbacks.rich_progress_bar",
    "schedule.warmup_epochs=1",
]


def test_gpt_int4_trains_quantizes_exports_and_verifies(tmp_path: Path) -> None:
    overrides = [
        "+experiment=gpt_int4",
        *TINY,
        "export.verify_batches=2",
        # A barely trained model has near-tied logits; parity is held to its targets in
        # tests/export/test_lm_export.py. Here: the stage runs and reports.
        "export.fail_on_parity=false",
    ]
    cfg = compose_train(overrides, tmp_path)
    train(cfg)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "ok"
    assert results["metrics"]["test_ppl"] > 1.0
    export = results["export"]
    assert set(export["artifacts"]) == {"gguf", "onnx"}
    assert all(Path(p).is_file() for p in export["artifacts"].values())
    runtimes = export["parity"]["runtimes"]
    assert runtimes["gguf"]["agreement"] == 1.0  # llama.cpp's arithmetic is the model's
    assert runtimes["onnx"]["agreement"] >= 0.99
    assert export["bench"]["latency_ms"]["onnx"] > 0
    phases = [row["phase"] for row in results["history"]]
    assert phases[0] == "float" and phases[-1] != "float"
    assert results["bits"]["weight"] == 4


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["+experiment=gpt_float", "quant=w8a8"], r"quant\.activation .*language models take"),
        (
            ["+experiment=gpt_int4", "export.targets=[torchscript]"],
            r"export\.targets=\['torchscript'\] is invalid for task=language_model",
        ),
        (
            ["model=lenet5", "data=digits", "export.targets=[gguf]"],
            r"export\.targets=\['gguf'\] is invalid for task=classification.*gguf: for task=language_model",
        ),
        (["+experiment=gpt_float", "task=lm"], r"task='lm' is invalid"),
        (
            ["+experiment=gpt_float", "task=classification"],
            r"task=classification with data TextDataModule",
        ),
        (
            ["+experiment=gpt_int4", "schedule.weight_anneal.epochs=2"],
            r"schedule\.weight_anneal\.epochs=2: .* GGUF grid",
        ),
        (
            ["+experiment=gpt_float", "model.context_length=16"],
            r"model\.context_length=16 is shorter than data\.seq_len=32",
        ),
        (
            ["+experiment=gpt_int4", "quant.weight.group_size=48"],
            r"quant\.weight\.group_size=48 is invalid",
        ),
    ],
)
def test_bad_lm_configs_fail_in_one_line_naming_the_key(
    overrides: list[str], message: str, tmp_path: Path
) -> None:
    lm = overrides[0].startswith("+experiment")
    cfg = compose_train([*overrides, *(TINY[:8] if lm else [])], tmp_path)
    with pytest.raises(ConfigError, match=message) as err:
        validate_config(cfg)
    assert "\n" not in str(err.value)


def test_vit_int8_experiment_runs_on_digits(tmp_path: Path) -> None:
    overrides = [
        "+experiment=vit_int8",
        "data=digits",
        "data.image_size=8",
        "data.batch_size=32",
        "model.dim=32",
        "model.depth=1",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "~callbacks.rich_progress_bar",
        "schedule.warmup_epochs=1",
        "export.bench=false",
        "export.fail_on_parity=false",
    ]
    train(compose_train(overrides, tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["model"] == "vit"
    assert set(results["export"]["artifacts"]) == {"torchscript", "onnx"}
    assert results["export"]["parity"]["runtimes"]["onnx"]["agreement"] > 0.9
