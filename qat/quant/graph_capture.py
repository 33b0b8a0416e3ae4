"""Capture a model's forward as a ``torch.fx`` graph, as its author wrote it.

Why ``torch.fx`` (symbolic tracing) rather than ``torch.export``: fx keeps the model's own
modules as ``call_module`` nodes under their qualified names, so the prepared model keeps its
parameter names (checkpoints and per-layer overrides by name still work), its conv / BN /
activation modules stay leaves we can fuse and swap, and inline ops (``out += identity``,
``F.relu``, ``torch.cat``, ``x @ w``) appear as nodes we can quantize. ``torch.export`` lowers to
ATen ops with lifted parameters: the module structure, and with it the names, are gone, and
capture is slower. What fx cannot trace (data-dependent Python control flow) falls back to the
module swap, with the line that stopped the capture named (:class:`CaptureError`).

The graph is traced in eval mode: Python branches on ``self.training`` inside a traced forward
take their evaluation side (what the exported model runs). Modules whose own forward branches
on ``self.training`` and that hold no parameters (drop-path / stochastic depth) are kept as
leaves, so they still follow ``.train()`` / ``.eval()``.
"""

from __future__ import annotations

import functools
import inspect
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from qat.ops import Add, Cat
from qat.quant.layers import QUANT_MODULES
from qat.quant.norm_act import split_norm_act
from qat.quant.quantizer import FakeQuantizer

__all__ = ["CaptureError", "adopt_graph", "capture", "is_captured", "split_example"]

_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_QAT_DIR = str(Path(__file__).resolve().parents[1])


class CaptureError(RuntimeError):
    """The model's forward could not be captured as a graph; ``where`` names the line."""

    def __init__(self, message: str, where: str | None = None) -> None:
        super().__init__(message)
        self.where = where


@functools.cache
def _reads_training_flag(cls: type) -> bool:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "self.training" in source


class _Tracer(fx.Tracer):
    def __init__(self, leaf_types: tuple[type[nn.Module], ...]) -> None:
        super().__init__()
        self.leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, (Add, Cat, FakeQuantizer, *QUANT_MODULES, *self.leaf_types)):
            return True
        if (
            not type(m).__module__.startswith("torch.")
            and next(m.parameters(), None) is None
            and _reads_training_flag(type(m))
        ):
            return True  # mode-dependent and weightless: run it, don't bake one branch
        return super().is_leaf_module(m, module_qualified_name)


def split_example(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of an example input: a tensor, a tuple of positional arguments, or a
    dict of keyword arguments."""
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, tuple | list):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _where(err: BaseException) -> str | None:
    """``file:line: code`` of the innermost frame in the model's own code (not torch, not qat)."""
    frames = traceback.extract_tb(err.__traceback__)
    for frame in reversed(frames):
        path = str(Path(frame.filename).resolve())
        if not path.startswith((_TORCH_DIR, _QAT_DIR)) and "<" not in frame.filename:
            return f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return None


def _concrete_args(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict:
    """Defaults of the forward arguments the example does not give, baked into the graph."""
    sig = inspect.signature(model.forward)
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise CaptureError(
                f"forward of {type(model).__name__} takes *{p.name}: a graph needs named inputs"
            )
    try:
        bound = sig.bind_partial(*args, **kwargs)
    except TypeError as err:
        raise CaptureError(
            f"example_inputs do not fit {type(model).__name__}.forward: {err}"
        ) from None
    return {
        name: p.default
        for name, p in sig.parameters.items()
        if name not in bound.arguments and p.default is not p.empty
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        return bool(torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5, equal_nan=True))
    if isinstance(a, tuple | list):
        return isinstance(b, tuple | list) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return True


@torch.no_grad()
def capture(
    model: nn.Module,
    example_inputs: Any = None,
    leaf_types: tuple[type[nn.Module], ...] = (),
) -> fx.GraphModule:
    """The model's forward as a ``GraphModule`` sharing its modules (traced in eval mode).

    With ``example_inputs``, forward arguments the example leaves out are fixed to their
    defaults, and the graph is checked to compute what the model computes on the example.

    Norm + activation modules (timm's ``BatchNormAct2d``) are split in ``model`` first
    (:func:`~qat.quant.norm_act.split_norm_act`), so the rewrite folds them like conv → BN.

    Raises:
        CaptureError: the forward cannot be traced (``where`` names the line that stopped it),
            or the graph computes something else than the model on the example.
    """
    split_norm_act(model)
    args, kwargs = split_example(example_inputs)
    concrete = _concrete_args(model, args, kwargs) if example_inputs is not None else None
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        try:
            graph = _Tracer(tuple(leaf_types)).trace(model, concrete_args=concrete)
        except Exception as err:
            where = _where(err)
            first = (str(err).strip().splitlines() or [""])[0]
            raise CaptureError(f"{type(err).__name__}: {first}", where) from err
        gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
        if example_inputs is not None:
            expected = model(*args, **kwargs)
            try:
                got = gm(*args, **kwargs)
            except Exception as err:
                raise CaptureError(
                    f"the captured graph fails on example_inputs ({type(err).__name__}: "
                    f"{(str(err).strip().splitlines() or [''])[0]})",
                    _where(err),
                ) from err
            if not _same(expected, got):
                raise CaptureError(
                    "the captured graph computes another output than the model on "
                    "example_inputs (Python control flow on tensor values?)"
                )
    finally:
        for m, training in modes:
            m.training = training
    return gm


def is_captured(model: nn.Module) -> bool:
    """True when ``model`` runs a captured graph (:func:`adopt_graph`)."""
    return bool(getattr(type(model), "qat_captured", False))


def adopt_graph(model: nn.Module, graph: fx.Graph) -> nn.Module:
    """Make ``graph`` (captured from ``model``, then rewritten) ``model``'s forward, in place.

    ``model`` keeps its class (as a subclass whose ``forward`` is the graph's generated code),
    its attributes, methods and module tree (``Sequential`` containers included), so it deep
    copies, indexes and saves its ``state_dict`` like the model its authors wrote. The code
    is in ``model.qat_graph_code``.
    """
    code_module = fx.GraphModule(model, graph, class_name=type(model).__name__)
    # get_attr targets fx made for constants (``_tensor_constant0``) live on the code module.
    for node in graph.nodes:
        if node.op == "get_attr" and not _has_path(model, node.target):
            setattr(model, node.target, getattr(code_module, node.target))
    cls = type(model)
    if is_captured(model):
        cls = cls.__mro__[1]
    captured = type(
        cls.__name__,
        (cls,),
        {
            "forward": type(code_module).forward,
            "qat_captured": True,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
        },
    )
    model.__class__ = captured
    model.qat_graph_code = code_module.code
    return model


def _has_path(model: nn.Module, target: str) -> bool:
    obj: Any = model
    for part in target.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True
