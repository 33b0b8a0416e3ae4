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
CONV2D_FUNCTIONS = (F.conv2d, torch.conv2d)
MATMUL_FUNCTIONS = (torch.matmul, operator.matmul, torch.bmm)
MATMUL_METHODS = ("matmul", "bmm", "__matmul__")
DIV_FUNCTIONS = (operator.truediv, torch.div, torch.true_divide, torch.divide)
DIV_METHODS = ("div", "div_", "true_divide", "divide", "__truediv__")
RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
RELU_METHODS = ("relu", "relu_")
#: Calls whose result is not a float tensor (sizes, shapes, flags): never quantized.
NON_TENSOR_METHODS = frozenset({"size", "dim", "numel", "item", "tolist", "__len__"})
#: Functions called for their checks or effects, not a value (timm's ``_assert``, a slice write).
NON_TENSOR_FUNCTIONS = frozenset(
    {
        torch._assert,
        torch._assert_async,
        torch._check,
        torch.jit.is_scripting,
        torch.is_tensor,
        operator.setitem,
    }
)


#: Tensor methods that cast a float activation (identities on the values of a quint8 one).
CAST_METHODS = frozenset({"float", "to", "type_as"})


def cast_activation(x: torch.Tensor, method: str, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``getattr(x, method)(*args, **kwargs)``; a quantized ``x`` (the integer TorchScript
    model's activation, on its grid) is returned as it is."""
    if x.is_quantized:
        return x
    return getattr(x, method)(*args, **kwargs)


def target_name(node: fx.Node) -> str:
    """A module-name part for the op: an identifier that is no keyword (``_assert`` → ``assert_``)."""
    t = node.target
    name = t if isinstance(t, str) else getattr(t, "__name__", type(t).__name__)
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in name).strip("_") or "op"
    return f"{name}_" if keyword.iskeyword(name) or name[0].isdigit() else name


def is_float(node: Any) -> bool:
    """True unless the node is known not to produce a float tensor."""
    if not isinstance(node, fx.Node):
        return False
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "dtype"):
        return meta.dtype.is_floating_point
    if isinstance(meta, tuple | list):  # chunk / split / unbind: tensors (else returned above)
        return any(getattr(m, "dtype", torch.int64).is_floating_point for m in meta)
    if "tensor_meta" in node.meta or node.meta.get("type") not in (None, torch.Tensor):
        return False
    if node.op == "call_method" and node.target in NON_TENSOR_METHODS:
        return False
    if node.op == "call_function" and node.target in NON_TENSOR_FUNCTIONS:
        return False
    return not (node.op == "call_function" and node.target is getattr)


def single_tensor(node: fx.Node) -> bool:
    """False when the node is known to produce a tuple (an island quantizes one tensor;
    the tuple's float items get requantized where an integer op reads them)."""
    meta = node.meta.get("tensor_meta")  # TensorMetadata is a NamedTuple: check its dtype
    return meta is None or hasattr(meta, "dtype")


def only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def only_divisor(node: fx.Node) -> bool:
    """True when every use of ``node`` is as the divisor of a division (``a / (s + eps)``)."""

    def divides_by(user: fx.Node) -> bool:
        div = (user.op == "call_function" and user.target in DIV_FUNCTIONS) or (
            user.op == "call_method" and user.target in DIV_METHODS
        )
        divisor = user.args[1] if len(user.args) > 1 else user.kwargs.get("other")
        return div and divisor is node and node not in user.args[:1]

    return bool(node.users) and all(divides_by(u) for u in node.users)


def only_max_pooled(node: fx.Node) -> bool:
    """True for an ``F.pad`` whose every use is a max-pool (its ``-inf`` never reaches a grid)."""
    pads = node.op == "call_function" and node.target is F.pad
    pools = (F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool2d)
    return (
        pads
        and bool(node.users)
        and all(u.op == "call_function" and u.target in pools for u in node.users)
    )


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


def on_grid_values(op: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """``torch.<op>(x, ...)`` for an op that only moves values (``roll``); a quantized ``x``
    (the integer TorchScript model's activation, where torch has no quantized kernel) is
    dequantized, moved and requantized to its own grid: exactly its levels, moved."""
    fn = getattr(torch, op)
    if not x.is_quantized:
        return fn(x, *args, **kwargs)
    y = fn(x.dequantize(), *args, **kwargs)
    return torch.quantize_per_tensor(y, x.q_scale(), x.q_zero_point(), x.dtype)


def route_casts(graph: fx.Graph, is_float: Callable[[fx.Node], bool]) -> None:
    """``x.float()`` / ``x.to(dtype)`` / ``x.type_as(y)`` of an activation call
    :func:`cast_activation`: in the integer TorchScript model the activation is a quint8
    tensor already holding its values, which such a cast refuses (EfficientViT's
    ``v.float()`` in its float32 attention block). ``torch.roll`` (Swin's shifted windows),
    which has no quantized kernel, calls :func:`on_grid_values`."""
    live = input_dependent(graph, is_float)
    for node in list(graph.nodes):
        roll = (node.op == "call_function" and node.target is torch.roll) or (
            node.op == "call_method" and node.target == "roll"
        )
        if roll and node.args and node.args[0] in live:
            with graph.inserting_before(node):
                args = ("roll", *node.args)
                cast = graph.call_function(on_grid_values, args, dict(node.kwargs))
        elif node.op == "call_method" and node.target in CAST_METHODS and node.args[0] in live:
            with graph.inserting_before(node):
                args = (node.args[0], node.target, *node.args[1:])
                cast = graph.call_function(cast_activation, args, dict(node.kwargs))
        else:
            continue
        cast.meta = dict(node.meta)
        live.add(cast)
        node.replace_all_uses_with(cast)
        graph.erase_node(node)
