"""Parity of exported models with the fake-quant model they came from.

:func:`verify_artifacts` runs the fake-quant model (eval, under :func:`qat.runtime_numerics` for
each runtime: ONNX Runtime's and PyTorch's engines round differently) and every exported
runtime on the same batches and reports, per runtime: accuracy, top-1 agreement with the
fake-quant model (fractions of the samples; of the positions, for a dense output such as
``(N, C, H, W)`` scores), max and mean absolute logit difference, and the max difference in
output-quantization steps (the final output quantizer's scale; ``None`` when the output is
float). :func:`check_parity` turns that report into a pass / fail with the numbers in the
message.

Report layout::

    {
      "num_samples": 360,
      "output_scale": 0.0132,            # None for a float output
      "fake_quant": {"accuracy": 0.953},
      "runtimes": {
        "torchscript": {"accuracy": 0.953, "agreement": 1.0, "max_abs_diff": 0.0132,
                        "mean_abs_diff": 1.1e-05, "max_diff_steps": 1.0, "num_samples": 360,
                        "engine": "x86",       # PyTorch's quantized engine it loaded under
                        "numerics": "torchscript_x86"},  # the fake-quant target it is held to
        "onnx": {...},
      },
    }
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qat.export.convert import check_exportable
from qat.quant.grids import trace_grids
from qat.quant.numerics import runtime_numerics

__all__ = ["ParityError", "check_parity", "load_runtime", "verify_artifacts"]

#: ONNX Runtime intra-op threads for verification (this project's CI machines have 2 cores).
ORT_THREADS = 2


class ParityError(RuntimeError):
    """An exported runtime disagrees with the fake-quant model beyond the tolerance."""


def load_runtime(
    kind: str, path: str | Path, threads: int = ORT_THREADS
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable ``x → logits`` (float32 CPU tensor) for an exported artifact.

    Args:
        kind: ``"torchscript"`` or ``"onnx"``, or a key starting with one of them
            (``"onnx_int4"``); ``"torchscript_fbgemm"`` loads under that quantized engine
            (default :data:`qat.export.torchscript.ENGINE`).
        path: the artifact file.
        threads: ONNX Runtime intra-op threads.
    """
    if kind.startswith("torchscript"):
        from qat.export.torchscript import load_torchscript

        module = load_torchscript(path, engine=_engine(kind))

        def run_ts(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                out = module(x)
            return (out[0] if isinstance(out, tuple | list) else out).float()

        return run_ts
    if kind.startswith("onnx"):
        from qat.export.onnx import make_session, run_session

        session = make_session(path, threads=threads)

        def run_ort(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(np.asarray(run_session(session, x)[0])).float()

        return run_ort
    raise ValueError(f"unknown runtime {kind!r}: expected a key starting with torchscript or onnx")


def _split(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, Mapping):
        raise ValueError("verify_artifacts takes (x, y) batches or tensors, not dicts")
    if isinstance(batch, list | tuple):
        x = batch[0]
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return x, y
    return batch, None


def _engine(runtime: str) -> str:
    """The quantized engine a TorchScript key names (``torchscript_fbgemm``), or the default."""
    from qat.export.torchscript_engine import ENGINE, EXACT_ENGINES

    suffix = runtime.removeprefix("torchscript").removeprefix("_")
    return suffix if suffix in EXACT_ENGINES else ENGINE


def _numerics_target(runtime: str) -> str:
    """The runtime_numerics target of an artifact: for TorchScript, what its engine computes."""
    if runtime.startswith("torchscript"):
        from qat.export.torchscript import numerics_target

        return numerics_target(_engine(runtime))
    return "onnx"


@torch.no_grad()
def verify_artifacts(
    model: nn.Module,
    artifacts: Mapping[str, str | Path],
    batches: Iterable[Any],
    max_batches: int | None = None,
    threads: int = ORT_THREADS,
) -> dict[str, Any]:
    """Run the fake-quant model and every artifact on ``batches``; compare their outputs.

    Args:
        model: the prepared fake-quant model that was exported (run in eval mode on CPU; the
            caller's model is not modified).
        artifacts: runtime name → file, as returned by :func:`qat.export.export_model`
            (``"torchscript"``, ``"onnx"``; other keys starting with those are accepted).
        batches: ``(x, y)`` tuples (``y`` optional: without labels, accuracies are ``None``)
            or bare input tensors.
        max_batches: stop after this many batches.
        threads: ONNX Runtime intra-op threads.

    Returns:
        The report described in the module docstring.
    """
    check_exportable(model)
    ref_model = copy.deepcopy(model).cpu().eval()
    runtimes = {name: load_runtime(name, path, threads) for name, path in artifacts.items()}
    stats = {
        name: {"correct": 0, "agree": 0, "max_abs": 0.0, "sum_abs": 0.0, "count": 0}
        for name in runtimes
    }
    # Each artifact against the model computed as its runtime computes (requantization and
    # residual adds differ: qat.runtime_numerics).
    targets = {name: _numerics_target(name) for name in runtimes}
    fq_correct, n, positions, labelled = 0, 0, 0, True
    output_scale: float | None = None
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        x, y = _split(batch)
        x = x.cpu().float()
        refs = {}
        for target in dict.fromkeys(["onnx", *targets.values()]):
            # Exact sums and the runtimes' requantization (qat.runtime_numerics).
            with runtime_numerics(ref_model, target=target):
                if i == 0 and target == "onnx":
                    _, _, out_grid, ref = trace_grids(ref_model, x)
                    output_scale = None if out_grid is None else out_grid.scale
                else:
                    ref = ref_model(x)
            refs[target] = (ref[0] if isinstance(ref, tuple | list) else ref).float()
        ref_top = refs["onnx"].argmax(dim=1)
        n += len(x)
        # Top-1 positions: one per sample for logits, one per pixel / token for dense outputs.
        positions += ref_top.numel()
        if y is None:
            labelled = False
        else:
            fq_correct += int((ref_top == y.cpu()).sum())
        for name, run in runtimes.items():
            ref = refs[targets[name]]
            ref_top = ref.argmax(dim=1)
            out = run(x)
            if out.shape != ref.shape:
                raise ParityError(
                    f"{name}: output shape {tuple(out.shape)} differs from the fake-quant "
                    f"model's {tuple(ref.shape)}"
                )
            diff = (out - ref).abs()
            s = stats[name]
            top = out.argmax(dim=1)
            s["agree"] += int((top == ref_top).sum())
            if y is not None:
                s["correct"] += int((top == y.cpu()).sum())
            s["max_abs"] = max(s["max_abs"], float(diff.max()) if diff.numel() else 0.0)
            s["sum_abs"] += float(diff.double().sum())
            s["count"] += diff.numel()
    if n == 0:
        raise ValueError("verify_artifacts got no batches")
    report: dict[str, Any] = {
        "num_samples": n,
        "output_scale": output_scale,
        "fake_quant": {"accuracy": fq_correct / positions if labelled else None},
        "runtimes": {},
    }
    for name, s in stats.items():
        report["runtimes"][name] = {
            "accuracy": s["correct"] / positions if labelled else None,
            "agreement": s["agree"] / positions,
            "max_abs_diff": s["max_abs"],
            "mean_abs_diff": s["sum_abs"] / max(s["count"], 1),
            "max_diff_steps": None if output_scale is None else s["max_abs"] / output_scale,
            "num_samples": n,
        }
        if name.startswith("torchscript"):
            report["runtimes"][name]["engine"] = _engine(name)
            report["runtimes"][name]["numerics"] = targets[name]
    return report


def check_parity(
    report: Mapping[str, Any], min_agreement: float = 0.999, max_accuracy_drop_pt: float = 0.1
) -> None:
    """Raise :class:`ParityError` if any runtime misses the parity targets.

    Args:
        report: the output of :func:`verify_artifacts`.
        min_agreement: least top-1 agreement with the fake-quant model (fraction, 0–1).
        max_accuracy_drop_pt: largest accuracy drop below the fake-quant model, in
            percentage points.

    Raises:
        ParityError: naming every failing runtime with its agreement / accuracy numbers.
    """
    if not 0.0 <= min_agreement <= 1.0:
        raise ValueError(
            f"min_agreement={min_agreement!r} is invalid: expected a fraction in [0, 1]"
        )
    failures = []
    fq_acc = report.get("fake_quant", {}).get("accuracy")
    for name, r in report.get("runtimes", {}).items():
        agreement = r["agreement"]
        if not agreement >= min_agreement:  # also catches NaN
            failures.append(
                f"{name}: top-1 agreement {agreement:.4%} < {min_agreement:.4%} "
                f"(max |logit diff| {r['max_abs_diff']:.4g}"
                + (
                    f", {r['max_diff_steps']:.2f} output steps"
                    if r.get("max_diff_steps") is not None
                    else ""
                )
                + ")"
            )
        acc = r.get("accuracy")
        if acc is not None and fq_acc is not None:
            drop = (fq_acc - acc) * 100.0
            # The epsilon keeps a drop of exactly the allowed size (0.9 − 0.899) from failing.
            if drop > max_accuracy_drop_pt + 1e-9 or math.isnan(drop):
                failures.append(
                    f"{name}: accuracy {acc:.4%} is {drop:.3f} pt below the fake-quant model's "
                    f"{fq_acc:.4%} (allowed {max_accuracy_drop_pt} pt)"
                )
    if failures:
        hint = ""
        if any(f.startswith("onnx") for f in failures):
            hint = (
                ". If only ONNX disagrees: its QLinearConv adds the bias as int32 at s_in·s_w; "
                "call qat.snap_bias(model, example) on the final model before testing "
                "and exporting, so the fake-quant model adds that same bias"
            )
        raise ParityError(
            f"exported model(s) disagree with the fake-quant model on {report.get('num_samples')} "
            "samples: " + "; ".join(failures) + hint
        )
