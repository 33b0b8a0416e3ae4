"""Turn a float model into a fake-quant model: module swap, no tracing.

:func:`prepare` walks ``named_modules()``, fuses Conv2d→BatchNorm2d(→ReLU) (and Conv/Linear→ReLU)
where they are adjacent children of an ``nn.Sequential`` or named in ``recipe.fuse``, and swaps
every module whose exact type is in the type map for its quantized counterpart, applying the
recipe's per-layer overrides by name pattern. The model's own ``forward`` is untouched, so
control flow, several inputs and keyword arguments keep working. Residual adds and concats are
quantized when the model writes them through :class:`qat.ops.Add` / :class:`qat.ops.Cat`.

The model's input gets an activation quantizer (``input_quant``) through a forward pre-hook:
the first positional tensor argument, or else the first floating tensor keyword argument.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from qat.ops import Add, Cat
from qat.quant.control import is_prepared, iter_quantizers
from qat.quant.layers import FloatLayer, QAct, QAdd, QCat, QConv2d, QConvBn2d, QLinear
from qat.quant.quantizer import FakeQuantizer
from qat.quant.spec import QuantSpec, Recipe

INPUT_QUANT = "input_quant"

#: Float type → quantized type. ``QAct`` wraps ops whose output leaves the input's grid.
DEFAULT_TYPE_MAP: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: QConv2d,
    nn.Linear: QLinear,
    Add: QAdd,
    Cat: QCat,
    nn.AdaptiveAvgPool2d: QAct,
    nn.AvgPool2d: QAct,
    nn.ReLU6: QAct,
    nn.Hardtanh: QAct,
    nn.Hardswish: QAct,
    nn.Hardsigmoid: QAct,
    nn.Sigmoid: QAct,
    nn.SiLU: QAct,
    nn.GELU: QAct,
    nn.Tanh: QAct,
    nn.LeakyReLU: QAct,
}


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (``"layer1.0.conv1"``) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _fusion_groups(model: nn.Module, recipe: Recipe) -> list[tuple[str, ...]]:
    """Conv→BN(→ReLU), Conv→ReLU and Linear→ReLU runs: adjacent Sequential children + recipe.fuse."""
    groups: list[tuple[str, ...]] = []
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        items = list(seq.named_children())
        i = 0
        while i < len(items):
            name, mod = items[i]
            nxt = [type(m) for _, m in items[i + 1 : i + 3]]
            prefix = f"{seq_name}." if seq_name else ""
            group: tuple[str, ...] = ()
            if type(mod) is nn.Conv2d and recipe.fuse_bn and nxt[:1] == [nn.BatchNorm2d]:
                group = tuple(n for n, _ in items[i : i + (3 if nxt[1:2] == [nn.ReLU] else 2)])
            elif type(mod) in (nn.Conv2d, nn.Linear) and nxt[:1] == [nn.ReLU]:
                group = (name, items[i + 1][0])
            if group:
                groups.append(tuple(prefix + n for n in group))
                i += len(group)
            else:
                i += 1
    modules = dict(model.named_modules())
    taken = {n for g in groups for n in g}
    for group in recipe.fuse:
        missing = [n for n in group if n not in modules]
        if missing:
            raise ValueError(f"Recipe.fuse group {list(group)}: no module named {missing}")
        types = [type(modules[n]) for n in group]
        ok = (
            types[0] is nn.Conv2d
            and (types[1:] in ([nn.BatchNorm2d], [nn.BatchNorm2d, nn.ReLU], [nn.ReLU]))
        ) or types == [nn.Linear, nn.ReLU]
        if not ok:
            raise ValueError(
                f"Recipe.fuse group {list(group)} has types {[t.__name__ for t in types]}; "
                "allowed: [Conv2d, BatchNorm2d], [Conv2d, BatchNorm2d, ReLU], [Conv2d, ReLU], "
                "[Linear, ReLU]"
            )
        if not taken.isdisjoint(group):
            continue  # already fused by adjacency
        groups.append(tuple(group))
        taken.update(group)
    return groups


def _specs_for(name: str, recipe: Recipe) -> tuple[QuantSpec, QuantSpec, bool]:
    weight, activation, skip = recipe.weight, recipe.activation, False
    for ov in recipe.overrides:
        if fnmatch.fnmatchcase(name, ov.pattern):
            if ov.weight:
                weight = QuantSpec.from_dict(ov.weight, base=weight)
            if ov.activation:
                activation = QuantSpec.from_dict(ov.activation, base=activation)
            skip = skip or ov.skip
    return weight, activation, skip


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
    """Drop the input-quantizer pre-hook from ``model`` (for deploy-time rewrites that quantize
    the input themselves); ``model.input_quant`` stays, with its trained qparams."""
    for key, hook in list(model._forward_pre_hooks.items()):
        if hook is quantize_input_hook:
            del model._forward_pre_hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)
    return model


def prepare(
    model: nn.Module,
    recipe: Recipe | Mapping[str, Any] | None = None,
    *,
    inplace: bool = False,
    type_map: Mapping[type[nn.Module], type[nn.Module]] | None = None,
) -> nn.Module:
    """Return ``model`` with fake-quant layers, as described by ``recipe``.

    Args:
        model: a float model. Residual adds / concats must go through ``qat.ops.Add`` / ``Cat``
            to be quantized.
        recipe: a :class:`Recipe` or a mapping for :meth:`Recipe.from_dict` (None: W8A8).
        inplace: modify ``model`` itself instead of a deep copy.
        type_map: extra or replacement ``float type → quantized type`` entries; the quantized
            type needs a ``from_float(module, weight_spec, activation_spec)`` classmethod
            (or ``from_float(module, activation_spec)`` for weightless ops).

    Raises:
        ValueError: the recipe is invalid, an override pattern matches no layer, a fuse group
            is wrong, or the model is already prepared.

    Example:
        >>> qmodel = prepare(model, {"weight": {"bits": 4}, "activation": {"bits": 4},
        ...                          "overrides": [{"pattern": "fc", "weight": {"bits": 8}}]})
        >>> calibrate(qmodel, [x for x, _ in loader], num_batches=8)
    """
    recipe = Recipe.from_dict(recipe)
    if is_prepared(model):
        raise ValueError("model already holds fake quantizers: prepare() it only once")
    mapping = {**DEFAULT_TYPE_MAP, **(type_map or {})}
    groups = _fusion_groups(model, recipe)
    fused_members = {n for g in groups for n in g[1:]}
    candidates = [
        name
        for name, m in model.named_modules()
        if name and type(m) in mapping and name not in fused_members
    ]
    names = candidates + ([INPUT_QUANT] if recipe.quantize_input else [])
    for i, ov in enumerate(recipe.overrides):
        if not any(fnmatch.fnmatchcase(n, ov.pattern) for n in names):
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            close = difflib.get_close_matches(ov.pattern, names, n=3)
            hint = f" (closest: {', '.join(close)})" if close else ""
            raise ValueError(
                f"overrides[{i}].pattern={ov.pattern!r} matches no quantizable layer{hint}; "
                f"layer names are: {shown}"
            )

    model = model if inplace else copy.deepcopy(model)
    modules = dict(model.named_modules())
    for group in groups:
        head = modules[group[0]]
        kinds = [type(modules[n]) for n in group]
        weight, activation, skip = _specs_for(group[0], recipe)
        relu = kinds[-1] is nn.ReLU
        if skip:
            float_mods = [modules[n] for n in group]
            set_module(model, group[0], FloatLayer(nn.Sequential(*float_mods), activation))
        elif nn.BatchNorm2d in kinds:
            bn = modules[group[1]]
            set_module(
                model, group[0], QConvBn2d.from_float(head, bn, weight, activation, relu=relu)
            )
        else:
            qcls = QConv2d if isinstance(head, nn.Conv2d) else QLinear
            set_module(model, group[0], qcls.from_float(head, weight, activation, relu=relu))
        for member in group[1:]:
            set_module(model, member, nn.Identity())

    fused_heads = {g[0] for g in groups}
    for name in candidates:
        if name in fused_heads:
            continue
        module = modules[name]
        weight, activation, skip = _specs_for(name, recipe)
        if skip:
            new: nn.Module = FloatLayer(module, activation)
        else:
            qcls = mapping[type(module)]
            if isinstance(module, nn.Conv2d | nn.Linear):
                new = qcls.from_float(module, weight, activation)
            else:
                new = qcls.from_float(module, activation)
        set_module(model, name, new)

    if recipe.quantize_input:
        _, activation, skip = _specs_for(INPUT_QUANT, recipe)
        if not skip:
            param = next(model.parameters(), None)
            quant = FakeQuantizer(activation, role="activation")
            if param is not None:
                quant = quant.to(param.device)
            setattr(model, INPUT_QUANT, quant)
            if type(model) is nn.Sequential:
                model.__class__ = _SequentialWithInputQuant
            model.register_forward_pre_hook(quantize_input_hook, with_kwargs=True)
    for qname, quant in iter_quantizers(model):
        quant.name = qname
    # Plain data so checkpoints and the exporters can tell how the model was prepared.
    model.qat_recipe = recipe.to_dict()
    return model
