"""Write the integer artifacts of a fake-quant model, atomically, after a smoke test each."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat.export.convert import check_exportable, convert
from qat.export.ir import ConvertedModel
from qat.io import commit, write_staged

__all__ = ["FILENAMES", "TARGETS", "export_model"]


#: Export targets and the file each one writes in ``out_dir``.
FILENAMES = {"torchscript": "model.ts", "onnx": "model.onnx"}
TARGETS = tuple(FILENAMES)


def _check_example(example_input: Any) -> tuple[torch.Tensor, ...]:
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise ValueError(
            "example_input must be an input batch (a tensor, or a tuple of tensors for a "
            f"model with several inputs), got {type(example_input).__name__}"
        )
    if not args[0].is_floating_point():
        raise ValueError(f"example_input must be a float tensor, got {args[0].dtype}")
    return tuple(a.detach().cpu() for a in args)


def _check_targets(targets: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    unknown = [t for t in targets if t not in FILENAMES]
    if unknown or not targets:
        raise ValueError(
            f"unknown export target(s) {unknown or list(targets)}: allowed: {', '.join(TARGETS)}"
        )
    return tuple(dict.fromkeys(targets))


def _smoke_torchscript(path: Path, args: tuple[torch.Tensor, ...], expected: torch.Size) -> None:
    from qat.export.torchscript import load_torchscript

    module = load_torchscript(path)
    with torch.no_grad():
        out = module(*args)
    out = out[0] if isinstance(out, tuple | list) else out
    _check_output("torchscript", out, expected)


def _smoke_onnx(path: Path, args: tuple[torch.Tensor, ...], expected: torch.Size) -> None:
    import onnx

    from qat.export.onnx import make_session, run_session

    onnx.checker.check_model(str(path), full_check=True)
    session = make_session(path, threads=2, providers=["CPUExecutionProvider"])
    out = torch.from_numpy(run_session(session, args)[0])
    _check_output("onnx", out, expected)


def _check_output(name: str, out: torch.Tensor, expected: torch.Size) -> None:
    if tuple(out.shape) != tuple(expected):
        raise RuntimeError(
            f"{name} smoke test: output shape {tuple(out.shape)}, expected {tuple(expected)}"
        )
    if not bool(torch.isfinite(out).all()):
        raise RuntimeError(f"{name} smoke test: the output has non-finite values")


def _build(
    target: str,
    model: nn.Module,
    args: tuple[torch.Tensor, ...],
    converted: ConvertedModel,
    int4_packed: bool,
    opset: int | None,
) -> bytes:
    example = args if len(args) > 1 else args[0]
    if target == "torchscript":
        from qat.export.torchscript import (
            build_integer_model,
            save_torchscript,
            trace_integer_model,
        )

        traced = trace_integer_model(build_integer_model(model, example, converted), example)
        buf = BytesIO()
        save_torchscript(traced, buf)
        return buf.getvalue()
    from qat.export.onnx import build_onnx_model

    proto = build_onnx_model(model, example, converted, opset=opset, int4_packed=int4_packed)
    return proto.SerializeToString()


def export_model(
    model: nn.Module,
    out_dir: str | Path,
    example_input: Any,
    targets: Sequence[str] = TARGETS,
    int4_packed: bool = False,
    opset: int | None = None,
) -> dict[str, Path]:
    """Export a trained fake-quant model to integer TorchScript and / or QDQ ONNX.

    Every artifact is built, written to a temporary file next to its destination, smoke-tested
    (loaded, one inference on ``example_input``, shape and finiteness checked; ``onnx.checker``
    for ONNX), and only when all targets pass are the files moved into place (``os.replace``).
    A failure anywhere leaves the previous files byte-identical and no temporary file behind.

    Args:
        model: a prepared (``qat.prepare``), calibrated / trained fake-quant model. It is not
            modified (export works on a CPU copy in eval mode).
        out_dir: directory for ``model.ts`` / ``model.onnx`` (created if missing).
        example_input: one input batch (a tensor, or a tuple of tensors); it fixes the
            traced control flow and finds each layer's input grid. The batch dimension stays
            dynamic in ONNX; TorchScript traces it too (any batch size runs).
        targets: any of ``"torchscript"``, ``"onnx"``.
        int4_packed: ONNX only: store weights whose levels fit 4 bits as packed INT4
            (opset 21): about half the file; ONNX Runtime folds their ``Cast`` to int8 at load
            and runs the same integer kernels as for the int8 file.
        opset: ONNX opset (default 17, or 21 with ``int4_packed``).

    Returns:
        ``{"torchscript": out_dir/model.ts, "onnx": out_dir/model.onnx}`` for the targets.

    Raises:
        ValueError: before anything is written, for an unprepared model, quantizers that
            never saw data (named), an unknown target, a bad ``example_input`` or ``opset``,
            or a layer the integer runtimes cannot run (named).
        RuntimeError: an artifact failed its smoke test (nothing replaced).
    """
    targets = _check_targets(targets)
    check_exportable(model)
    args = _check_example(example_input)
    if opset is not None or int4_packed:
        from qat.export.onnx import resolve_opset

        resolve_opset(opset, int4_packed)
    out_dir = Path(out_dir)
    model = copy.deepcopy(model).cpu().eval()
    example = args if len(args) > 1 else args[0]
    converted = convert(model, example)
    ref = converted.example_output
    ref = ref[0] if isinstance(ref, tuple | list) else ref
    expected = ref.shape

    out_dir.mkdir(parents=True, exist_ok=True)
    staged: dict[str, Path] = {}
    try:
        for target in targets:
            data = _build(target, model, args, converted, int4_packed, opset)
            final = out_dir / FILENAMES[target]
            staged[target] = write_staged(final, data)
            smoke = _smoke_torchscript if target == "torchscript" else _smoke_onnx
            smoke(staged[target], args, expected)
        paths = {}
        for target, tmp in staged.items():
            paths[target] = commit(tmp, out_dir / FILENAMES[target])
        return paths
    finally:
        for tmp in staged.values():
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
