"""The accuracy / size / speed table: float, PTQ and QAT rows on Fashion-MNIST, with plots.

For each model: train the float model (``+experiment=table/float``), then one Hydra multirun
over the rows in ``configs/experiment/table/`` (PTQ at W8A8 and W4A4; QAT at W8A8, W4A8, W4A4
direct, W4A4 annealed 8 → 4, W3A3 and W2A2 annealed), each starting from the float checkpoint
(``init_from=``). A model that needs a longer budget for a row has a config of its own,
``configs/experiment/table/<model>/<row>.yaml``, used instead of the shared one. Every row
exports TorchScript and ONNX, verifies them on the 10,000 test images and benchmarks them
(the pipeline's ``results.json``). This script then writes ``docs/results.md`` (the table,
the machine, the versions, the budget) and PNG plots beside it.

Finished runs are kept: running the script again skips every row whose ``results.json``
exists, so an interrupted table resumes where it stopped (``--render-only`` just rewrites the
table from what is there). The figures of every row are also saved beside the table
(``docs/results.json``); a row with no run directory under ``--root`` (a fresh clone) is
carried over from there, marked † with when and where it ran, as long as it was fine-tuned from
the same float model as the model's other rows: the float run's checkpoint (hashed), or, when
the float run is carried over too, the one it saved. A new float run therefore means new rows:
rows from another float model show as "not run" rather than being compared with this one.
The float weights are saved beside the table too (``docs/results_float_<model>.pt``): without a
float run under ``--root``, new rows start from them, beside the carried-over rows, instead of
from a float model trained again.

Usage::

    python scripts/results.py                              # both models, ~6 h on 2 cores
    python scripts/results.py --models resnet20 --float-epochs 2
    python scripts/results.py -- logger=wandb              # also log every run (and the table)
    python scripts/results.py --render-only
    python scripts/results.py --models resnet20 --rows qat_w2a2_anneal  # one row, same float
    python scripts/results.py --reexport   # after an exporter change: export every row again
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "train.py"

#: Table rows in order: (row name, method, weight bits, activation bits).
ROWS = [
    ("float", "float", 32, 32),
    ("ptq_w8a8", "PTQ", 8, 8),
    ("ptq_w4a4", "PTQ", 4, 4),
    ("qat_w8a8", "QAT", 8, 8),
    ("qat_w4a8", "QAT", 4, 8),
    ("qat_w4a4", "QAT (LSQ)", 4, 4),
    ("qat_w4a4_anneal", "QAT annealed (LSQ)", 4, 4),
    ("qat_w3a3_anneal", "QAT annealed (LSQ)", 3, 3),
    ("qat_w2a2_anneal", "QAT annealed (LSQ, distilled)", 2, 2),
]
QUANT_ROWS = [r[0] for r in ROWS if r[0] != "float"]
#: The table's figures, saved beside it (rows missing under --root are carried over from it).
SAVED = "results.json"
MODELS = {"resnet20": [], "mobilenetv2": ["model.width_mult=0.5"]}


# ---------------------------------------------------------------------- running
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


def float_weights(path: Path) -> dict[str, Any]:
    """The float model's weights in a Lightning checkpoint or a saved state_dict."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    if any(k.startswith("model.") for k in state):
        state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    return state


def weights_sha(path: Path) -> str | None:
    """Short hash of the float weights in ``path`` (checkpoint or state_dict; None if absent)."""
    import torch

    if not path.is_file():
        return None
    h = hashlib.sha256()
    for key, value in sorted(float_weights(path).items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def keep_float(ckpt: Path, out: Path, model: str) -> Path:
    """Save the float weights of ``ckpt`` beside the table (see :func:`saved_float`)."""
    import torch

    path = saved_float(out, model)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(float_weights(ckpt), tmp)
    os.replace(tmp, path)
    return path


def saved_float(out: Path, model: str) -> Path:
    """Where the page keeps the float weights its ``model`` rows were fine-tuned from."""
    return out / f"results_float_{model}.pt"


def row_config(model: str, row: str) -> str:
    """The experiment config of ``row`` for ``model``: ``table/<model>/<row>`` where it exists
    (a model that needs a longer budget for that row), else the shared ``table/<row>``."""
    own = f"table/{model}/{row}"
    return own if (REPO / "configs" / "experiment" / f"{own}.yaml").is_file() else f"table/{row}"


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
    from qat.lit.results import write_json_atomic

    log = root / name / "log.txt"
    for row in rows:
        run_dir = _row_dir(root, name, row)
        res = _load(run_dir / "results.json")
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        if res is None or not ckpt.is_file():
            print(f"{name} {row}: no finished run with a checkpoint under {run_dir}; skipped")
            continue
        report_path = run_dir / "export" / "export_report.json"
        # Only a report this export wrote is merged; an earlier one stays as it is.
        before = report_path.stat().st_mtime_ns if report_path.is_file() else None
        cmd = ["-m", "qat.export", f"ckpt_path={ckpt}", "export.fail_on_parity=false", *extra]
        rc = _run(cmd, log, script=False)
        written = report_path.is_file() and report_path.stat().st_mtime_ns != before
        report = _load(report_path) if written else None
        if rc != 0 or report is None or "parity" not in report:
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
            continue
        export = {k: v for k, v in report.items() if k not in ("ckpt_path", "run_dir")}
        export["reexported"] = time.strftime("%Y-%m-%d %H:%M")
        res["export"] = export
        res["status"] = "ok" if export.get("parity_ok", True) else "parity_failed"
        write_json_atomic(run_dir / "results.json", res)
        print(f"{name} {row}: re-exported, {res['status']}")


# ---------------------------------------------------------------------- collecting
def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _row_dir(root: Path, model: str, row: str) -> Path:
    return root / model / ("float" if row == "float" else f"table_{row}")


def _float_ckpt(root: Path, model: str) -> Path:
    """The checkpoint of the float run under ``root`` that the model's rows start from."""
    return _row_dir(root, model, "float") / "checkpoints" / "last.ckpt"


def load_saved(out: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """The rows of the table saved in ``out`` by an earlier :func:`render` (empty if none)."""
    saved = _load(out / SAVED)
    if saved is None:
        return {}
    return {(i["model"], i["row"]): i for i in saved["items"] if i.get("done")}


def collect(
    root: Path,
    models: Sequence[str],
    saved: dict[tuple[str, str], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One dict per (model, row) with the figures the table shows (None where missing).

    A row with no run directory under ``root`` is taken from ``saved`` (see :func:`load_saved`),
    marked ``carried``, when it started from the same float model as the rows under ``root``.
    """
    saved = saved or {}
    out = []
    for model in models:
        float_acc = None
        fp32: dict[str, Any] = {}
        new_float = _row_dir(root, model, "float").exists()
        if new_float:
            sha = weights_sha(_float_ckpt(root, model))
        else:
            sha = saved.get((model, "float"), {}).get("float_sha")
        for row, method, wb, ab in ROWS:
            run_dir = _row_dir(root, model, row)
            res = _load(run_dir / "results.json")
            item: dict[str, Any] = {"model": model, "row": row, "method": method}
            item.update(w_bits=wb, a_bits=ab, done=res is not None, float_sha=sha)
            prev = saved.get((model, row))
            same_float = prev is not None and prev.get("float_sha") == sha
            if res is None and not run_dir.exists() and same_float and (sha or not new_float):
                item = {**saved[(model, row)], "carried": True}
                if row == "float":
                    float_acc = item["acc"]
                out.append(item)
                continue
            if res is None:
                # A run directory without results.json: the run started and did not finish
                # (died, was stopped, or is still running); the next `scripts/results.py`
                # sets it aside and runs the row again.
                item["unfinished"] = run_dir.is_dir()
                out.append(item)
                continue
            item["date"] = time.strftime(
                "%Y-%m-%d", time.localtime((run_dir / "results.json").stat().st_mtime)
            )
            item["machine"] = _machine()["cpu"]  # the rows under root ran here
            acc = res["metrics"]["test_acc"]
            item["acc"] = acc
            item["epochs"] = res["config"]["epochs_run"]
            item["steps"] = res["config"]["global_step"]
            item["wall_time_s"] = res.get("wall_time_s")
            item["status"] = res.get("status")
            if row == "float":
                float_acc = acc
            exp = res.get("export") or {}
            parity = (exp.get("parity") or {}).get("runtimes") or {}
            for rt, key in (("onnx", "ort"), ("torchscript", "ts")):
                p = parity.get(rt) or {}
                item[f"{key}_acc"] = p.get("accuracy")
                item[f"{key}_agree"] = p.get("agreement")
                item[f"{key}_maxdiff"] = p.get("max_abs_diff")
            # Absent before the export pinned its engine: those ran under the default, x86.
            item["ts_engine"] = (parity.get("torchscript") or {}).get("engine")
            item["n_test"] = (exp.get("parity") or {}).get("num_samples")
            item["reexported"] = exp.get("reexported")
            bench = (exp.get("bench") or {}).get("runtimes") or {}
            for rt, key in (("onnx", "ort"), ("torchscript", "ts")):
                b = bench.get(rt) or {}
                item[f"{key}_size"] = b.get("size_bytes")
                item[f"{key}_ms1"] = (b.get("latency_ms") or {}).get("1")
                item[f"{key}_ms64"] = (b.get("latency_ms") or {}).get("64")
            for rt in ("ort_fp32", "torch_fp32"):
                if rt in bench and rt not in fp32:
                    fp32[rt] = bench[rt]
            out.append(item)
        # The float row's runtimes: the float model as the quantized rows' benchmarks ran it.
        for item in out:
            if item["model"] == model:
                item["float_acc"] = float_acc
                if item["row"] != "float" or not item["done"] or item.get("carried"):
                    continue
                for rt, key in (("ort_fp32", "ort"), ("torch_fp32", "ts")):
                    b = fp32.get(rt) or {}
                    item[f"{key}_size"] = b.get("size_bytes")
                    item[f"{key}_ms1"] = (b.get("latency_ms") or {}).get("1")
                    item[f"{key}_ms64"] = (b.get("latency_ms") or {}).get("64")
    return out


# ---------------------------------------------------------------------- rendering
def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _kib(x: float | None) -> str:
    return "–" if x is None else f"{x / 1024:.0f}"


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _bits(w: int, a: int) -> str:
    return "fp32" if w >= 16 else f"W{w}A{a}"


def _trained(epochs: int | None, steps: int | None) -> str:
    """``epochs × batches per epoch`` of a run ("–" for calibration-only rows)."""
    return f"{epochs} × {steps // epochs}" if epochs and steps else "–"


def own_row_configs(models: Sequence[str]) -> list[tuple[str, str]]:
    """``(model, row)`` for every row a model runs with its own config (see :func:`row_config`)."""
    return [(m, r) for m in models for r in QUANT_ROWS if row_config(m, r) != f"table/{r}"]


@functools.cache  # one machine per process; collect asks for every new row, render again
def _machine() -> dict[str, str]:
    import onnxruntime
    import torch

    from qat.export.torchscript import ENGINE as TS_ENGINE

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")),
        platform.processor() or "?",
    )
    vnni = "yes" if ("avx512_vnni" in cpuinfo or "avx_vnni" in cpuinfo) else "no"
    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores, VNNI: {vnni}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "TorchScript engine": f"{TS_ENGINE} (pinned by the export)",
    }


def _checks(items: list[dict[str, Any]]) -> list[str]:
    """The issue's goals, evaluated on the measured rows (honestly: ✗ where missed)."""
    lines = []
    by = {(i["model"], i["row"]): i for i in items if i["done"]}
    models = sorted({i["model"] for i in items}, key=list(MODELS).index)

    def acc(m: str, r: str) -> float | None:
        return by.get((m, r), {}).get("acc")

    def check(text: str, ok: bool | None) -> None:
        lines.append(f"- {'–' if ok is None else ('✓' if ok else '✗')} {text}")

    def mixed(m: str, *rows: str) -> str:
        # A carried row ran with older code (and maybe another machine): say so beside the mark.
        carried = [by[(m, r)].get("carried", False) for r in rows if (m, r) in by]
        if len(carried) == len(rows) and any(carried) and not all(carried):
            return "; compares a carried row (†) with a re-run one"
        return ""

    for m in models:
        f = acc(m, "float")
        if f is None:
            continue
        lines.append(f"\n**{m}** (float {100 * f:.2f}%):\n")
        for row, limit in (("qat_w8a8", 0.2), ("qat_w4a4", 1.0), ("qat_w2a2_anneal", 4.0)):
            a = acc(m, row)
            # Rounded as shown: accuracies are counts over 10,000 images, so 2 decimals are exact.
            gap = None if a is None else round(100 * (f - a), 2)
            text = "no result" if gap is None else f"{gap:.2f} pt below float"
            if gap is not None and gap < 0:
                text = f"{-gap:.2f} pt above float"
            check(f"{row}: {text} (goal ≤ {limit})", None if gap is None else gap <= limit)
        d, an = acc(m, "qat_w4a4"), acc(m, "qat_w4a4_anneal")
        check(
            f"annealed W4A4 {_pct(an)}% vs direct W4A4 {_pct(d)}% (goal: at least as good"
            f"{mixed(m, 'qat_w4a4', 'qat_w4a4_anneal')})",
            None if d is None or an is None else an >= d,
        )
        p = acc(m, "ptq_w4a4")
        check(
            f"QAT W4A4 {_pct(d)}% vs PTQ W4A4 {_pct(p)}% (goal: QAT above PTQ"
            f"{mixed(m, 'qat_w4a4', 'ptq_w4a4')})",
            None if d is None or p is None else d > p,
        )
        rows = [i for i in items if i["model"] == m and i["done"] and i["row"] != "float"]
        gaps, agree = [], []
        for i in rows:
            for k, name in (("ort", "ONNX Runtime"), ("ts", "TorchScript")):
                if i.get(f"{k}_acc") is not None:
                    gaps.append((round(abs(i[f"{k}_acc"] - i["acc"]) * 100, 2), i["row"], name))
                if i.get(f"{k}_agree") is not None:
                    agree.append((i[f"{k}_agree"], i["row"], name))
        if not gaps or not agree:
            check("exported accuracy within 0.1 pt: no exported rows yet", None)
            continue
        gap, agr = max(gaps), min(agree)
        check(
            "exported accuracy within 0.1 pt of fake-quant in every row: largest gap "
            f"{gap[0]:.2f} pt ({gap[1]}, {gap[2]})",
            gap[0] <= 0.1,
        )
        # The pipeline's parity check is stricter than the goal: top-1 agreement too.
        check(
            "parity check, top-1 agreement ≥ 99.9% in every row: lowest "
            f"{100 * agr[0]:.2f}% ({agr[1]}, {agr[2]})",
            agr[0] >= 0.999,
        )
    return lines


def render(items: list[dict[str, Any]], out: Path, budget: dict[str, Any]) -> Path:
    """Write ``out/results.md`` (and the plots beside it); return the markdown path."""
    from qat.export.torchscript import ENGINE as TS_ENGINE

    out.mkdir(parents=True, exist_ok=True)
    plots = plot(items, out)
    own = own_row_configs(list(dict.fromkeys(i["model"] for i in items)))
    own_budget = (
        [
            "",
            "Rows with a config of their own for one model (configs/experiment/table/<model>/"
            "<row>.yaml, a longer budget; the epochs × batches column shows it): "
            f"{', '.join(f'{m} {r}' for m, r in own)}.",
        ]
        if own
        else []
    )
    lines = [
        "# Results: accuracy, size and speed per bit width",
        "",
        "Produced by `python scripts/results.py` (do not edit by hand). Fashion-MNIST "
        "(28×28, 55,000 train / 5,000 val / 10,000 test images).",
        "",
        "**Budget.** "
        f"Float: {budget['float_epochs']} epochs from scratch (SGD, lr 0.1, cosine). "
        "QAT rows: fine-tune the float checkpoint for 2 epochs of 80 batches of 128 "
        "(20,480 images, lr 0.01, cosine): epoch 0 quantized (annealed rows: 8 → target bits "
        "linearly over the epoch), epoch 1 with the activation ranges frozen (observed weight "
        "ranges keep following the weights; BN statistics stay live: "
        "freezing them right after annealing diverged, see configs/experiment/table/_qat.yaml). "
        "The W4A4 QAT rows learn their step sizes (LSQ) and train 3 such epochs at lr 0.005, "
        "the last with BN statistics frozen (training on the folded graph); W3A3 and W2A2 "
        "also learn their step sizes and train 4 and 8: the anneal, then the rest at the "
        "target, W2A2 also "
        "learning from the float model (distillation: half the loss, temperature 2) and "
        "training each bias on its int32 grid (quant.quantize_bias). While "
        "quantized, BN statistics are re-estimated on 32 batches before each validation and "
        "the freeze (the folded integer weights stay the same). PTQ rows: calibration on 32 "
        "batches, no training. The first conv's weights, the input and the "
        "classifier's weights stay at 8 bits below W8A8; the logits are float in every row. "
        "MobileNetV2 at width 0.5. Every accuracy is on the full test set; the exported models "
        "ran on the same 10,000 images.",
        *own_budget,
        "",
        "Columns: fake-quant = the trained model in PyTorch; ORT / TS = the exported ONNX "
        "(ONNX Runtime CPU, integer kernels; residual adds unfused, DQ → Sum → Q in float32 "
        "as in the fake-quant model) and "
        "TorchScript (PyTorch INT8 kernels) models; "
        "agree = top-1 agreement with fake-quant (the lower of the two); max Δ logit = largest "
        "absolute logit difference (logits are float in every row); sizes in KiB (int8 weights; "
        "sub-8-bit values in int8 containers); latency in ms per batch, medians of interleaved "
        "rounds on a shared 2-core machine (compare within a column, between rows of one "
        "machine); machine = where the row's export was verified and timed (legend below the "
        "table). Float rows: the FP32 ONNX model in ONNX Runtime and eager PyTorch.",
        "",
        "| model | method | bits | epochs × batches | fake-quant % | ORT % | TS % | agree % "
        "| max Δ logit | ONNX KiB | TS KiB | ORT ms b1 | ORT ms b64 | TS ms b64 | run s "
        "| machine |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    machines = {
        m: f"M{n + 1}"
        for n, m in enumerate(dict.fromkeys(i.get("machine", "?") for i in items if i["done"]))
    }
    for i in items:
        if not i["done"]:
            lines.append(
                f"| {i['model']} | {i['method']} | {_bits(i['w_bits'], i['a_bits'])} "
                f"| | {'unfinished (no results.json)' if i.get('unfinished') else 'not run'} "
                "| | | | | | | | | | | |"
            )
            continue
        agree = [i.get(k) for k in ("ort_agree", "ts_agree") if i.get(k) is not None]
        diffs = [i.get(k) for k in ("ort_maxdiff", "ts_maxdiff") if i.get(k) is not None]
        status = "" if i.get("status") in (None, "ok") else f" ({i['status']})"
        status += " †" if i.get("carried") else ""
        lines.append(
            f"| {i['model']} | {i['method']}{status} | {_bits(i['w_bits'], i['a_bits'])} "
            f"| {_trained(i.get('epochs'), i.get('steps'))} | {_pct(i['acc'])} "
            f"| {_pct(i.get('ort_acc'))} | {_pct(i.get('ts_acc'))} "
            f"| {_pct(min(agree)) if agree else '–'} "
            f"| {f'{max(diffs):.3f}' if diffs else '–'} "
            f"| {_kib(i.get('ort_size'))} | {_kib(i.get('ts_size'))} "
            f"| {_ms(i.get('ort_ms1'))} | {_ms(i.get('ort_ms64'))} | {_ms(i.get('ts_ms64'))} "
            f"| {i.get('wall_time_s') or 0:.0f} | {machines[i.get('machine', '?')]} |"
        )
    if machines:
        lines += [
            "",
            "Machines: " + "; ".join(f"{key} = {m}" for m, key in machines.items()) + ".",
        ]
    carried_on: dict[str, set[str]] = {}
    for i in items:
        if i.get("carried"):
            carried_on.setdefault(i.get("date", "?"), set()).add(machines[i.get("machine", "?")])
    carried = [f"{d} ({', '.join(sorted(keys))})" for d, keys in sorted(carried_on.items())]
    if carried:
        lines += [
            "",
            "† Not re-run by the invocation that wrote this page: carried over from the saved "
            f"table ({SAVED} beside this page), run {', '.join(carried)}, with the code and "
            "row configs of that date (the budget above may have changed since: see the "
            "history of configs/experiment/table/ and qat/).",
        ]
    reexported = sorted({i["reexported"][:10] for i in items if i.get("reexported")})
    if reexported:
        lines += [
            "",
            "Exports re-made from the rows' checkpoints by `scripts/results.py --reexport` on "
            f"{', '.join(reexported)} ({sum(bool(i.get('reexported')) for i in items)} of the "
            "rows), after an exporter change; training and fake-quant figures are the runs'.",
        ]
    unpinned = [
        f"{i['model']} {i['row']}"
        for i in items
        if i["done"] and i.get("ts_acc") is not None and not i.get("ts_engine")
    ]
    if unpinned:
        lines += [
            "",
            "TorchScript figures measured under PyTorch's default `x86` quantized engine, before "
            f"the export pinned `{TS_ENGINE}` (on a VNNI CPU, `x86` runs convs through oneDNN, "
            "which rounds some requantization near-ties one level the other way; see the "
            f"README's design notes): {', '.join(unpinned)}.",
        ]
    lines += ["", "## Goals", *_checks(items), "", "## Plots", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    lines += ["", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in _machine().items()]
    lines += [f"- generated: {time.strftime('%Y-%m-%d %H:%M')}", ""]
    saved = {"generated": time.strftime("%Y-%m-%d %H:%M"), "items": items}
    for name, text in (
        (SAVED, json.dumps(saved, indent=1) + "\n"),
        ("results.md", "\n".join(lines)),
    ):
        tmp = out / f"{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    return out / "results.md"


def plot(items: list[dict[str, Any]], out: Path) -> list[Path]:
    """Accuracy vs bits per method; size and latency bars. Returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [i for i in items if i["done"]]
    models = [m for m in MODELS if any(i["model"] == m for i in done)]
    if not models:
        return []
    paths = []
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models, strict=True):
        rows = [i for i in done if i["model"] == m]
        f = next((i["acc"] for i in rows if i["row"] == "float"), None)
        if f is not None:
            ax.axhline(100 * f, color="gray", ls="--", label="float")
        for method, marker in (("PTQ", "s"), ("QAT", "o"), ("QAT annealed", "^")):
            pts = sorted(
                (i["w_bits"], 100 * i["acc"])
                for i in rows
                if i["method"].startswith(method)
                and (method != "QAT" or not i["method"].startswith("QAT annealed"))
                and i["a_bits"] == i["w_bits"]
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=marker, label=f"{method} (WbAb)")
        w4a8 = [i for i in rows if i["row"] == "qat_w4a8"]
        if w4a8:
            ax.plot([4], [100 * w4a8[0]["acc"]], "D", color="black", label="QAT W4A8")
        ax.set(title=m, xlabel="bits (weights = activations)", ylabel="test accuracy %")
        ax.set_xticks([2, 3, 4, 8])
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out / "results_accuracy.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    labels, sizes, lat = [], [], []
    for m in models:
        for row in ("float", "qat_w8a8", "qat_w4a4"):
            i = next((x for x in done if x["model"] == m and x["row"] == row), None)
            if i is None or i.get("ort_size") is None:
                continue
            labels.append(f"{m}\n{_bits(i['w_bits'], i['a_bits'])}")
            sizes.append(i["ort_size"] / 1024)
            lat.append(i.get("ort_ms64") or 0.0)
    axes[0].bar(labels, sizes, color="tab:blue")
    axes[0].set(title="ONNX file size (KiB)")
    axes[1].bar(labels, lat, color="tab:orange")
    axes[1].set(title="ONNX Runtime CPU latency, batch 64 (ms)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    paths.append(out / "results_size_latency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def log_wandb(items: list[dict[str, Any]], plots: Sequence[Path]) -> None:
    """The table and the plots as one W&B run (offline unless logged in)."""
    import wandb

    keys = sorted({k for i in items for k in i})
    run = wandb.init(project="qat", job_type="results", group="results-table", dir=str(REPO))
    table = wandb.Table(columns=keys, data=[[i.get(k) for k in keys] for i in items])
    run.log({"results/table": table, **{f"results/{p.stem}": wandb.Image(str(p)) for p in plots}})
    run.finish()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--root", type=Path, default=REPO / "outputs" / "results")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    parser.add_argument("--float-epochs", type=int, default=4)
    parser.add_argument(
        "--rows", nargs="+", default=QUANT_ROWS, choices=QUANT_ROWS, help="quantized rows to run"
    )
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument(
        "--reexport",
        action="store_true",
        help="export the finished --rows again with the current exporter (no training)",
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args(argv)
    if args.float_epochs < 1:
        parser.error("--float-epochs must be at least 1")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"overrides must look like key=value, got {bad}")
    if args.reexport and args.render_only:
        parser.error("--reexport and --render-only exclude each other")
    if args.reexport:
        exports = [o for o in args.overrides if o.startswith("export.")]
        for m in args.models:
            reexport_rows(args.root.resolve(), m, args.rows, exports)
    elif not args.render_only:
        for m in args.models:
            run_model(
                m, args.root.resolve(), args.float_epochs, args.overrides, args.rows, args.out
            )
    saved = load_saved(args.out)
    # Models run earlier and not named by --models stay on the page (carried over).
    models = [m for m in MODELS if m in args.models or any(k[0] == m for k in saved)]
    items = collect(args.root.resolve(), models, saved)
    path = render(items, args.out, {"float_epochs": args.float_epochs})
    for m in models:
        # The page's float weights, so a later run can add rows beside these (run_model).
        ckpt = _float_ckpt(args.root.resolve(), m)
        if ckpt.is_file():
            keep_float(ckpt, args.out, m)
    print(path.read_text())
    if any(o.startswith("logger=wandb") for o in args.overrides):
        log_wandb(items, [args.out / "results_accuracy.png", args.out / "results_size_latency.png"])


if __name__ == "__main__":
    main()
