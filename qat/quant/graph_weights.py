"""Weights a model computes in its forward: ``F.conv2d`` calls whose weight is a function of one
conv module's own parameters (timm's weight-standardized ``StdConv2d`` / ``ScaledStdConv2d``).

:mod:`qat.quant.graph_rewrite` turns each into a
:class:`~qat.quant.layers.QComputedConv2d`, which runs that computation in front of its weight
quantizer, so the conv runs on the integer kernels instead of as a float island.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from qat.quant.graph_ops import CONV2D_FUNCTIONS

__all__ = ["computed_convs", "conv2d_call", "replace_computed_conv"]

_CONV2D_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def _conv2d_args(node: fx.Node) -> list[Any] | None:
    """``F.conv2d``'s seven arguments, positional or keyword; None if any is left out."""
    names = _CONV2D_ARGS[len(node.args) :]
    if any(k not in node.kwargs for k in names):
        return None
    return list(node.args) + [node.kwargs[k] for k in names]


def computed_convs(
    graph: fx.Graph, modules: dict[str, nn.Module], live: set[fx.Node]
) -> dict[fx.Node, tuple[str, fx.Graph]]:
    """Each ``F.conv2d`` call on an input (``live``) whose weight the conv module that makes
    the call computes from its own tensors alone, whose bias is its own ``bias`` (or None) and
    whose other arguments are constants: the call → (that module's name, the weight's
    computation as a graph of its own). One call per module; a module with children is left
    alone."""
    found: dict[fx.Node, tuple[str, fx.Graph]] = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in CONV2D_FUNCTIONS or node not in live:
            continue
        args = _conv2d_args(node)
        if args is None:
            continue
        _, w, b, *conv = args
        stack = node.meta.get("nn_module_stack") or {}
        owner = next(reversed(stack.values()))[0] if stack else ""
        mod = modules.get(owner)
        if (
            not isinstance(mod, nn.Conv2d)
            or next(mod.children(), None) is not None
            or any(o == owner for o, _ in found.values())
            or any(isinstance(a, fx.Node) for a in conv)
            or not isinstance(w, fx.Node)
            or w in live
            or not (b is None or (b.op == "get_attr" and b.target == f"{owner}.bias"))
        ):
            continue
        weight_graph = _own_computation(w, owner)
        if weight_graph is not None:
            found[node] = (owner, weight_graph)
    return found


def _own_computation(value: fx.Node, owner: str) -> fx.Graph | None:
    """The computation of ``value`` as a graph of its own, its ``get_attr`` nodes naming
    ``owner``'s own tensors relative to it; None if it reads anything else (an input, a
    module call, another module's tensor)."""
    needed: set[fx.Node] = set()
    stack = [value]
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        if n.op == "get_attr":
            if n.target.rpartition(".")[0] != owner:
                return None
        elif n.op not in ("call_function", "call_method"):
            return None
        needed.add(n)
        stack.extend(n.all_input_nodes)
    graph, env = fx.Graph(), {}
    for n in value.graph.nodes:
        if n in needed:
            env[n] = graph.node_copy(n, env.__getitem__)
            if n.op == "get_attr":
                env[n].target = n.target.rpartition(".")[2]
    graph.output(env[value])
    return graph


def conv2d_call(node: fx.Node, mod: nn.Conv2d) -> tuple[fx.Node, dict[str, Any]]:
    """The input of a computed conv call, and the ``nn.Conv2d`` arguments of the call."""
    x, _, b, stride, padding, dilation, groups = _conv2d_args(node)
    conv = {
        "in_channels": mod.in_channels,
        "out_channels": mod.out_channels,
        "kernel_size": mod.kernel_size,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "groups": groups,
        "bias": b is not None,
    }
    return x, conv


def replace_computed_conv(node: fx.Node, owner: str, x: fx.Node) -> fx.Node:
    """Call module ``owner`` on ``x`` in place of ``node``; the weight's computation, now the
    module's own, leaves the graph. Returns the new node."""
    graph = node.graph
    with graph.inserting_after(node):
        new = graph.create_node("call_module", owner, (x,))
    new.meta = dict(node.meta)
    dead = [a for a in node.all_input_nodes if a is not x]
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    erased: set[fx.Node] = set()
    while dead:
        n = dead.pop()
        if not n.users and n not in erased:
            dead.extend(n.all_input_nodes)
            graph.erase_node(n)
            erased.add(n)
    return new
