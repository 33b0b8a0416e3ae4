"""Fusion, the first pass of :mod:`qat.quant.graph_rewrite`: conv → BatchNorm2d (→ ReLU) becomes
``QConvBn2d`` (BN folding simulated), conv / linear → ReLU a fused ``QConv2d`` / ``QLinear``."""

from __future__ import annotations

from typing import Any

from torch import nn

from qat.quant.graph_ops import only_user
from qat.quant.layers import FloatLayer, QConv2d, QConvBn2d, QLinear

__all__ = ["fuse_layers"]


def fuse_layers(rw: Any) -> None:
    """Conv → BN (→ ReLU), conv / linear → ReLU, wherever the modules live, in the graph of
    :mod:`qat.quant.graph_rewrite`'s rewriter ``rw``: the fused layer takes the head's name,
    the other members become ``nn.Identity`` (the tree and the state_dict keep their names)."""
    calls: dict[str, int] = {}
    for node in rw.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(rw.graph.nodes):
        head = rw.module(node)
        if type(head) not in (nn.Conv2d, nn.Linear) or calls[node.target] > 1:
            continue
        if node not in rw.live:
            continue  # computed from constants alone: stays float (see swap())
        chain, bn = [node], None
        user = only_user(node)
        if (
            type(head) is nn.Conv2d
            and rw.recipe.fuse_bn
            and user is not None
            and type(rw.module(user)) is nn.BatchNorm2d
            and calls[user.target] == 1
            and rw.module(user).track_running_stats
        ):
            bn = rw.module(user)
            chain.append(user)
            user = only_user(user)
        relu = user is not None and rw.is_relu(user)
        if relu:
            chain.append(user)
        if len(chain) == 1:
            continue
        weight, activation, skip = rw.specs(node.target)
        if skip:
            parts = [head] + ([bn] if bn is not None else []) + ([nn.ReLU()] if relu else [])
            new: nn.Module = FloatLayer(nn.Sequential(*parts), activation)
        elif bn is not None:
            new = QConvBn2d.from_float(head, bn, weight, activation, relu=relu)
        else:
            qcls = QConv2d if isinstance(head, nn.Conv2d) else QLinear
            new = qcls.from_float(head, weight, activation, relu=relu)
        rw._set(node.target, new)
        chain[-1].replace_all_uses_with(node)
        for member in reversed(chain[1:]):
            if member.op == "call_module" and calls[member.target] == 1:
                # As a module swap does: the tree (and the state_dict) keeps its names.
                rw._set(member.target, nn.Identity())
            rw.graph.erase_node(member)
        rw.new[node] = node.target
