"""``QComputedConv2d``: a conv whose weight its model computes from parameters at every call.

timm's weight-standardized convs (``StdConv2d``, ``ScaledStdConv2d`` and their ``Same``
variants: NFNet, NF-RegNet, BiT / ViT-hybrid stems) normalize their weight in ``forward``
before ``F.conv2d``. Graph capture records that computation; the rewrite moves it here, in front
of the weight quantizer, so the conv runs on integer kernels like any other: training updates
the raw parameters through it, and the exporters store the levels of its result (a constant:
it reads no input). Left as a float island instead, the float conv summed in another order by
ONNX Runtime than by torch moved the next grid's codes (NF-RegNet: 94.9% top-1 agreement).
"""

from __future__ import annotations

import functools

import torch
from torch import fx, nn

from qat.quant.layers.conv import QConv2d
from qat.quant.spec import QuantSpec

__all__ = ["QComputedConv2d"]


class QComputedConv2d(QConv2d):
    """A ``QConv2d`` whose float weight is ``weight_graph`` evaluated on its own tensors.

    Args:
        source: the float module whose forward computed the weight; its parameters and buffers
            (``weight``, ``bias``, a gain ...) become this layer's, under the same names.
        weight_graph: an ``fx`` graph whose ``get_attr`` nodes name tensors of ``source`` and
            whose output is the conv weight.
        conv: the ``nn.Conv2d`` arguments of the call (stride, padding, dilation, groups).
    """

    def __init__(
        self,
        source: nn.Module,
        weight_graph: fx.Graph,
        conv: dict,
        weight_spec: QuantSpec | None = None,
        activation_spec: QuantSpec | None = None,
    ) -> None:
        super().__init__(**conv, weight_spec=weight_spec, activation_spec=activation_spec)
        for name, p in source.named_parameters(recurse=False):
            setattr(self, name, p)  # the same Parameter: optimizers and checkpoints see one
        for name, b in source.named_buffers(recurse=False):
            self.register_buffer(name, b, persistent=name not in source._non_persistent_buffers_set)
        if "bias" not in dict(source.named_parameters(recurse=False)):
            self.bias = None
        self.weight_graph = weight_graph

    def effective_weight(self) -> torch.Tensor:
        env: dict[fx.Node, object] = {}

        def value(arg: object) -> object:
            return fx.node.map_arg(arg, env.__getitem__)

        for node in self.weight_graph.nodes:
            if node.op == "get_attr":
                env[node] = functools.reduce(getattr, node.target.split("."), self)
            elif node.op == "call_function":
                env[node] = node.target(*value(node.args), **value(node.kwargs))
            elif node.op == "call_method":
                obj, *rest = value(node.args)
                env[node] = getattr(obj, node.target)(*rest, **value(node.kwargs))
            elif node.op == "output":
                return env[node.args[0]]
        raise RuntimeError("weight_graph has no output")
