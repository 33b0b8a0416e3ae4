"""Module swap: quantize a model by replacing its modules, without tracing its forward.

The fallback of :func:`qat.prepare` when graph capture fails (data-dependent control flow), and
what ``capture="modules"`` asks for. It walks ``named_modules()``, fuses Conv2d→BatchNorm2d
(→ReLU) (and Conv/Linear→ReLU) where they are adjacent children of an ``nn.Sequential`` or
named in ``recipe.fuse``, and swaps every module whose exact type is in the type map for its
quantized counterpart. The model's own ``forward`` is untouched, so control flow, several inputs
and keyword arguments keep working; but a residual add written inline (``a + b``) is invisible
to a module swap: write it through :class:`qat.ops.Add` / :class:`qat.ops.Cat` to quantize it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from qat.ops import Add, Cat
from qat.quant.layers import (
    FloatLayer,
    QAct,
    QAdd,
    QCat,
    QConv1D,
    QConv2d,
    QConvBn2d,
    QEmbedding,
    QLinear,
    is_hf_conv1d,
)
from qat.quant.overrides import LayerSpecs, check_overrides
from qat.quant.spec import Recipe

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


def quantized_type(
    module: nn.Module, mapping: Mapping[type[nn.Module], type[nn.Module]], recipe: Recipe
) -> type[nn.Module] | None:
    """The quantized type for ``module``: by exact type in ``mapping``; Hugging Face's
    ``Conv1D`` by duck typing; ``nn.Embedding`` when the recipe quantizes embeddings."""
    qcls = mapping.get(type(module))
    if qcls is not None:
        return qcls
    if is_hf_conv1d(module):
        return QConv1D
    # Subclasses too (Gemma's scaled embedding): QEmbedding.from_float keeps their forward.
    quantized = hasattr(module, "weight_quant")
    if isinstance(module, nn.Embedding) and not quantized and recipe.embedding.enabled:
        return QEmbedding
    return None


def has_weight_spec(module: nn.Module) -> bool:
    """Layers whose ``from_float`` takes a weight spec (conv, linear, Conv1D, embedding)."""
    return isinstance(module, nn.Conv2d | nn.Linear | nn.Embedding) or is_hf_conv1d(module)


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


def swap_modules(
    model: nn.Module,
    recipe: Recipe,
    type_map: Mapping[type[nn.Module], type[nn.Module]],
    extra_names: list[str],
) -> nn.Module:
    """Fuse and swap ``model``'s modules in place (see the module docstring).

    ``extra_names`` are further quantizer names overrides may match (``input_quant``); a
    pattern that matches no layer raises ``ValueError`` before anything is changed.
    """
    mapping = {**DEFAULT_TYPE_MAP, **type_map}
    groups = _fusion_groups(model, recipe)
    fused_members = {n for g in groups for n in g[1:]}
    candidates = [
        name
        for name, m in model.named_modules()
        if name and quantized_type(m, mapping, recipe) is not None and name not in fused_members
    ]
    weighted = [
        n
        for n in candidates
        if has_weight_spec(m := model.get_submodule(n)) and not isinstance(m, nn.Embedding)
    ]
    specs = LayerSpecs(recipe, weighted)
    check_overrides(recipe, candidates + extra_names, specs)
    modules = dict(model.named_modules())
    for group in groups:
        head = modules[group[0]]
        kinds = [type(modules[n]) for n in group]
        weight, activation, skip = specs(group[0])
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
        weight, activation, skip = specs(name, embedding=isinstance(module, nn.Embedding))
        if skip:
            new: nn.Module = FloatLayer(module, activation)
        else:
            qcls = quantized_type(module, mapping, recipe)
            if has_weight_spec(module):
                new = from_float_named(qcls, name, module, weight, activation)
            else:
                new = qcls.from_float(module, activation)
        set_module(model, name, new)
    return model


def from_float_named(
    qcls: type, name: str, module: nn.Module, weight: Any, activation: Any
) -> nn.Module:
    """``qcls.from_float(module, weight, activation)``; a refusal names the layer."""
    try:
        return qcls.from_float(module, weight, activation)
    except ValueError as err:
        raise ValueError(f"layer {name!r}: {err}") from None
