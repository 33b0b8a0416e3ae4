"""``quant.budget.latency_ms``: a latency budget for ``quant=auto``, measured on the target.

The runtimes this project exports to have 8-bit integer kernels only: ONNX Runtime's
``QLinearConv`` / ``QGemm`` and PyTorch's ``x86`` quantized engine run a layer at 2, 3 or 4 bits
on the same int8 kernel as at 8 bits (the narrower values are stored in int8; docs/design.md,
"Sub-8-bit"). No candidate width below 8 runs faster there, so a latency budget has nothing to
trade for accuracy among the candidates. What it does, honestly:

1. :func:`latency_table` exports the model with every layer at each candidate width (ranges
   calibrated on the sensitivity batches) to the target and times the files interleaved, one
   image on ``threads`` threads: the table of latency per width (``latency.json`` in the run
   folder), which shows the widths run alike;
2. :func:`check_latency` refuses a budget the model at the highest candidate misses (one line:
   the measured table, and what to raise). Otherwise every layer takes the highest candidate:
   the most accurate choice, and none narrower is faster.

``scripts/bench_latency_budget.py`` times the trained run's exported file against the budget.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat.lit.errors import ConfigError
from qat.quant.calibrate import calibrate
from qat.quant.sensitivity import quant_units

__all__ = ["LATENCY_TARGETS", "check_latency", "latency_table", "time_artifact"]

#: Export targets a latency budget is measured on (file-based runtimes with integer kernels).
LATENCY_TARGETS = ("onnx", "torchscript")


def time_artifact(
    paths: Mapping[Any, str | Path], target: str, example: torch.Tensor, threads: int = 1
) -> dict[Any, float]:
    """Median milliseconds per call of each exported file of ``target``, one image
    (``example[:1]``) on ``threads`` threads, timed interleaved (:mod:`qat.export.bench`)."""
    from qat.export.bench import make_batch, time_interleaved

    x = make_batch(example[:1], 1)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fns = {key: _runner(path, target, x, threads) for key, path in paths.items()}
        return {k: s * 1000.0 for k, s in time_interleaved(fns, rounds=9, min_time=0.2).items()}
    finally:
        torch.set_num_threads(old)


def _runner(path: str | Path, target: str, x: torch.Tensor, threads: int) -> Any:
    if target == "onnx":
        import numpy as np

        from qat.export.onnx import make_session

        session = make_session(path, threads)
        feeds = {session.get_inputs()[0].name: np.ascontiguousarray(x.numpy())}
        return lambda: session.run(None, feeds)
    from qat.export.torchscript import load_torchscript

    module = load_torchscript(path)

    def run() -> Any:
        with torch.no_grad():
            return module(x)

    return run


def latency_table(
    probe: nn.Module,
    candidates: Sequence[int],
    batches: Sequence[Any],
    target: str,
    example: torch.Tensor,
    threads: int = 1,
) -> dict[int, float]:
    """``{bits: ms}``: ``probe`` (a prepared model) with every allocated layer at each width,
    calibrated on ``batches``, exported to ``target`` and timed (:func:`time_artifact`)."""
    from qat.export import export_model

    if target not in LATENCY_TARGETS:
        raise ValueError(f"target={target!r} is invalid: allowed: {', '.join(LATENCY_TARGETS)}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for bits in candidates:
            model = copy.deepcopy(probe).cpu().eval()
            for quants in quant_units(model).values():
                for q in quants:
                    q.set_bits(bits)
                    q.reset_observer()
            calibrate(model, list(batches))
            out = export_model(model, Path(tmp) / str(bits), example[:1], targets=(target,))
            paths[bits] = out[target]
        return time_artifact(paths, target, example, threads)


def check_latency(table: Mapping[int, float], budget_ms: float, target: str) -> int:
    """The width every layer takes under ``budget_ms``: the highest candidate, when the model
    at that width meets the budget (none narrower runs faster on the int8 kernels).

    Raises:
        ConfigError: the model at the highest candidate misses the budget.
    """
    top = max(table)
    if table[top] <= budget_ms:
        return top
    measured = ", ".join(f"{b} bits {table[b]:.3g} ms" for b in sorted(table, reverse=True))
    raise ConfigError(
        f"quant.budget.latency_ms={budget_ms:g} is below the model exported to {target} "
        f"({measured}: its int8 kernels run every width 2–8 alike, so no allocation is "
        f"faster): raise latency_ms to at least {table[top]:.3g}, or budget size_mb / bops"
    )
