"""Running the table: per model the float run, then one Hydra multirun over its rows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .carry import load_saved, saved_float, weights_sha
from .rows import MODELS, QUANT_ROWS, REPO, TRAIN, _float_ckpt, _load, _row_dir, row_config


def _run(args: Sequence[str], log_file: Path, script: bool = True) -> int:
    """Run ``python train.py args`` (``python args`` if not ``script``) with its output
    appended to ``log_file``."""
    cmd = [sys.executable, *([str(TRAIN)] if script else []), *args]
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    env.setdefault("WANDB_MODE", "offline")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    print("$", " ".join(cmd), flush=True)
    with open(log_file, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        return subprocess.call(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)


def run_model(
    name: str,
    root: Path,
    float_epochs: int,
    extra: Sequence[str],
    rows: Sequence[str] = tuple(QUANT_ROWS),
    out: Path | None = None,
) -> None:
    """Float run, then the multirun over the quantized ``rows`` that have no results yet.

    Without a float run under ``root``, the rows start from the float weights saved beside the
    table in ``out`` when they are the ones its float row was measured on (so they sit beside
    the carried-over rows); otherwise the float model is trained first.
    """
    model_args = [f"model={name}", *MODELS.get(name, []), "~callbacks.rich_progress_bar"]
    model_args += ["trainer.enable_progress_bar=false"]
    float_dir = _row_dir(root, name, "float")
    log = root / name / "log.txt"
    ckpt = _float_ckpt(root, name)
    kept = saved_float(out, name) if out is not None else None
    if not float_dir.exists() and kept is not None and kept.is_file():
        row = load_saved(out).get((name, "float"), {})
        if row.get("float_sha") and row["float_sha"] == weights_sha(kept):
            print(f"{name}: starting from the float weights of the saved table ({kept})")
            ckpt = kept
    if ckpt != kept and not (float_dir / "results.json").is_file():
        rc = _run(
            [
                "+experiment=table/float",
                *model_args,
                f"trainer.max_epochs={float_epochs}",
                f"hydra.run.dir={float_dir}",
                *extra,
            ],
            log,
        )
        if rc != 0:
            raise SystemExit(f"the float run of {name} failed (exit {rc}): see {root / name}")
    todo = [r for r in rows if not (_row_dir(root, name, r) / "results.json").is_file()]
    if not todo:
        return
    for row in todo:
        # A row interrupted before its results.json: the run refuses to start over it, so set
        # it aside (kept, never deleted) and run the row again.
        stale = _row_dir(root, name, row)
        if stale.exists():
            stale.rename(stale.with_name(f"{stale.name}.unfinished-{time.strftime('%H%M%S')}"))
    rc = _run(
        [
            "-m",
            "+experiment=" + ",".join(row_config(name, r) for r in todo),
            *model_args,
            f"init_from={ckpt}",
            "export.fail_on_parity=false",  # a parity failure is a row of the table, not a crash
            f"hydra.sweep.dir={root / name}",
            # One directory per row, named by it: reruns find the finished ones.
            "hydra.sweep.subdir=${task_name}",
            *extra,
        ],
        log,
    )
    if rc != 0:
        print(f"warning: the multirun of {name} exited with {rc}; see {log}")


def reexport_rows(
    root: Path, name: str, rows: Sequence[str] = tuple(QUANT_ROWS), extra: Sequence[str] = ()
) -> None:
    """Export the finished ``rows`` again from their checkpoints, with the exporter as it is now.

    For after an exporter change: each row's trained model is exported, verified on the test
    set and benchmarked anew (``python -m qat.export``), and the export part of its
    ``results.json`` is replaced (training figures kept). A row is only updated when the
    re-exported model's fake-quant test accuracy equals the one the row recorded, i.e. the
    checkpoint holds the model the row tested; otherwise it is left as it was, with a warning.
    ``extra``: ``export.*`` overrides for every export.
    """
    from qat.io import commit_dir
    from qat.lit.results import write_json_atomic

    log = root / name / "log.txt"
    for row in rows:
        run_dir = _row_dir(root, name, row)
        res = _load(run_dir / "results.json")
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        if res is None or not ckpt.is_file():
            print(f"{name} {row}: no finished run with a checkpoint under {run_dir}; skipped")
            continue
        # Into a folder of its own beside the row's export/, which it replaces only once the
        # checks below accept it (an export lands whole: qat.export.bundle).
        staged = run_dir / "export-reexport"
        shutil.rmtree(staged, ignore_errors=True)
        cmd = ["-m", "qat.export", f"ckpt_path={ckpt}", "export.fail_on_parity=false"]
        cmd += [f"export.out_dir={staged}", "export.replace=true", *extra]
        rc = _run(cmd, log, script=False)
        report = _load(staged / "export_report.json")
        if rc != 0 or report is None or "parity" not in report:
            shutil.rmtree(staged, ignore_errors=True)
            print(
                f"warning: {name} {row}: the re-export failed (exit {rc}) or verified nothing "
                f"(export.verify=false?), so the row is left as it was; see {log}"
            )
            continue
        fq = (report["parity"].get("fake_quant") or {}).get("accuracy")
        tested = res["metrics"].get("test_acc")
        if fq is None or tested is None or abs(fq - tested) > 5e-5:
            print(
                f"warning: {name} {row}: the checkpoint's fake-quant test accuracy {fq} is not "
                f"the row's {tested}: not the tested model, or a row tested before the "
                "fake-quant evaluation requantized as the runtimes do (2026-12-01); the row is "
                "left as it was (re-run it to update it)"
            )
            shutil.rmtree(staged, ignore_errors=True)
            continue
        commit_dir(staged, run_dir / "export")
        report = json.loads(json.dumps(report).replace(str(staged), str(run_dir / "export")))
        export = {k: v for k, v in report.items() if k not in ("ckpt_path", "run_dir")}
        export["reexported"] = time.strftime("%Y-%m-%d %H:%M")
        res["export"] = export
        res["status"] = "ok" if export.get("parity_ok", True) else "parity_failed"
        write_json_atomic(run_dir / "results.json", res)
        print(f"{name} {row}: re-exported, {res['status']}")
