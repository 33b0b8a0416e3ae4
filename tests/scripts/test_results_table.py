"""scripts/results.py: the table, the goal checks and the plots from the runs' results.json."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "results.py"


@pytest.fixture(scope="module")
def results_script():
    spec = importlib.util.spec_from_file_location("results_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_run(
    path: Path, acc: float, export: bool = True, agree: float = 1.0, engine: str | None = "fbgemm"
) -> None:
    """A finished row's results.json (``engine=None``: an export from before the engine pin)."""
    runtime = {"accuracy": acc, "agreement": agree, "max_abs_diff": 0.01, "max_diff_steps": None}
    ts_runtime = {**runtime, **({"engine": engine} if engine else {})}
    bench = {
        name: {"size_bytes": size, "latency_ms": {"1": 1.0, "64": ms}}
        for name, size, ms in (
            ("onnx", 300 * 1024, 10.0),
            ("torchscript", 500 * 1024, 12.0),
            ("ort_fp32", 1100 * 1024, 25.0),
            ("torch_fp32", 1100 * 1024, 50.0),
        )
    }
    results = {
        "metrics": {"test_acc": acc},
        "config": {"epochs_run": 2, "global_step": 160},
        "wall_time_s": 123.0,
        "status": "ok" if agree >= 0.999 else "parity_failed",
        "export": {
            "parity": {
                "num_samples": 10000,
                "runtimes": {"onnx": runtime, "torchscript": ts_runtime},
            },
            "bench": {"runtimes": bench},
        }
        if export
        else {"skipped": "float run"},
    }
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(results))


def _fake_float(results_script, root: Path, weights: dict[str, torch.Tensor]) -> Path:
    """A finished float run under ``root`` whose checkpoint holds ``weights``; returns it."""
    _fake_run(results_script._row_dir(root, "resnet20", "float"), 0.91, export=False)
    ckpt = results_script._float_ckpt(root, "resnet20")
    ckpt.parent.mkdir()
    torch.save({"state_dict": {f"model.{k}": v for k, v in weights.items()}, "epoch": 3}, ckpt)
    return ckpt


def _render_page(results_script, root: Path, docs: Path, *models: str) -> str:
    """``scripts/results.py --render-only`` from ``root`` into ``docs``; the page's text."""
    args = ["--render-only", "--root", str(root), "--out", str(docs)]
    results_script.main([*args, "--models", *models] if models else args)
    return (docs / "results.md").read_text()


def test_table_rows_goals_and_plots(results_script, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    accs = {
        "float": 0.9100,
        "ptq_w8a8": 0.9080,
        "ptq_w4a4": 0.8000,
        "qat_w8a8": 0.9090,
        "qat_w4a8": 0.9050,
        "qat_w4a4": 0.9020,
        "qat_w4a4_anneal": 0.9000,  # worse than direct: the check must say so
        "qat_w3a3_anneal": 0.8900,
    }  # qat_w2a2_anneal missing: "not run"
    for row, acc in accs.items():
        _fake_run(results_script._row_dir(root, "resnet20", row), acc, export=row != "float")
    items = results_script.collect(root, ["resnet20"])
    assert [i["row"] for i in items] == [r[0] for r in results_script.ROWS]
    md = results_script.render(items, tmp_path / "docs", {"float_epochs": 4}).read_text()

    assert (
        "| resnet20 | QAT (LSQ) | W4A4 | 2 × 80 | 90.20 | 90.20 | 90.20 | 100.00 | 0.010 "
        "| 300 | 500 |" in md
    )
    # The float row shows the float model's own runtimes (from the quantized rows' benchmark).
    assert (
        "| resnet20 | float | fp32 | 2 × 80 | 91.00 | – | – | – | – | 1100 | 1100 "
        "| 1.00 | 25.00 |" in md
    )
    assert "| resnet20 | QAT annealed (LSQ, distilled) | W2A2 | | not run |" in md
    # Every row names the machine its export was timed on (latencies compare within one).
    rows = [ln for ln in md.splitlines() if ln.startswith("| resnet20 |") and "not run" not in ln]
    assert len(rows) == 8 and all(ln.endswith("| 123 | M1 |") for ln in rows)
    assert f"Machines: M1 = {results_script._machine()['cpu']}." in md
    assert "✓ qat_w8a8: 0.10 pt below float (goal ≤ 0.2)" in md
    assert "✓ qat_w4a4: 0.80 pt below float (goal ≤ 1.0)" in md
    assert "✗ annealed W4A4 90.00% vs direct W4A4 90.20%" in md
    assert "✓ QAT W4A4 90.20% vs PTQ W4A4 80.00%" in md
    assert "– qat_w2a2_anneal" in md
    for png in ("results_accuracy.png", "results_size_latency.png"):
        assert (tmp_path / "docs" / png).stat().st_size > 1000
        assert f"]({png})" in md


def test_a_parity_failure_is_a_row_not_a_crash(results_script, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    _fake_run(results_script._row_dir(root, "resnet20", "float"), 0.91, export=False)
    _fake_run(results_script._row_dir(root, "resnet20", "qat_w8a8"), 0.90, agree=0.99)
    md = results_script.render(
        results_script.collect(root, ["resnet20"]), tmp_path / "docs", {"float_epochs": 4}
    ).read_text()
    assert "| resnet20 | QAT (parity_failed) | W8A8 |" in md
    # A run that stopped before writing results.json is an unfinished row, not a missing one.
    (results_script._row_dir(root, "resnet20", "qat_w2a2_anneal") / "csv").mkdir(parents=True)
    md = results_script.render(
        results_script.collect(root, ["resnet20"]), tmp_path / "docs", {"float_epochs": 4}
    ).read_text()
    assert (
        "| resnet20 | QAT annealed (LSQ, distilled) | W2A2 | | unfinished (no results.json) |" in md
    )
    assert "| resnet20 | QAT annealed (LSQ) | W3A3 | | not run |" in md
    # Accuracies equal, agreement low: the goal (accuracy) is met, the parity check is not.
    assert "✓ exported accuracy within 0.1 pt of fake-quant in every row: largest gap 0.00" in md
    assert "✗ parity check, top-1 agreement ≥ 99.9% in every row: lowest 99.00% (qat_w8a8" in md


def test_the_page_names_rows_verified_before_the_engine_pin(results_script, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    _fake_run(results_script._row_dir(root, "resnet20", "float"), 0.91, export=False)
    _fake_run(results_script._row_dir(root, "resnet20", "qat_w8a8"), 0.90)
    _fake_run(results_script._row_dir(root, "resnet20", "qat_w4a8"), 0.90, engine=None)
    md = results_script.render(
        results_script.collect(root, ["resnet20"]), tmp_path / "docs", {"float_epochs": 4}
    ).read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("TorchScript figures measured"))
    assert line.endswith("design notes): resnet20 qat_w4a8.")  # only the row without an engine
    assert "- TorchScript engine: x86 (the export's, verified exact)" in md
    # Once every row records its engine, the sentence goes.
    (results_script._row_dir(root, "resnet20", "qat_w4a8") / "results.json").unlink()
    md = results_script.render(
        results_script.collect(root, ["resnet20"]), tmp_path / "docs", {"float_epochs": 4}
    ).read_text()
    assert "TorchScript figures measured" not in md


def test_rows_not_under_root_are_carried_over_from_the_saved_table(
    results_script, tmp_path: Path
) -> None:
    root, docs = tmp_path / "runs", tmp_path / "docs"
    for model in ("resnet20", "mobilenetv2"):
        _fake_run(results_script._row_dir(root, model, "float"), 0.91, export=False)
        _fake_run(results_script._row_dir(root, model, "qat_w8a8"), 0.905)
        _fake_run(results_script._row_dir(root, model, "qat_w4a4"), 0.90)
        _fake_run(results_script._row_dir(root, model, "qat_w4a4_anneal"), 0.90)
    first = results_script.render(
        results_script.collect(root, list(results_script.MODELS)), docs, {"float_epochs": 4}
    ).read_text()
    assert "†" not in first
    saved = json.loads((docs / "results.json").read_text())
    assert len(saved["items"]) == 2 * len(results_script.ROWS)

    # A fresh clone (no run directories): every finished row comes back, marked †.
    md = _render_page(results_script, tmp_path / "none", docs)
    assert (
        "| resnet20 | QAT (LSQ) † | W4A4 | 2 × 80 | 90.00 | 90.00 | 90.00 | 100.00 | 0.010 "
        "| 300 |" in md
    )
    assert (
        "| resnet20 | float † | fp32 | 2 × 80 | 91.00 | – | – | – | – | 1100 | 1100 "
        "| 1.00 | 25.00 |" in md
    )
    assert "| resnet20 | QAT annealed (LSQ, distilled) | W2A2 | | not run |" in md
    assert "† Not re-run by the invocation that wrote this page" in md
    # The footnote names the run dates and, by the machine column's keys, where they ran.
    assert re.search(r"run \d{4}-\d\d-\d\d \(M1\), with the code", md)
    assert "✓ qat_w4a4: 1.00 pt below float (goal ≤ 1.0)" in md

    # Re-rendering from a root holding one model's runs: the other model stays, carried.
    fresh = tmp_path / "rerun"
    _fake_run(results_script._row_dir(fresh, "resnet20", "qat_w4a4"), 0.9050)
    md = _render_page(results_script, fresh, docs, "resnet20")
    assert "| resnet20 | QAT (LSQ) | W4A4 | 2 × 80 | 90.50 |" in md
    assert "| resnet20 | QAT † | W8A8 | 2 × 80 | 90.50 |" in md
    assert "| mobilenetv2 | QAT (LSQ) † | W4A4 | 2 × 80 | 90.00 |" in md
    assert "✓ qat_w4a4: 0.50 pt below float (goal ≤ 1.0)" in md
    # A goal comparing a carried row with a re-run one says so.
    assert "(goal: QAT above PTQ; compares a carried row (†) with a re-run one)" not in md
    assert "(goal: at least as good; compares a carried row (†) with a re-run one)" in md


def test_rows_of_another_float_model_are_not_carried_over(results_script, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    first = tmp_path / "first"
    _fake_float(results_script, first, {"w": torch.full((3,), 1.0)})
    for row in ("qat_w8a8", "qat_w4a4"):
        _fake_run(results_script._row_dir(first, "resnet20", row), 0.905)
    _render_page(results_script, first, docs, "resnet20")
    # Same float checkpoint, one row's run directory gone: that row is carried over.
    (results_script._row_dir(first, "resnet20", "qat_w4a4") / "results.json").unlink()
    results_script._row_dir(first, "resnet20", "qat_w4a4").rmdir()
    md = _render_page(results_script, first, docs, "resnet20")
    assert "| resnet20 | QAT (LSQ) † | W4A4 | 2 × 80 | 90.50 |" in md
    assert "| resnet20 | QAT | W8A8 | 2 × 80 | 90.50 |" in md
    # A new float model: the saved rows came from another one, so they are not shown beside it.
    second = tmp_path / "second"
    _fake_float(results_script, second, {"w": torch.full((3,), 2.0)})
    _fake_run(results_script._row_dir(second, "resnet20", "qat_w8a8"), 0.907)
    md = _render_page(results_script, second, docs, "resnet20")
    assert "| resnet20 | QAT | W8A8 | 2 × 80 | 90.70 |" in md
    assert "| resnet20 | QAT (LSQ) | W4A4 | | not run |" in md
    assert "†" not in md


def test_new_rows_start_from_the_saved_float_weights(
    results_script, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, docs = tmp_path / "runs", tmp_path / "docs"
    weights = {"conv.weight": torch.randn(4, 1, 3, 3), "bn.num_batches_tracked": torch.tensor(7)}
    ckpt = _fake_float(results_script, root, weights)
    _fake_run(results_script._row_dir(root, "resnet20", "qat_w8a8"), 0.905)
    _render_page(results_script, root, docs, "resnet20")
    kept = docs / "results_float_resnet20.pt"
    assert results_script.weights_sha(kept) == results_script.weights_sha(ckpt) is not None
    assert torch.equal(torch.load(kept, weights_only=True)["conv.weight"], weights["conv.weight"])

    # A fresh clone: no runs. The next row starts from the kept weights; no float run.
    calls = []
    monkeypatch.setattr(
        results_script.running, "_run", lambda args, log: calls.append(list(args)) or 0
    )
    fresh = tmp_path / "fresh"
    results_script.run_model("resnet20", fresh, 4, [], ["qat_w4a4"], docs)
    assert len(calls) == 1 and f"init_from={kept}" in calls[0]
    assert "+experiment=table/qat_w4a4" in calls[0]
    # Weights that are not the saved float row's: the float model is trained again first.
    torch.save({"conv.weight": torch.zeros(4, 1, 3, 3)}, kept)
    calls.clear()
    results_script.run_model("resnet20", fresh, 4, [], ["qat_w4a4"], docs)
    assert "+experiment=table/float" in calls[0]
    assert f"init_from={results_script._float_ckpt(fresh, 'resnet20')}" in calls[1]


@pytest.mark.slow  # 21 s: a training run (a subprocess) and the re-export of its row
def test_reexport_replaces_the_export_of_a_finished_row(results_script, tmp_path: Path) -> None:
    """--reexport exports a row again from its checkpoint; only the export part changes, and
    only when the checkpoint is the model the row tested."""
    import os
    import subprocess
    import sys

    root, docs = tmp_path / "runs", tmp_path / "docs"
    row_dir = results_script._row_dir(root, "resnet20", "qat_w8a8")
    train = [
        *("data=digits", "data.image_size=8", "data.batch_size=32", "model=lenet5"),
        *("quant=w8a8", "trainer.max_epochs=2", "schedule.warmup_epochs=1"),
        *("trainer.limit_train_batches=4", "trainer.limit_val_batches=2"),
        "trainer.enable_progress_bar=false",
        *("~callbacks.rich_progress_bar", "export.bench=false", f"hydra.run.dir={row_dir}"),
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(results_script.TRAIN), *train],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = json.loads((row_dir / "results.json").read_text())
    assert before["status"] == "ok" and "reexported" not in before["export"]

    args = ["--reexport", "--root", str(root), "--out", str(docs), "--models", "resnet20"]
    results_script.main([*args, "--rows", "qat_w8a8", "--", "export.bench=false"])
    after = json.loads((row_dir / "results.json").read_text())
    assert "reexported" in after["export"] and after["status"] == "ok"
    assert after["metrics"] == before["metrics"] and after["history"] == before["history"]
    fq = after["export"]["parity"]["fake_quant"]["accuracy"]
    assert fq == pytest.approx(before["metrics"]["test_acc"], abs=5e-5)
    assert after["export"]["parity"]["runtimes"]["onnx"]["agreement"] == 1.0
    page = (docs / "results.md").read_text()
    assert (
        "| resnet20 | QAT | W8A8 |" in page and "(1 of the rows), after an exporter change" in page
    )

    # A checkpoint that is not the tested model (here: the row says another accuracy) is
    # not merged: the row stays as it was.
    after["metrics"]["test_acc"] = 0.123
    (row_dir / "results.json").write_text(json.dumps(after))
    results_script.main([*args, "--rows", "qat_w8a8", "--", "export.bench=false"])
    assert json.loads((row_dir / "results.json").read_text()) == after


def _row_cfg(results_script, model: str, row: str):
    """The composed config ``scripts/results.py`` runs ``row`` of ``model`` with."""
    from hydra import compose, initialize_config_dir

    overrides = [f"+experiment={results_script.row_config(model, row)}", f"model={model}"]
    with initialize_config_dir(str(results_script.REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=[*overrides, *results_script.MODELS[model]])


def test_row_configs_and_the_budget_text_agree(results_script, tmp_path: Path) -> None:
    # A per-model row config is picked over the shared one and keeps the row's run directory.
    assert results_script.row_config("resnet20", "qat_w4a4") == "table/qat_w4a4"
    own = results_script.row_config("mobilenetv2", "qat_w4a4")
    assert own == "table/mobilenetv2/qat_w4a4"
    for m, r in results_script.own_row_configs(list(results_script.MODELS)):
        assert _row_cfg(results_script, m, r).task_name == f"table_{r}"

    # The page's budget text names every row learning rate the configs use, and the rows
    # that have a config of their own.
    root = tmp_path / "runs"
    for model in results_script.MODELS:
        _fake_run(results_script._row_dir(root, model, "qat_w8a8"), 0.9)
    items = results_script.collect(root, list(results_script.MODELS))
    md = results_script.render(items, tmp_path / "docs", {"float_epochs": 4}).read_text()
    budget = md.split("**Budget.**")[1].split("Columns:")[0]
    for model in results_script.MODELS:
        for row in results_script.QUANT_ROWS:
            cfg = _row_cfg(results_script, model, row)
            if cfg.trainer.max_epochs:
                assert f"lr {cfg.optimizer.lr:g}" in budget, (model, row, cfg.optimizer.lr)
    assert "mobilenetv2 qat_w4a4, mobilenetv2 qat_w4a4_anneal" in budget


def test_mixed_rows_goals_and_the_short_budget_section(results_script, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    accs = {"float": 0.9, "qat_w4a4": 0.88, "qat_auto_w4a4": 0.885, "qat_w2a2_anneal": 0.6}
    accs["qat_auto_w2a2"] = 0.8  # closes 2/3 of the 30-point gap
    for row, acc in accs.items():
        _fake_run(results_script._row_dir(root, "mobilenetv2", row), acc, export=row != "float")
    items = results_script.collect(root, ["mobilenetv2"])
    md = results_script.render(items, tmp_path / "docs", {"float_epochs": 4}).read_text()
    assert "| mobilenetv2 | mixed 2/4/8 by measurement (LSQ) | ≤ W4A4 size | 2 × 80 | 88.50 |" in md
    assert "✓ mixed at qat_w4a4's size 88.50% vs uniform 88.00%" in md
    assert "✓ mixed at W2A2 size closes 67% of uniform W2A2's 30.00 pt gap" in md
    # A shorter matched budget: its own section, saved beside the page, kept by later renders.
    short_root = tmp_path / "short"
    for row, acc in (("qat_w2a2_anneal", 0.5), ("qat_auto_w2a2", 0.6)):
        _fake_run(results_script._row_dir(short_root, "mobilenetv2", row), acc)
    hydra = results_script._row_dir(short_root, "mobilenetv2", "qat_auto_w2a2") / ".hydra"
    hydra.mkdir()
    (hydra / "overrides.yaml").write_text("- model=mobilenetv2\n- quant.auto.batches=8\n")
    docs = tmp_path / "docs"
    short = results_script.short_rows(short_root, ["mobilenetv2"], items, docs)
    assert [i["row"] for i in short] == ["qat_w2a2_anneal", "qat_auto_w2a2"]
    md = results_script.render(items, docs, {"float_epochs": 4}, short).read_text()
    section = md.split("## Mixed precision on a shorter matched budget")[1].split("## Goals")[0]
    assert "| mobilenetv2 | mixed 2/4/8 by measurement (LSQ, distilled) | ≤ W2A2 size |" in section
    assert "✓ mobilenetv2: mixed at qat_w2a2_anneal's size 60.00% vs uniform 50.00%" in section
    assert "closes 25% of this budget's uniform gap to float (40.00 pt; goal ≥ 50%: ✗)" in section
    assert "✓ exported with parity, top-1 agreement ≥ 99.9% in every row: lowest 100.00%" in section
    # What a row ran with beyond the shared short budget is named under the table.
    assert "- mobilenetv2 qat_auto_w2a2 also ran with `quant.auto.batches=8`" in section
    assert results_script.short_rows(None, ["mobilenetv2"], items, docs) == short
