"""The export stage: export → verify on the test batches → parity check → benchmark.

One function serves both ``train`` (after the test) and ``python -m qat.export`` (a checkpoint
again), so the two write the same report. It takes test batches and a mapping of options (the
``export`` config group), not a DataModule or a config object.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from qat.export.artifacts import export_model
from qat.export.bench import benchmark_artifacts
from qat.export.lowering import placement_report
from qat.export.verify import ParityError, check_parity, verify_artifacts
from qat.quant.control import uninitialized_quantizers

__all__ = ["parity_failure", "run_export"]


def _check_initialized(model: nn.Module) -> None:
    missing = uninitialized_quantizers(model)
    if not missing:
        return
    # Their scale is a placeholder: exporting would bake a garbage grid into the model.
    shown = ", ".join(missing[:10]) + (
        f", ... ({len(missing) - 10} more)" if len(missing) > 10 else ""
    )
    layers = sorted({n.rsplit(".", 1)[0] for n in missing if "." in n}) or missing
    raise RuntimeError(
        f"cannot export: {len(missing)} quantizer(s) never saw data, so their scales are "
        f"placeholders: {shown}. The forward pass never reached them during calibration or "
        "training: calibrate on batches that reach them (schedule.calibration_batches, "
        "qat.calibrate), or leave those layers in float with an entry "
        f"{{pattern: {layers[0]}, skip: true}} in quant.overrides"
    )


def run_export(
    model: nn.Module,
    test_batches: Iterable[Any],
    options: Mapping[str, Any],
    out_dir: Path,
    float_model: nn.Module | None = None,
) -> dict[str, Any]:
    """Export ``model`` → verify on ``test_batches`` → check parity → benchmark.

    Args:
        model: the final fake-quant model (biases snapped: :func:`qat.snap_bias`).
        test_batches: ``(x, y)`` batches; the first ``options["verify_batches"]`` are used
            (all when null), the first image is the export's example input.
        options: the ``export`` config group (targets, int4_packed, verify, parity,
            fail_on_parity, bench, bench_batch_sizes).
        out_dir: where the artifacts go.
        float_model: the float model, for the benchmark's FP32 baselines.

    Returns:
        A JSON-able report. A parity failure does not raise: the report says
        ``parity_ok: false`` with the message (:func:`parity_failure` turns it into the
        error), and the models are benchmarked only when ``options["fail_on_parity"]`` is
        false (a results table shows their size and speed too).
    """
    model = model.cpu().eval()
    _check_initialized(model)
    limit = options.get("verify_batches")
    batches = itertools.islice(test_batches, int(limit)) if limit is not None else test_batches
    batches = [(b[0], b[1]) for b in batches]
    example = batches[0][0][:1].contiguous()
    targets = tuple(options.get("targets") or ("torchscript", "onnx"))
    t0 = time.perf_counter()
    artifacts = export_model(
        model,
        out_dir,
        example,
        targets=targets,
        int4_packed=bool(options.get("int4_packed")),
    )
    report: dict[str, Any] = {
        "out_dir": str(out_dir),
        "artifacts": {k: str(v) for k, v in artifacts.items()},
        "sizes_bytes": {
            k: Path(v).stat().st_size for k, v in artifacts.items() if Path(v).is_file()
        },
        "export_time_s": round(time.perf_counter() - t0, 2),
        # Which layers run on integer kernels in each target, and the share of MACs they hold.
        "placement": placement_report(model, example),
    }
    if "onnx" in artifacts:
        from qat.export.onnx.runtime import runtime_graph

        # What ONNX Runtime runs after fusing: integer kernels, and any op left in float.
        report["onnx_runtime_graph"] = runtime_graph(artifacts["onnx"])
    if options.get("verify", True):
        parity = verify_artifacts(model, artifacts, batches)
        report["parity"] = parity
        try:
            check_parity(parity, **dict(options.get("parity") or {}))
            report["parity_ok"] = True
        except ParityError as err:
            report["parity_ok"] = False
            report["parity_error"] = str(err)
            if options.get("fail_on_parity", True):
                return report
    if options.get("bench", True):
        sizes = tuple(int(b) for b in options.get("bench_batch_sizes") or (1, 64))
        reference = float_model.cpu().eval() if float_model is not None else None
        report["bench"] = benchmark_artifacts(artifacts, reference, example, batch_sizes=sizes)
    return report


def parity_failure(report: Mapping[str, Any]) -> ParityError | None:
    """The :class:`ParityError` a :func:`run_export` report records, or None if parity held."""
    if report.get("parity_ok") is False:
        return ParityError(report.get("parity_error", "parity check failed"))
    return None
