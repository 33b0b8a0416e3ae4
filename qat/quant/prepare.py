"""Turn a float model into a fake-quant model: graph capture, or module swap as a fallback.

:func:`prepare` captures the model's forward as a graph (:mod:`qat.quant.graph_capture`) and
rewrites it into quantized layers (:mod:`qat.quant.graph_rewrite`): inline residual adds,
functional activations, concatenations, attention and the like are quantized wherever the
model writes them. Where the forward cannot be captured (data-dependent control flow), it falls
back to a module swap (:mod:`qat.quant.module_swap`), with a warning naming the line that
stopped the capture; ``capture="modules"`` asks for the module swap directly.

The model's input gets an activation quantizer (``input_quant``) through a forward pre-hook:
the first positional tensor argument, or else the first floating tensor keyword argument.
Integer inputs (token ids) are left as they are.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from qat.quant.control import INPUT_QUANT, is_prepared, iter_quantizers
from qat.quant.graph_capture import CaptureError, adopt_graph, capture, is_captured, split_example
from qat.quant.graph_rewrite import rewrite_graph
from qat.quant.module_swap import DEFAULT_TYPE_MAP, set_module, swap_modules
from qat.quant.overrides import LayerSpecs
from qat.quant.quantizer import FakeQuantizer
from qat.quant.spec import Recipe

__all__ = [
    "CAPTURE_MODES",
    "DEFAULT_TYPE_MAP",
    "INPUT_QUANT",
    "prepare",
    "quantize_input_hook",
    "remove_input_quant_hook",
    "set_module",
]

CAPTURE_MODES = ("auto", "graph", "modules")


class _SequentialWithInputQuant(nn.Sequential):
    """An ``nn.Sequential`` root whose ``input_quant`` child is applied by the pre-hook only.

    ``nn.Sequential.forward`` runs every child, so registering the input quantizer on a
    Sequential root would also run it on the output; prepare() switches such a root to this
    subclass (same children, same names, same state_dict).
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        for name, module in self._modules.items():
            if name != INPUT_QUANT:
                input = module(input)
        return input


def quantize_input_hook(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The forward pre-hook that feeds a prepared model's input through ``input_quant``.

    Public so that deploy-time rewrites (the exporters) can find and replace it in
    ``model._forward_pre_hooks``.
    """
    quant = getattr(module, INPUT_QUANT)
    if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
        return (quant(args[0]), *args[1:]), kwargs
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return args, {**kwargs, key: quant(value)}
    return None


def remove_input_quant_hook(model: nn.Module) -> nn.Module:
    """Stop ``model``'s input quantizer from running, for deploy-time rewrites that quantize
    the input themselves: drop the pre-hook (module swap) or make the graph's ``input_quant``
    call an identity (graph capture). Read its qparams first (the exporters read them from the
    model they convert, not from this copy)."""
    for key, hook in list(model._forward_pre_hooks.items()):
        if hook is quantize_input_hook:
            del model._forward_pre_hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)
    if is_captured(model) and isinstance(getattr(model, INPUT_QUANT, None), FakeQuantizer):
        setattr(model, INPUT_QUANT, nn.Identity())
    return model


def prepare(
    model: nn.Module,
    recipe: Recipe | Mapping[str, Any] | None = None,
    *,
    example_inputs: Any = None,
    capture: str = "auto",
    inplace: bool = False,
    type_map: Mapping[type[nn.Module], type[nn.Module]] | None = None,
) -> nn.Module:
    """Return ``model`` with fake-quant layers, as described by ``recipe``.

    Args:
        model: a float model, as its authors wrote it.
        recipe: a :class:`Recipe` or a mapping for :meth:`Recipe.from_dict` (None: W8A8).
        example_inputs: one input batch (a tensor, a tuple of positional arguments or a dict
            of keyword arguments). Graph capture uses it to tell integer inputs from float
            ones, to fix forward arguments it leaves out to their defaults, and to check the
            captured graph computes what the model computes; without it the graph is traced
            from the signature alone.
        capture: ``"auto"`` (graph capture, module swap where capture fails, with a warning),
            ``"graph"`` (capture or raise) or ``"modules"`` (module swap: residual adds /
            concats are quantized only where written through ``qat.ops.Add`` / ``Cat``).
        inplace: module swap only: modify ``model`` itself instead of a deep copy. A captured
            graph is always a new module (sharing nothing with ``model`` unless ``inplace``).
        type_map: extra or replacement ``float type → quantized type`` entries; the quantized
            type needs a ``from_float(module, weight_spec, activation_spec)`` classmethod
            (or ``from_float(module, activation_spec)`` for weightless ops).

    Raises:
        ValueError: the recipe is invalid, an override pattern matches no layer, a fuse group
            is wrong, ``capture`` is unknown, or the model is already prepared.
        qat.quant.graph_capture.CaptureError: ``capture="graph"`` and the forward cannot be
            captured.

    Example:
        >>> qmodel = prepare(model, {"weight": {"bits": 4}, "activation": {"bits": 4},
        ...                          "overrides": [{"pattern": "@last", "weight": {"bits": 8}}]},
        ...                  example_inputs=torch.randn(2, 3, 32, 32))
        >>> calibrate(qmodel, [x for x, _ in loader], num_batches=8)
    """
    recipe = Recipe.from_dict(recipe)
    if capture not in CAPTURE_MODES:
        raise ValueError(f"capture={capture!r} is invalid: allowed: {', '.join(CAPTURE_MODES)}")
    if is_prepared(model):
        raise ValueError("model already holds fake quantizers: prepare() it only once")
    type_map = dict(type_map or {})
    source = model if inplace else copy.deepcopy(model)
    prepared: nn.Module | None = None
    how: dict[str, Any] = {"mode": "modules"}
    # Dynamic activations are quantized where each layer reads them, not at the model input.
    quantize_input = recipe.quantize_input and recipe.activation.dynamic == "none"
    if capture != "modules":
        try:
            gm = capture_graph(source, example_inputs)
            # An integer first input (token ids) is left as it is.
            quantize_input = quantize_input and _first_input_is_float(example_inputs)
            extra = [INPUT_QUANT] if quantize_input else []
            rewrite_graph(source, gm.graph, recipe, type_map, extra, quantize_input)
            if quantize_input:
                # Places (@first / @last) name conv / linear layers, never the input quantizer.
                _install_input_quant(source, LayerSpecs(recipe, [])(INPUT_QUANT), gm.graph)
            prepared = adopt_graph(source, gm.graph)
            how = {"mode": "graph"}
            if gm.qat_specialized:  # branches taken as the example takes them
                how["specialized"] = gm.qat_specialized
        except CaptureError as err:
            if capture == "graph":
                raise
            where = f" at {err.where}" if err.where else ""
            warnings.warn(
                f"qat.prepare: graph capture of {type(model).__name__} stopped{where} ({err}); "
                "quantizing by module swap instead: residual adds and concats written inline "
                "stay in float there, so write them through qat.ops.Add / qat.ops.Cat, or "
                "make that code traceable",
                stacklevel=2,
            )
            how = {"mode": "modules", "capture_error": str(err), "where": err.where}
            source = model if inplace else copy.deepcopy(model)
    if prepared is None:
        extra = [INPUT_QUANT] if quantize_input else []
        prepared = swap_modules(source, recipe, type_map, extra)
        if quantize_input:
            _install_input_quant(prepared, LayerSpecs(recipe, [])(INPUT_QUANT))
    _retie(prepared, _tied_weights(model))
    for qname, quant in iter_quantizers(prepared):
        quant.name = qname
    # Plain data so checkpoints and the exporters can tell how the model was prepared.
    prepared.qat_recipe = recipe.to_dict()
    prepared.qat_capture = how
    return prepared


def _tied_weights(model: nn.Module) -> list[list[str]]:
    """Names of the modules sharing one ``weight`` parameter (a tied embedding and LM head)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is not None:
            owners.setdefault(id(weight), []).append(name)
    return [names for names in owners.values() if len(names) > 1]


def _retie(prepared: nn.Module, groups: list[list[str]]) -> None:
    """Share each tied group's weight again: the quantized layers copied it apart, and a tied
    head trained apart from its embedding is a different model than the one exported."""
    for names in groups:
        try:
            layers = [prepared.get_submodule(n) for n in names]
        except AttributeError:  # a layer the rewrite renamed or folded: nothing to tie
            continue
        layers = [getattr(m, "module", m) for m in layers]  # FloatLayer: the wrapped layer
        for layer in layers[1:]:
            layer.weight = layers[0].weight


def capture_graph(model: nn.Module, example_inputs: Any) -> fx.GraphModule:
    """:func:`~qat.quant.graph_capture.capture`, with dtypes propagated from the example."""
    gm = capture(model, example_inputs)
    if example_inputs is not None:
        args, kwargs = split_example(example_inputs)
        values = _positional(gm, args, kwargs)
        was_training = gm.training
        gm.eval()
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(*values)
        except Exception as err:
            raise CaptureError(f"shape propagation failed: {type(err).__name__}: {err}") from err
        finally:
            gm.train(was_training)
    return gm


def _positional(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[Any]:
    """One value per placeholder of ``gm`` (defaults where the example gives none)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = list(args)
    for node in placeholders[len(args) :]:
        key = node.target
        if key in kwargs:
            values.append(kwargs[key])
        else:
            values.append(node.args[0] if node.args else None)
    return values


def _first_input_is_float(example_inputs: Any) -> bool:
    if example_inputs is None:
        return True
    args, kwargs = split_example(example_inputs)
    first = args[0] if args else next(iter(kwargs.values()), None)
    return isinstance(first, torch.Tensor) and first.is_floating_point()


def _install_input_quant(
    model: nn.Module, specs: tuple[Any, Any, bool], graph: fx.Graph | None = None
) -> None:
    """The input quantizer: a call in the captured ``graph``, else a forward pre-hook."""
    _, activation, skip = specs
    if skip:
        return
    param = next(model.parameters(), None)
    quant = FakeQuantizer(activation, role="activation")
    if param is not None:
        quant = quant.to(param.device)
    setattr(model, INPUT_QUANT, quant)
    if graph is not None:
        first = next(n for n in graph.nodes if n.op == "placeholder")
        with graph.inserting_after(first):
            node = graph.create_node("call_module", INPUT_QUANT, (first,))
        first.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
        return
    if type(model) is nn.Sequential:
        model.__class__ = _SequentialWithInputQuant
    model.register_forward_pre_hook(quantize_input_hook, with_kwargs=True)
