"""The end-of-run summary (qat/lit/summary.py): figures that fit the task, each said once, the
run directory in full, and the same text in the run log."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from qat.lit.summary import print_summary, summary_lines

RUN_DIR = "/very/long/outputs/quick/runs/2026-12-07_12-54-01-123456/with/a/path/longer/than/80"


def classification() -> dict[str, Any]:
    return {
        "task_name": "quick",
        "run_dir": RUN_DIR,
        "config": {
            "task": "classification",
            "model": "resnet20",
            "data": "DigitsDataModule",
            "image_size": 16,
            "quant_enabled": True,
            "max_epochs": 12,
            "epochs_run": 12,
        },
        "metrics": {"float_val_acc": 0.3472, "val_acc": 0.9722, "test_acc": 0.9861},
        "bits": {"weight": 4, "activation": 4},
        "history": [
            {"epoch": 0, "phase": "float", "val/acc": 0.17},
            {"epoch": 1, "phase": "float", "val/acc": 0.3472},
            {"epoch": 2, "phase": "w", "val/acc": 0.979},
        ],
        "checkpoints": {
            "last": f"{RUN_DIR}/checkpoints/last.ckpt",
            "best": f"{RUN_DIR}/checkpoints/best_epoch_008.ckpt",
            "best_monitor": "val/acc",
            "best_score": 0.9931,
        },
        "machine": {"cpu": "AMD EPYC", "isa": "AVX2", "vnni": False},
        "export": {
            "parity": {
                "num_samples": 359,
                "fake_quant": {"accuracy": 0.9861},
                "runtimes": {
                    "onnx": {"accuracy": 0.9861, "agreement": 1.0, "max_abs_diff": 1.9e-6}
                },
            },
            "parity_ok": True,
            "artifacts": {"onnx": f"{RUN_DIR}/export/model.onnx"},
            "sizes_bytes": {"onnx": 301124},
            "bench": {
                "threads": 2,
                "runtimes": {"onnx": {"latency_ms": {"1": 1.79, "64": 90.9}}},
                "ratios": {"speedup_ort_int8_vs_fp32": {"1": 0.62, "64": 1.47}},
            },
        },
        "wall_time_s": 300.0,
    }


def language_model() -> dict[str, Any]:
    return {
        "task_name": "gpt_int4",
        "run_dir": RUN_DIR,
        "config": {
            "task": "language_model",
            "model": "gpt",
            "data": "TextDataModule",
            "image_size": None,
            "quant_enabled": True,
            "max_epochs": 10,
            "epochs_run": 10,
        },
        "metrics": {"val_ppl": 11.37, "test_ppl": 11.9, "val_acc": 0.41, "test_acc": 0.40},
        "bits": {"weight": 4, "activation": 8},
        "history": [],
        "checkpoints": {"last": f"{RUN_DIR}/checkpoints/last.ckpt"},
        "export": {
            "parity": {
                "num_tokens": 8192,
                "fake_quant": {"perplexity": 10.13},
                "runtimes": {
                    "gguf": {
                        "agreement": 0.9995,
                        "perplexity": 10.131,
                        "ppl_rel_diff": 0.0001,
                        "mean_kl": 1.5e-08,
                        "max_abs_diff": 0.01,
                    }
                },
            },
            "parity_ok": True,
            "bench": {
                "shape": [1, 128],
                "latency_ms": {"ort_fp32": 4.0, "onnx": 2.0},
                "speedup_vs_fp32": {"ort_fp32": 1.0, "onnx": 2.0},
            },
        },
        "wall_time_s": 310.0,
    }


def text(results: dict[str, Any]) -> str:
    """The summary as the log has it: one line per figure."""
    return "\n".join(summary_lines(results))


def test_classification_summary_explains_each_figure() -> None:
    out = text(classification())
    assert f"run dir: {RUN_DIR}" in out.splitlines()  # in full, on one line
    assert "34.72% after 2 float epochs (running BN averages" in out
    assert "val acc, final fake-quant model" in out and "97.22%" in out
    assert "final model: checkpoints/last.ckpt (tested and exported)" in out
    assert "99.31% in checkpoints/best_epoch_008.ckpt, not exported" in out
    assert "359 test images" in out and "top-1 agreement 100.00%" in out
    assert "batch 64 1.47x" in out
    assert "timed on: 2 threads of AMD EPYC (AVX2); no VNNI: int8 GEMMs run at most" in out
    assert "None" not in out and "–" not in out


def test_language_model_summary_reports_perplexity_not_pixels() -> None:
    out = text(language_model())
    for wrong in ("px", "None", "samples", "acc –", "–"):
        assert wrong not in out, wrong
    # Two perplexities, each saying which model and which text it is of.
    assert (
        "val perplexity, final fake-quant model" in out
        and "11.37 (val split, next-token acc 41.00%)" in out
    )
    assert "8192 test tokens (the first export.verify_batches test batches)" in out
    assert "fake-quant perplexity 10.13" in out
    assert "next-token agreement 99.95%, KL 1.5e-08 nats" in out
    assert "onnx" in out and "2.00 ms (batch 1, 128 tokens, 2.00x FP32)" in out


def test_best_checkpoint_as_lightning_leaves_it_and_when_it_is_the_last_epoch() -> None:
    import torch

    results = classification()
    results["checkpoints"]["best_score"] = torch.tensor(0.9931)  # before results.json
    assert "99.31% in checkpoints/best_epoch_008.ckpt" in text(results)
    results["checkpoints"]["best"] = f"{RUN_DIR}/checkpoints/best_epoch_011.ckpt"
    assert "best val/acc" not in text(results)  # epoch 11 of 12 is the final model


def test_float_run_and_failed_export_say_so() -> None:
    results = classification()
    results["config"]["quant_enabled"] = False
    results["export"] = {"error": "RuntimeError: exporter exploded"}
    out = text(results)
    assert "float (no quantization)" in out and "float warm-up" not in out
    assert "failed: RuntimeError: exporter exploded" in out


def test_print_summary_writes_the_run_log(tmp_path: Path) -> None:
    log_file = tmp_path / "quick.log"
    handler = logging.FileHandler(log_file)
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        console = Console(file=io.StringIO(), width=80)
        print_summary(classification(), console=console)
    finally:
        root.removeHandler(handler)
        handler.close()
    logged = log_file.read_text()
    assert "run summary" in logged and f"run dir: {RUN_DIR}" in logged
    assert "\x1b[" not in logged  # plain text, no colour codes
    printed = console.file.getvalue()
    assert f"run dir: {RUN_DIR}" in printed  # 80 columns, and still in full
    assert logged.count("test acc, final fake-quant model") == 1


@pytest.mark.parametrize("results", [classification(), language_model()])
def test_summary_survives_missing_parts(results: dict[str, Any]) -> None:
    for key in ("export", "checkpoints", "history", "machine"):
        results.pop(key, None)
    assert "wall time" in text(results)


@pytest.mark.parametrize(
    "cost,budget,used,unit",
    [
        ("size", 2e5, 1.5e5, "0.15 of 0.2 MB packed weights and scales"),
        ("bops", 3e9, 2e9, "2e+09 of 3e+09 BOPs per sample"),
        ("latency", 5.0, 0.1, "0.1 of 5 ms per sample on onnx"),
    ],
)
def test_mixed_precision_budget_is_named_in_its_own_unit(
    cost: str, budget: float, used: float, unit: str
) -> None:
    results = classification()
    results["mixed_precision"] = {
        "cost": cost,
        "budget": budget,
        "used": used,
        "target": "onnx",
        "method": "measure",
        "batches": 2,
        "layers": [],
    }
    assert unit in text(results)
