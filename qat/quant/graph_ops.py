"""Which ops the nodes of a captured ``fx`` graph call: the tables and small queries that
:mod:`qat.quant.graph_rewrite` reads to find adds, concats, matmuls, ReLUs and calls that make
no tensor."""

from __future__ import annotations

import keyword
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
ADD_METHODS = ("add", "add_", "__add__", "__iadd__")
CAT_FUNCTIONS = (torch.cat, torch.concat, torch.concatenate)
MATMUL_FUNCTIONS = (torch.matmul, operator.matmul, torch.bmm)
MATMUL_METHODS = ("matmul", "bmm", "__matmul__")
RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
RELU_METHODS = ("relu", "relu_")
#: Calls whose result is not a float tensor (sizes, shapes, flags): never quantized.
NON_TENSOR_METHODS = frozenset({"size", "dim", "numel", "item", "tolist", "__len__"})
#: Functions called for their checks, not a value (timm's ``_assert``, ``torch._check``).
NON_TENSOR_FUNCTIONS = frozenset(
    {torch._assert, torch._assert_async, torch._check, torch.jit.is_scripting, torch.is_tensor}
)


def target_name(node: fx.Node) -> str:
    """A module-name part for the op: an identifier that is no keyword (``_assert`` → ``assert_``)."""
    t = node.target
    name = t if isinstance(t, str) else getattr(t, "__name__", type(t).__name__)
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in name).strip("_") or "op"
    return f"{name}_" if keyword.iskeyword(name) or name[0].isdigit() else name


def only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def cat_args(node: fx.Node) -> tuple[Any, int]:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return list(tensors), int(dim)


def input_dependent(graph: fx.Graph, is_float: Callable[[fx.Node], bool]) -> set[fx.Node]:
    """The nodes whose value depends on a model input through float tensors (not through
    shapes or masks built from them)."""
    live: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(
            a in live and (a.op == "placeholder" or is_float(a)) for a in node.all_input_nodes
        ):
            live.add(node)
    return live
