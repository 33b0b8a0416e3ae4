"""Check a run's exported model against its latency budget: measured ms vs budget ms.

A ``quant=auto quant.budget.latency_ms=<ms> quant.budget.target=<onnx|torchscript>`` run
chooses its widths from the latency of the model exported at each width
(``qat/lit/quant_latency.py``, ``latency.json`` in the run folder). This script times the file
the run trained and exported (``export/model.onnx`` or ``export/model.ts``), one image on the
budget's threads, interleaved with nothing else, and prints the measured latency beside the
budget. Exit code 0 when it meets the budget, 1 when it misses, 2 on bad input.

Usage::

    python scripts/bench_latency_budget.py outputs/<run>             # the run's own budget
    python scripts/bench_latency_budget.py outputs/<run> --budget-ms 0.5 --target onnx
"""

# ruff: noqa: E402 (the repository root is put on sys.path first)

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch

from qat.lit.quant_latency import LATENCY_TARGETS, time_artifact

FILES = {"onnx": "model.onnx", "torchscript": "model.ts"}


def budget_of(run_dir: Path) -> dict:
    """The run's latency budget (``mixed_precision`` in its results.json), or {}."""
    path = run_dir / "results.json"
    if not path.is_file():
        return {}
    mixed = json.loads(path.read_text()).get("mixed_precision") or {}
    return mixed if mixed.get("cost") == "latency" else {}


def input_shape(run_dir: Path) -> list[int] | None:
    """One image of the run's data: the shape its ONNX file declares, or None without one."""
    onnx_path = run_dir / "export" / FILES["onnx"]
    if not onnx_path.is_file():
        return None
    import onnx

    dims = onnx.load(str(onnx_path)).graph.input[0].type.tensor_type.shape.dim
    return [1] + [int(d.dim_value) for d in dims[1:]]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished run folder (results.json)")
    parser.add_argument("--budget-ms", type=float, help="default: the run's latency_ms")
    parser.add_argument("--target", choices=LATENCY_TARGETS, help="default: the run's target")
    parser.add_argument("--threads", type=int, help="default: the run's (else 1)")
    parser.add_argument(
        "--shape", help="one input's C,H,W (default: read from the run's export/model.onnx)"
    )
    args = parser.parse_args(argv)
    own = budget_of(args.run_dir)
    budget = args.budget_ms if args.budget_ms is not None else own.get("budget")
    target = args.target or own.get("target")
    threads = args.threads or int(own.get("threads") or 1)
    if budget is None or target is None:
        parser.error(
            f"{args.run_dir} has no latency budget in results.json (not a quant=auto "
            "quant.budget.latency_ms run): pass --budget-ms and --target"
        )
    path = args.run_dir / "export" / FILES[target]
    if not path.is_file():
        parser.error(f"{path} does not exist: export the run to {target} (export.targets)")
    shape = (
        [1, *(int(v) for v in args.shape.split(","))] if args.shape else input_shape(args.run_dir)
    )
    if shape is None:
        parser.error(
            f"{args.run_dir}/export has no model.onnx to read the input shape: pass --shape"
        )
    example = torch.zeros(shape)
    ms = time_artifact({target: path}, target, example, threads)[target]
    verdict = "meets" if ms <= budget else "misses"
    print(
        f"{path}: {ms:.4g} ms per image measured vs budget {budget:.4g} ms "
        f"({target}, {threads} thread(s)): {verdict} the budget"
    )
    if own.get("latency_ms_by_bits"):
        table = ", ".join(f"{b} bits {v:.4g} ms" for b, v in own["latency_ms_by_bits"].items())
        print(f"chosen from (each width exported and timed before training): {table}")
    return 0 if ms <= budget else 1


if __name__ == "__main__":
    sys.exit(main())
