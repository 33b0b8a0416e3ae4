"""The export stage of a language model: GGUF / ONNX / a quantized Hugging Face checkpoint
(compressed-tensors, :mod:`qat.export.hf_checkpoint`) / an ONNX Runtime GenAI folder
(:mod:`qat.export.onnx.genai`) → verify → parity check → benchmark.

The language-model counterpart of :func:`qat.export.run_export`, with the same report shape:
``artifacts``, ``sizes_bytes``, ``parity`` (next-token agreement and perplexity,
:mod:`qat.export.verify_lm`), ``parity_ok`` and ``bench`` (ONNX Runtime, the float model's
ONNX beside ``model.onnx``, batch 1 and one ``seq_len`` window, interleaved medians). Every file
is written next to its destination, smoke-tested, and moved into place only when all passed.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat.export.verify import ParityError
from qat.export.verify_lm import check_lm_parity, load_lm_runtime, verify_lm_artifacts
from qat.io import commit, commit_dir, staged_dir, staged_path, write_staged
from qat.quant.control import uninitialized_quantizers

__all__ = ["DEFAULT_LM_TARGETS", "LM_FILENAMES", "LM_TARGETS", "export_lm", "run_lm_export"]

#: Where each target goes in the export folder (``hf``: a Hugging Face checkpoint folder;
#: ``genai``: an onnxruntime-genai folder, model.onnx with a KV cache and genai_config.json).
LM_FILENAMES = {"gguf": "model.gguf", "onnx": "model.onnx", "hf": "hf", "genai": "genai"}
LM_TARGETS = tuple(LM_FILENAMES)
#: What a call that names no targets writes (hf only for Hugging Face models, on affine grids).
DEFAULT_LM_TARGETS = ("gguf", "onnx")


def check_lm_targets(targets: Sequence[str] | str) -> tuple[str, ...]:
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    bad = [t for t in targets if t not in LM_FILENAMES]
    if bad or not targets:
        raise ValueError(
            f"unknown language-model export target(s) {bad or list(targets)}: allowed: "
            f"{', '.join(LM_TARGETS)}"
        )
    return tuple(dict.fromkeys(targets))


def export_lm(
    model: nn.Module,
    out_dir: str | Path,
    example_ids: torch.Tensor,
    targets: Sequence[str] = DEFAULT_LM_TARGETS,
    accuracy_level: int | None = None,
    float_islands: str | None = None,
    genai_q8_ops: bool = False,
) -> dict[str, Path]:
    """Write ``model.gguf`` / ``model.onnx`` / the ``hf`` checkpoint folder / the ``genai``
    folder of a quantized language model, atomically.

    Each file (folder) is staged, smoke-tested (loaded, run on ``example_ids``: logits of the
    fake-quant model's shape, finite) and only then moved into place; a failure leaves the old
    files.
    """
    from qat.export.gguf import export_gguf
    from qat.export.hf_checkpoint import export_hf_checkpoint
    from qat.export.lm_io import logits_of
    from qat.export.onnx.llm import build_lm_onnx

    targets = check_lm_targets(targets)
    missing = uninitialized_quantizers(model)
    if missing:
        raise ValueError(
            f"cannot export: {len(missing)} quantizer(s) never saw data ({', '.join(missing[:5])}"
            "): calibrate or train the model first"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        expected = logits_of(model.eval(), example_ids).shape
    staged: dict[str, Path] = {}
    try:
        for target in targets:
            final = out_dir / LM_FILENAMES[target]
            if target == "hf":
                staged[target] = staged_dir(final)  # listed first: removed if the write fails
                export_hf_checkpoint(model, staged[target])
            elif target == "genai":
                from qat.export.onnx.genai import export_genai

                staged[target] = staged_dir(final)  # listed first: removed if the write fails
                export_genai(
                    model, staged[target], accuracy_level=accuracy_level, q8_ops=genai_q8_ops
                )
            elif target == "onnx":
                proto = build_lm_onnx(
                    model, example_ids, accuracy_level=accuracy_level, float_islands=float_islands
                )
                staged[target] = write_staged(final, proto.SerializeToString())
            else:
                staged[target] = staged_path(final)  # listed first: removed if the write fails
                export_gguf(model, staged[target])
            out = _runtime(target, staged[target])(example_ids)
            if out.shape != expected or not bool(torch.isfinite(out).all()):
                raise RuntimeError(
                    f"{target} smoke test: logits {tuple(out.shape)} (finite: "
                    f"{bool(torch.isfinite(out).all())}), expected {tuple(expected)}"
                )
        return {
            t: (commit_dir if tmp.is_dir() else commit)(tmp, out_dir / LM_FILENAMES[t])
            for t, tmp in staged.items()
        }
    finally:
        for tmp in staged.values():
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()


def _runtime(target: str, path: Path) -> Any:
    """``ids → logits`` of one exported target (the genai folder's model.onnx with an empty
    KV cache; the others through :func:`~qat.export.verify_lm.load_lm_runtime`)."""
    if target == "genai":
        from qat.export.onnx.genai_runtime import load_genai_runtime

        return load_genai_runtime(path)
    return load_lm_runtime(target, path)


def bench_lm(
    onnx_paths: Mapping[str, str | Path],
    float_model: nn.Module | None,
    example_ids: torch.Tensor,
    rounds: int = 7,
    threads: int = 2,
) -> dict[str, Any]:
    """ONNX Runtime latency (ms per call, medians of interleaved rounds) at ``example_ids``'
    shape, the float model's ONNX (``ort_fp32``) beside each given file, and file sizes."""
    import tempfile

    import numpy as np

    from qat.export.bench import time_interleaved
    from qat.export.onnx import make_session
    from qat.export.onnx.llm import float_lm_onnx

    feeds = {"input_ids": example_ids.cpu().long().numpy().astype(np.int64)}
    paths = dict(onnx_paths)
    with tempfile.TemporaryDirectory() as tmp:
        if float_model is not None:
            fp32 = Path(tmp) / "float.onnx"
            fp32.write_bytes(float_lm_onnx(float_model, example_ids))
            paths = {"ort_fp32": fp32, **paths}
        sizes = {name: Path(p).stat().st_size for name, p in paths.items()}
        sessions = {n: make_session(p, threads=threads, spinning=False) for n, p in paths.items()}
        fns = {n: (lambda s=s: s.run(None, feeds)) for n, s in sessions.items()}
        latency = time_interleaved(fns, rounds=rounds)
    report: dict[str, Any] = {
        "shape": list(example_ids.shape),
        "rounds": rounds,
        "threads": threads,
        "latency_ms": {n: s * 1000.0 for n, s in latency.items()},
        "sizes_bytes": sizes,
    }
    if "ort_fp32" in latency:
        report["speedup_vs_fp32"] = {n: latency["ort_fp32"] / s for n, s in latency.items()}
        report["size_fp32_vs"] = {n: sizes["ort_fp32"] / b for n, b in sizes.items()}
    return report


def _checkpointing_off(model: nn.Module) -> None:
    """Turn a Hugging Face model's gradient checkpointing off: training is over, and its
    hooks neither deep-copy nor export."""
    on = getattr(model, "is_activation_checkpointing", None)  # transformers 5.x
    if on is None:
        on = getattr(model, "is_gradient_checkpointing", False)
    if not on:
        return
    disable = getattr(model, "activation_checkpointing_disable", None)
    (disable or model.gradient_checkpointing_disable)()


def _size(path: Path) -> int:
    """Bytes of a file, or of every file in a folder (the hf checkpoint)."""
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def run_lm_export(
    model: nn.Module,
    test_batches: Iterable[Any],
    options: Mapping[str, Any],
    out_dir: Path,
    float_model: nn.Module | None = None,
) -> dict[str, Any]:
    """Export → verify → parity → benchmark, as :func:`qat.export.run_export` for classifiers.

    Args:
        model: the final fake-quant language model.
        test_batches: ``(ids, targets)`` batches; the first ``verify_batches`` are used.
        options: the ``export`` config group (targets, verify, verify_batches, parity
            (min_agreement, max_ppl_rel_diff, max_kl), fail_on_parity, bench, accuracy_level,
            float_islands, genai_q8_ops: the genai target's Q8_0 rounding as float ops, see
            :func:`qat.export.onnx.genai.build_genai_folder`).
        out_dir: where the files go.
        float_model: the float model, for the FP32 baseline of the benchmark.
    """
    model = model.cpu().eval()
    _checkpointing_off(model)
    limit = options.get("verify_batches")
    batches = list(itertools.islice(test_batches, int(limit)) if limit else test_batches)
    example = batches[0][0][:1].contiguous()
    t0 = time.perf_counter()
    targets = tuple(options.get("targets") or DEFAULT_LM_TARGETS)
    level = options.get("accuracy_level")
    level = None if level is None else int(level)
    islands = options.get("float_islands")
    q8_ops = bool(options.get("genai_q8_ops", False))
    artifacts = export_lm(
        model,
        out_dir,
        example,
        targets,
        accuracy_level=level,
        float_islands=islands,
        genai_q8_ops=q8_ops,
    )
    from qat.export.onnx.llm import linear_kinds

    report: dict[str, Any] = {
        "out_dir": str(out_dir),
        "artifacts": {k: str(v) for k, v in artifacts.items()},
        "sizes_bytes": {k: _size(v) for k, v in artifacts.items()},
        "export_time_s": round(time.perf_counter() - t0, 2),
        # How each layer runs in ONNX; a k-quant grid (GGUF only) has no ONNX kind.
        "layers": linear_kinds(model) if "onnx" in targets else {},
    }
    if options.get("verify", True):
        others = {k: v for k, v in artifacts.items() if k != "genai"}
        report["parity"] = (
            verify_lm_artifacts(model, others, batches) if others else {"runtimes": {}}
        )
        if "genai" in artifacts:
            from qat.export.onnx.genai_runtime import verify_genai

            report["parity"]["runtimes"]["genai"] = verify_genai(model, artifacts["genai"], batches)
        try:
            check_lm_parity(report["parity"], **dict(options.get("parity") or {}))
            report["parity_ok"] = True
        except ParityError as err:
            report["parity_ok"] = False
            report["parity_error"] = str(err)
            if options.get("fail_on_parity", True):
                return report
    if options.get("bench", True) and "onnx" in artifacts:
        reference = float_model.cpu().eval() if float_model is not None else None
        report["bench"] = bench_lm({"onnx": artifacts["onnx"]}, reference, example)
    return report
