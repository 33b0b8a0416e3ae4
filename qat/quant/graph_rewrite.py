"""Rewrite a captured graph (:mod:`qat.quant.graph_capture`) into qat's quantized layers.

The rewrite keeps one invariant: every integer op (conv, linear, residual add, concat) reads
tensors on a quantization grid, and every float op between them is an explicit float island
with an output quantizer, so the graph trained is the graph the integer runtimes execute.

1. Fusion, wherever the modules live: conv → BatchNorm2d (→ ReLU) becomes ``QConvBn2d`` (BN
   folding simulated), conv / linear → ReLU a fused ``QConv2d`` / ``QLinear``; the ReLU may be a
   module (one module called twice is two nodes), ``F.relu``, ``torch.relu`` or ``.relu()``.
2. Leaf modules: conv / linear → ``QConv2d`` / ``QLinear``; ``qat.ops`` markers and inline
   ``a + b``, ``+=``, ``torch.add``, ``torch.cat`` → ``QAdd`` (a following ReLU fused) /
   ``QCat``; grid-preserving ops (ReLU, max-pool, flatten, reshape, permute, dropout, ...) stay as
   they are; every other op producing a float tensor (activations, pooling, LayerNorm,
   softmax, ``*``, ``@``, SDPA, mean, ...) becomes a float island: ``QAct`` around the module,
   or around a :class:`~qat.quant.layers.functional.FunctionalOp` for a function call.
3. Requantization: an integer op input that is on no grid (a parameter such as a class token
   or position embedding, a second model input) gets a ``QAct(Identity)`` quantizer on that
   edge. The model input is quantized by the ``input_quant`` pre-hook, as in a module swap.

New modules are named after the module whose forward wrote the op and the op
(``layer1.0.add``, ``blocks.0.attn.softmax``), so per-layer overrides can match them.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import fx, nn

from qat.ops import Add, Cat
from qat.quant.graph_fuse import fuse_layers
from qat.quant.graph_ops import (
    ADD_FUNCTIONS,
    ADD_METHODS,
    CAT_FUNCTIONS,
    MATMUL_FUNCTIONS,
    MATMUL_METHODS,
    RELU_FUNCTIONS,
    RELU_METHODS,
    cat_args,
    input_dependent,
    is_float,
    only_divisor,
    only_max_pooled,
    only_user,
    route_casts,
    single_tensor,
    target_name,
)
from qat.quant.graph_weights import computed_convs, conv2d_call, replace_computed_conv
from qat.quant.grids import GRID_PRESERVING
from qat.quant.layers import (
    FloatLayer,
    QAct,
    QAdd,
    QCat,
    QComputedConv2d,
    QConv2d,
    QConvBn2d,
    QLinear,
    QMatMul,
)
from qat.quant.layers.functional import (
    GRID_PRESERVING_FUNCTIONS,
    GRID_PRESERVING_METHODS,
    SLOT,
    FunctionalOp,
)
from qat.quant.layers.resize import SeparableResize, is_separable_resize
from qat.quant.module_swap import (
    DEFAULT_TYPE_MAP,
    from_float_named,
    has_weight_spec,
    quantized_type,
)
from qat.quant.overrides import LayerSpecs, check_overrides
from qat.quant.quantizer import FakeQuantizer
from qat.quant.spec import QuantSpec, Recipe

__all__ = ["rewrite_graph"]

_INTEGER_LAYERS = (QConv2d, QConvBn2d, QLinear, QAdd, QCat, QMatMul)


class _Rewriter:
    """Edits the graph, and the model's own module tree (new and swapped modules go there)."""

    def __init__(
        self,
        model: nn.Module,
        graph: fx.Graph,
        recipe: Recipe,
        type_map: Mapping[type[nn.Module], type[nn.Module]],
        input_quantized: bool,
    ) -> None:
        self.root, self.graph, self.recipe = model, graph, recipe
        self.mapping = {**DEFAULT_TYPE_MAP, **type_map}
        self.modules = dict(model.named_modules())
        self.input_quantized = input_quantized
        self.names = set(self.modules)
        self.new: dict[fx.Node, str] = {}  # nodes whose module this rewrite made
        # Weighted layers swapped at their first call: (float module, quantized type, skip).
        self.weighted: dict[str, tuple[nn.Module, type, bool]] = {}
        self.live = input_dependent(graph, self.is_float)
        # F.conv2d calls whose weight a conv module computes (weight standardization): the
        # call → (that module's name, the weight's computation as a graph of its own).
        self.computed = computed_convs(graph, self.modules, self.live)
        self.computed_owners = {owner for owner, _ in self.computed.values()}
        self.specs = LayerSpecs(recipe, self._weighted_names())

    # ------------------------------------------------------------------ node queries
    def module(self, node: Any) -> nn.Module | None:
        if isinstance(node, fx.Node) and node.op == "call_module":
            return self.root.get_submodule(node.target)
        return None

    def is_relu(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return type(self.module(node)) is nn.ReLU
        if node.op == "call_function":
            return node.target in RELU_FUNCTIONS
        return node.op == "call_method" and node.target in RELU_METHODS

    is_float = staticmethod(is_float)
    single_tensor = staticmethod(single_tensor)

    def grid_preserving(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return type(self.module(node)) in GRID_PRESERVING
        if node.op == "call_function":
            return node.target in GRID_PRESERVING_FUNCTIONS
        return node.op == "call_method" and node.target in GRID_PRESERVING_METHODS

    def on_grid(self, node: Any) -> bool:
        if not isinstance(node, fx.Node):
            return False
        if node.op == "placeholder":
            first = next(n for n in self.graph.nodes if n.op == "placeholder")
            return node is first and self.input_quantized
        mod = self.module(node)
        if isinstance(mod, FakeQuantizer):
            return mod.enabled
        if mod is not None and hasattr(mod, "output_quant"):
            return mod.output_quant.enabled
        if self.grid_preserving(node):
            tensors = [a for a in node.all_input_nodes if self.is_float(a)]
            return bool(tensors) and self.on_grid(tensors[0])
        return False

    def _weighted_names(self) -> list[str]:
        names: list[str] = []
        for node in self.graph.nodes:
            if node in self.computed:
                names.append(self.computed[node][0])
                continue
            mod = self.module(node)
            weighted = has_weight_spec(mod) and not isinstance(mod, nn.Embedding)
            if weighted and node.target not in names:
                names.append(node.target)
        return names

    # ------------------------------------------------------------------ graph edits
    def fresh_name(self, node: fx.Node, base: str) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        scope = next(reversed(stack.values()))[0] if stack else ""
        if node.op == "call_module":
            scope = node.target.rpartition(".")[0]
        if scope in self.computed_owners:
            # Not inside a conv that becomes a QComputedConv2d (a StdConv2dSame's padding):
            # the integer layer that replaces it at export has no children.
            scope = scope.rpartition(".")[0]
        parent = self.root.get_submodule(scope)
        stem = f"{scope}.{base}" if scope else base
        name, i = stem, 1
        # Not a name the model already uses, for a module or any other attribute.
        while name in self.names or hasattr(parent, name.rpartition(".")[2]):
            name, i = f"{stem}_{i}", i + 1
        self.names.add(name)
        return name

    def install(self, name: str, module: nn.Module) -> None:
        param = next(self.root.parameters(), None)
        if param is not None:
            module = module.to(param.device)
        self._set(name, module)

    def replace_with_module(
        self, node: fx.Node, name: str, module: nn.Module, args: tuple, kwargs: dict | None = None
    ) -> fx.Node:
        self.install(name, module)
        with self.graph.inserting_after(node):
            new = self.graph.create_node("call_module", name, args, kwargs or {})
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)
        self.new[new] = name
        return new

    # ------------------------------------------------------------------ passes
    def fuse(self) -> None:
        """Conv → BN (→ ReLU), conv / linear → ReLU, wherever the modules live."""
        fuse_layers(self)

    def swap(self) -> None:
        """Quantize every remaining op (see the module docstring, step 2)."""
        wrapped_calls: dict[str, tuple[nn.Module, int]] = {}
        for node in list(self.graph.nodes):
            if node in self.new or node.op not in ("call_module", "call_function", "call_method"):
                continue
            mod = self.module(node)
            if node in self.computed and not self.specs(self.computed[node][0])[2]:
                self._swap_computed_conv(node)
                continue
            if node not in self.live and not isinstance(mod, nn.Embedding):
                # Computed from constants alone (buffers, parameters, shapes: positional
                # encodings, normalization statistics, SwinV2's position-bias MLP): the same
                # for every input, so it stays float, as exact as the model wrote it. An 8-bit
                # grid would round small values to zero (CSATv2's ``var ** 0.5 + 1e-8`` and
                # EdgeNeXt's Fourier ``dim_t`` then divided by 0). Where an integer op reads
                # the result, requantize() puts it on a grid. Embeddings of positions are
                # quantized: the recipe's ``embedding`` spec says so, and the files store them.
                continue
            if mod is not None:
                self._swap_module(node, mod, wrapped_calls)
            elif self._is_add(node):
                self._swap_add(node)
            elif self._is_matmul(node):
                name = self.fresh_name(node, "matmul")
                self.replace_with_module(node, name, QMatMul(self.specs(name)[1]), tuple(node.args))
            elif node.op == "call_function" and node.target in CAT_FUNCTIONS:
                tensors, dim = cat_args(node)
                name = self.fresh_name(node, "cat")
                self.replace_with_module(node, name, QCat(dim, self.specs(name)[1]), (tensors,))
            elif (
                not self.grid_preserving(node) and self.is_float(node) and self.single_tensor(node)
            ):
                self._float_island(node)

    def _set(self, name: str, module: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(self.root.get_submodule(parent) if parent else self.root, child, module)
        self.modules[name] = module

    def _swap_module(
        self, node: fx.Node, mod: nn.Module, wrapped: dict[str, tuple[nn.Module, int]]
    ) -> None:
        """``wrapped``: per float island made here, the float module and its calls so far."""
        if node.target in self.weighted:
            self._call_site_twin(node)
            return
        if node.target in wrapped:
            mod = wrapped[node.target][0]  # called again (CoaT's shared Mlp): the float module
        elif isinstance(mod, FakeQuantizer | FloatLayer) or type(mod) in GRID_PRESERVING:
            return
        elif hasattr(mod, "output_quant") or hasattr(mod, "weight_quant"):
            return  # quantized before this rewrite
        embedding = isinstance(mod, nn.Embedding)
        weight, activation, skip = self.specs(node.target, embedding=embedding)
        qcls = quantized_type(mod, self.mapping, self.recipe)
        if isinstance(mod, Add | Cat) and qcls is not None:
            self._set(node.target, qcls.from_float(mod, activation))
            self.new[node] = node.target
            return
        if qcls is not None and isinstance(getattr(mod, "weight", None), nn.Parameter):
            new: nn.Module = (
                FloatLayer(mod, activation)
                if skip
                else from_float_named(qcls, node.target, mod, weight, activation)
            )
            self._set(node.target, new)
            self.new[node] = node.target
            self.weighted[node.target] = (mod, qcls, skip)
            return
        if not self.is_float(node):
            return
        # A float island; each call of a module called twice gets its own output quantizer.
        count = wrapped.get(node.target, (mod, 0))[1]
        wrapped[node.target] = (mod, count + 1)
        inner = (
            mod if count == 0 or next(mod.parameters(), None) is not None else copy.deepcopy(mod)
        )
        name = node.target if count == 0 else self.fresh_name(node, node.target.rpartition(".")[2])
        activation, skip = self.island_spec(node, name)
        if not self.single_tensor(node):
            # A tuple (an LSTM's output and state): the island runs on dequantized inputs (the
            # integer runtimes' LSTM has no quantized kernel), its items stay float and are
            # requantized where an integer op reads them.
            activation = dataclasses.replace(activation, bits=32)
        island = qcls or QAct
        new = FloatLayer(inner, activation) if skip else island.from_float(inner, activation)
        if count == 0:
            self._set(name, new)
            self.new[node] = name
        else:
            self.replace_with_module(node, name, new, node.args, node.kwargs)

    def _swap_computed_conv(self, node: fx.Node) -> None:
        """The conv module whose forward computed this call's weight becomes a
        :class:`QComputedConv2d` under its own name, called on the input."""
        owner, weight_graph = self.computed[node]
        x, conv = conv2d_call(node, self.modules[owner])
        weight, activation, _ = self.specs(owner)
        self._set(
            owner, QComputedConv2d(self.modules[owner], weight_graph, conv, weight, activation)
        )
        self.new[replace_computed_conv(node, owner, x)] = owner

    def _call_site_twin(self, node: fx.Node) -> None:
        """Another call of a weighted layer gets its own layer: the same weight and bias
        Parameters and weight quantizer (one set of weights, trained once), its own output
        quantizer. Each call then has its own input and output grid, as the integer runtimes
        need (one input scale per integer layer; CoaT calls one conv on differently
        quantized tensors)."""
        first = self.modules[node.target]
        mod, qcls, skip = self.weighted[node.target]
        weight, activation, _ = self.specs(node.target)
        name = self.fresh_name(node, node.target.rpartition(".")[2])
        if skip:
            twin: nn.Module = FloatLayer(mod, activation)
        else:
            twin = from_float_named(qcls, node.target, mod, weight, activation)
            for attr in ("weight", "bias"):
                if isinstance(getattr(first, attr, None), nn.Parameter):
                    setattr(twin, attr, getattr(first, attr))
            twin.weight_quant = first.weight_quant
        self.replace_with_module(node, name, twin, node.args, node.kwargs)

    def _is_add(self, node: fx.Node) -> bool:
        add = (node.op == "call_function" and node.target in ADD_FUNCTIONS) or (
            node.op == "call_method" and node.target in ADD_METHODS
        )
        if not add or len(node.args) != 2 or set(node.kwargs) - {"alpha"}:
            return False
        if node.kwargs.get("alpha", 1) != 1:
            return False
        return all(isinstance(a, fx.Node) and self.is_float(a) for a in node.args)

    def _is_matmul(self, node: fx.Node) -> bool:
        matmul = (node.op == "call_function" and node.target in MATMUL_FUNCTIONS) or (
            node.op == "call_method" and node.target in MATMUL_METHODS
        )
        return (
            matmul
            and len(node.args) == 2
            and not node.kwargs
            and all(isinstance(a, fx.Node) and self.is_float(a) for a in node.args)
        )

    def _swap_add(self, node: fx.Node) -> None:
        user = only_user(node)
        relu = user is not None and self.is_relu(user)
        name = self.fresh_name(node, "add")
        new = self.replace_with_module(
            node, name, QAdd(relu, self.specs(name)[1]), tuple(node.args)
        )
        if relu:
            user.replace_all_uses_with(new)
            self.graph.erase_node(user)

    def _float_island(self, node: fx.Node) -> None:
        values: list[fx.Node] = []

        def slot(arg: Any) -> Any:
            if isinstance(arg, fx.Node):
                values.append(arg)
                return SLOT
            if isinstance(arg, tuple | list):
                return type(arg)(slot(a) for a in arg)
            if isinstance(arg, dict):
                return {k: slot(v) for k, v in arg.items()}
            return arg

        args, kwargs = slot(node.args), slot(dict(node.kwargs))
        op: nn.Module = FunctionalOp(node.target, args, kwargs)
        if is_separable_resize(op):
            op = SeparableResize(op)  # the same bits in torch and every runtime
        name = self.fresh_name(node, target_name(node))
        activation, skip = self.island_spec(node, name)
        new = FloatLayer(op, activation) if skip else QAct(op, activation)
        self.replace_with_module(node, name, new, tuple(values))

    def island_spec(self, node: fx.Node, name: str) -> tuple[QuantSpec, bool]:
        """The output spec of the float island ``name`` made from ``node``, and whether to skip.

        A divisor feeds only the float division after it: it stays float. On a grid, a
        normalizer near zero (EfficientViT's linear attention ``out / (den + eps)``, where a
        ReLU kernel zeroes ``den``) rounds to 0 and the division returns inf or NaN. So does a
        ``-inf`` padding read only by a max-pool (timm's ``MaxPool2dSame``): no grid holds it.
        """
        _, activation, skip = self.specs(name)
        if activation.enabled and (only_divisor(node) or only_max_pooled(node)):
            activation = dataclasses.replace(activation, bits=32)
        return activation, skip

    def requantize(self) -> None:
        """Put every integer op's float inputs on a grid (see the module docstring, step 3)."""
        requants: dict[fx.Node, fx.Node] = {}
        for node in list(self.graph.nodes):
            mod = self.module(node)
            if not isinstance(mod, _INTEGER_LAYERS) or isinstance(mod, FloatLayer):
                continue
            if isinstance(mod, QConv2d | QConvBn2d | QLinear) and not mod.weight_quant.enabled:
                continue  # float weights: a float island, which reads any float tensor

            def on_grid_input(arg: Any, user: fx.Node = node) -> Any:
                if not isinstance(arg, fx.Node) or not self.is_float(arg) or self.on_grid(arg):
                    return arg
                spec = self.recipe.activation
                if not spec.enabled or spec.dynamic != "none":
                    return arg  # float or dynamic activations: no static grid to put it on
                if arg not in requants:
                    name = self.fresh_name(user, "requant")
                    self.install(name, QAct(nn.Identity(), self.specs(name)[1]))
                    with self.graph.inserting_after(arg):
                        requants[arg] = self.graph.create_node("call_module", name, (arg,))
                    self.new[requants[arg]] = name
                return requants[arg]

            node.args = fx.node.map_arg(node.args, on_grid_input)

    def quantized_names(self) -> list[str]:
        """The quantized layers' names, in execution order."""
        made = set(self.new.values())
        names = [n.target for n in self.graph.nodes if n.op == "call_module" and n.target in made]
        return list(dict.fromkeys(names))


def rewrite_graph(
    model: nn.Module,
    graph: fx.Graph,
    recipe: Recipe,
    type_map: Mapping[type[nn.Module], type[nn.Module]],
    extra_names: list[str],
    input_quantized: bool,
) -> None:
    """Rewrite ``graph`` (captured from ``model``) and ``model``'s modules in place.

    Raises:
        ValueError: an override pattern matches none of the quantized layers (nor
            ``extra_names``).
    """
    rw = _Rewriter(model, graph, recipe, type_map, input_quantized)
    rw.fuse()
    rw.swap()
    rw.requantize()
    route_casts(graph, rw.is_float)
    check_overrides(recipe, rw.quantized_names() + extra_names, rw.specs)
