"""Build the QDQ ONNX model of a fake-quant model, and the float baseline."""

from __future__ import annotations

import copy
import inspect
import io
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from qat.export.convert import convert
from qat.export.ir import ConvertedModel
from qat.export.onnx.emit import deploy_model
from qat.export.onnx.passes import INT4_OPSET, compact_names, finalize

DEFAULT_OPSET = 17
_EXPORTER_MAX_OPSET = 20  # torch's TorchScript-based exporter; 21 is set by the post-pass


def _io_names(example_args: Sequence[Any], outputs: Any) -> tuple[list[str], list[str]]:
    n_in = sum(isinstance(a, torch.Tensor) for a in example_args)
    n_out = len(outputs) if isinstance(outputs, list | tuple) else 1
    ins = ["input"] + [f"input_{i}" for i in range(1, n_in)]
    outs = ["output"] + [f"output_{i}" for i in range(1, n_out)]
    return ins, outs


class _PositionalOnly(nn.Module):
    """Calls ``module`` with the positional inputs only.

    torch's TorchScript-based exporter appends the defaults of the forward arguments the
    inputs leave out (``is_causal=False`` of timm's Eva) to the traced inputs, where a Python
    bool becomes a tensor the model's code then rejects; behind this wrapper the defaults stay
    the model's own Python values.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any) -> Any:
        return self.module(*args)


def _has_defaults_after(module: nn.Module, n_args: int) -> bool:
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return any(p.default is not p.empty for p in params[n_args:])


def _export_torch(module: nn.Module, example_input: Any, opset: int) -> onnx.ModelProto:
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    if _has_defaults_after(module, len(args)):
        module = _PositionalOnly(module)
    with torch.no_grad():
        outputs = module(*args)
    ins, outs = _io_names(args, outputs)
    dynamic = {n: {0: "batch"} for n in ins + outs}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated; it is the one that runs our symbolics.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            buf,
            dynamo=False,
            opset_version=min(opset, _EXPORTER_MAX_OPSET),
            input_names=ins,
            output_names=outs,
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


def _export_at_needed_opset(
    module: nn.Module, example_input: Any, opset: int, chosen: bool
) -> tuple[onnx.ModelProto, int]:
    """``_export_torch`` at ``opset``; unless the user ``chosen`` it, at the opset an op of the
    model needs where that is higher (timm's VOLO: ``F.fold`` is ``Col2Im``, opset 18).
    Returns the model and the opset it has."""
    if not chosen and any(
        isinstance(m, nn.Fold) or getattr(m, "target", None) is F.fold for m in module.modules()
    ):
        opset = max(opset, 18)  # known ahead: torch's exporter prints its graph on the retry
    try:
        return _export_torch(module, example_input, opset), opset
    except torch.onnx.errors.UnsupportedOperatorError as err:
        needed = re.search(r"added in (?:opset )?version (\d+)", str(err))
        if chosen or needed is None or not opset < int(needed[1]) <= _EXPORTER_MAX_OPSET:
            raise
        return _export_torch(module, example_input, int(needed[1])), int(needed[1])


def resolve_opset(opset: int | None, int4_packed: bool) -> int:
    if opset is None:
        return INT4_OPSET if int4_packed else DEFAULT_OPSET
    if isinstance(opset, bool) or not isinstance(opset, int) or not 13 <= opset <= 23:
        raise ValueError(
            f"opset={opset!r} is invalid: expected an int in 13..23 (QDQ per-axis needs 13)"
        )
    if int4_packed and opset < INT4_OPSET:
        raise ValueError(
            f"int4_packed=True needs opset >= {INT4_OPSET} (INT4 tensors), got opset={opset}"
        )
    return opset


@torch.no_grad()
def build_onnx_model(
    model: nn.Module,
    example_input: Any,
    converted: ConvertedModel | None = None,
    opset: int | None = None,
    int4_packed: bool = False,
) -> onnx.ModelProto:
    """The QDQ ONNX model of a prepared fake-quant model (checked with ``onnx.checker``).

    Args:
        model: a prepared, calibrated / trained fake-quant model (left untouched).
        example_input: one batch (a tensor or a tuple of positional tensors); the batch
            dimension is dynamic in the exported graph.
        converted: :func:`qat.export.convert.convert` of the same model and input, if at hand.
        opset: ONNX opset (default 17, or the one an op of the model needs, up to 20; 21
            with ``int4_packed``).
        int4_packed: store weights whose levels fit 4 bits as INT4 (half the bytes of int8),
            each widened by a ``Cast`` to int8 that ONNX Runtime folds at load, so it runs the
            same integer kernels and outputs as the int8 file.
    """
    chosen = opset is not None
    opset = resolve_opset(opset, int4_packed)
    if converted is None:
        converted = convert(model, example_input)
    if isinstance(example_input, dict):
        raise ValueError("ONNX export takes positional inputs (a tensor or a tuple)")
    deploy = deploy_model(model, converted)
    proto, opset = _export_at_needed_opset(deploy, example_input, opset, chosen)
    return finalize(proto, opset, int4_packed)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example_input: Any,
    converted: ConvertedModel | None = None,
    opset: int | None = None,
    int4_packed: bool = False,
) -> Path:
    """Build the QDQ model (:func:`build_onnx_model`) and write it to ``path``."""
    proto = build_onnx_model(model, example_input, converted, opset, int4_packed)
    path = Path(path)
    path.write_bytes(proto.SerializeToString())
    return path


@torch.no_grad()
def float_onnx_bytes(model: nn.Module, example_input: Any, opset: int | None = None) -> bytes:
    """A float model as ONNX bytes (eval mode: the exporter folds BN into the convs); at
    ``opset``, by default 17 or the one an op of the model needs."""
    module = copy.deepcopy(model).cpu().eval()
    chosen = opset is not None
    proto, _ = _export_at_needed_opset(module, example_input, opset or DEFAULT_OPSET, chosen)
    compact_names(proto.graph)  # as for the integer files, so their sizes compare fairly
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def export_float_onnx(
    model: nn.Module, path: str | Path, example_input: Any, opset: int | None = None
) -> Path:
    """Export a float (unprepared) model to ONNX, BN folded: the FP32 baseline."""
    path = Path(path)
    path.write_bytes(float_onnx_bytes(model, example_input, opset))
    return path
