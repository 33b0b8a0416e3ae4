"""``FunctionalOp``: one function or method call of a captured graph, as a module.

Graph capture (:mod:`qat.quant.graph_rewrite`) wraps each float op written in a model's forward
(``F.gelu(x)``, ``x.softmax(-1)``, ``q @ k.transpose(-2, -1)``) in ``QAct(FunctionalOp(...))``:
a float island that the exporters dequantize into and quantize out of, as they do for
activation modules. The call's constant arguments are kept in the module; the graph values it
reads (tensors, and ints such as ``x.size(0)``) are the module's call arguments, in order.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _Slot:
    """Marks where a graph value goes in a call's arguments."""

    def __repr__(self) -> str:
        return "SLOT"

    def __reduce__(self) -> str:
        return "SLOT"

    def __deepcopy__(self, memo: dict) -> _Slot:
        return self


SLOT = _Slot()


def fill(template: Any, values: Iterator[Any]) -> Any:
    """``template`` with each :data:`SLOT` replaced by the next of ``values``."""
    if template is SLOT:
        return next(values)
    if isinstance(template, tuple | list):
        return type(template)(fill(t, values) for t in template)
    if isinstance(template, dict):
        return {k: fill(v, values) for k, v in template.items()}
    return template


class FunctionalOp(nn.Module):
    """``target(*args, **kwargs)`` (or ``args[0].target(*args[1:], **kwargs)`` for a method),
    with :data:`SLOT` arguments taken from the call.

    Example:
        >>> op = FunctionalOp(torch.nn.functional.gelu, (SLOT,), {"approximate": "tanh"})
        >>> op(x)  # gelu(x, approximate="tanh")
    """

    def __init__(
        self,
        target: Callable[..., Any] | str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.target = target
        self.args = args
        self.kwargs = dict(kwargs or {})

    @property
    def is_method(self) -> bool:
        return isinstance(self.target, str)

    @property
    def op_name(self) -> str:
        if self.is_method:
            return str(self.target)
        return getattr(self.target, "__name__", type(self.target).__name__)

    def forward(self, *values: Any) -> Any:
        it = iter(values)
        args = fill(self.args, it)
        kwargs = fill(self.kwargs, it)
        if self.is_method:
            return getattr(args[0], self.target)(*args[1:], **kwargs)
        if self.target is F.fold:
            args, kwargs = _static_fold_size(args, kwargs)
        return self.target(*args, **kwargs)

    def extra_repr(self) -> str:
        return self.op_name


def _static_fold_size(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``F.fold``'s image size as Python ints: ONNX's ``Col2Im`` (torch's exporter) takes only
    a constant one, and a model computing it from its input's shape (VOLO) would pass traced
    sizes. The size is the image's, never the batch's, so the exported batch stays dynamic."""
    if len(args) > 1:
        return (args[0], tuple(int(v) for v in args[1]), *args[2:]), kwargs
    return args, {**kwargs, "output_size": tuple(int(v) for v in kwargs["output_size"])}


#: The ops whose result lies on the grid of their (first) input: they move or select values.
GRID_PRESERVING_METHODS = frozenset(
    {
        "view",
        "view_as",
        "reshape",
        "reshape_as",
        "flatten",
        "unflatten",
        "permute",
        "transpose",
        "t",
        "contiguous",
        "squeeze",
        "unsqueeze",
        "expand",
        "expand_as",
        "repeat",
        "chunk",
        "split",
        "unbind",
        "narrow",
        "flip",
        "roll",
        "clone",
        "detach",
        "relu",
        "relu_",
        "__getitem__",
        "to",
        "float",
        "type_as",
    }
)
GRID_PRESERVING_FUNCTIONS = frozenset(
    {
        operator.getitem,
        torch.flatten,
        torch.reshape,
        torch.permute,
        torch.transpose,
        torch.squeeze,
        torch.unsqueeze,
        torch.chunk,
        torch.split,
        torch.unbind,
        torch.narrow,
        torch.flip,
        torch.roll,
        torch.relu,
        torch.nn.functional.relu,
        torch.nn.functional.max_pool1d,
        torch.nn.functional.max_pool2d,
        torch.nn.functional.adaptive_max_pool2d,
        torch.nn.functional.dropout,
        torch.nn.functional.dropout2d,
    }
)
