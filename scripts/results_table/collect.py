"""The table's figures: one dict per (model, row), from the runs or carried over."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .carry import weights_sha
from .machine import _machine
from .rows import ROWS, _float_ckpt, _load, _row_dir


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
