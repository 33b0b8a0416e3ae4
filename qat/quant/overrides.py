"""Per-layer overrides: which specs a layer gets, by name pattern or by its place in the model.

A :class:`qat.LayerOverride` pattern is an ``fnmatch`` pattern over quantized-layer names
(``stem.0``, ``layer1.*``, ``input_quant``) or one of two places, so that one recipe fits any
model:

- ``@first``: the first conv / linear layer (in execution order when the graph was captured,
  else in definition order), where the model input enters;
- ``@last``: the last conv / linear layer, the classifier whose output is the model's output.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Sequence

from qat.quant.spec import QuantSpec, Recipe

__all__ = ["PLACES", "LayerSpecs", "check_overrides"]

#: Patterns naming a layer by its place rather than its name.
PLACES = ("@first", "@last")


class LayerSpecs:
    """``(weight spec, activation spec, skip)`` of each layer under a recipe's overrides.

    Args:
        recipe: the recipe.
        weighted: the model's conv / linear layer names in order (for ``@first`` / ``@last``).
    """

    def __init__(self, recipe: Recipe, weighted: Sequence[str]) -> None:
        self.recipe = recipe
        self.places = {"@first": weighted[0], "@last": weighted[-1]} if weighted else {}

    def matches(self, name: str, pattern: str) -> bool:
        if pattern in PLACES:
            return self.places.get(pattern) == name
        return fnmatch.fnmatchcase(name, pattern)

    def __call__(self, name: str, embedding: bool = False) -> tuple[QuantSpec, QuantSpec, bool]:
        """The specs of layer ``name``; with ``embedding``, its weight spec starts from the
        recipe's ``embedding`` spec instead of ``weight``."""
        weight = self.recipe.embedding if embedding else self.recipe.weight
        activation, skip = self.recipe.activation, False
        for ov in self.recipe.overrides:
            if self.matches(name, ov.pattern):
                if ov.weight:
                    weight = QuantSpec.from_dict(ov.weight, base=weight)
                if ov.activation:
                    activation = QuantSpec.from_dict(ov.activation, base=activation)
                skip = skip or ov.skip
        return weight, activation, skip


def check_overrides(recipe: Recipe, names: Sequence[str], specs: LayerSpecs) -> None:
    """Raise ``ValueError`` for an override whose pattern matches none of ``names``."""
    for i, ov in enumerate(recipe.overrides):
        if any(specs.matches(n, ov.pattern) for n in names):
            continue
        shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        close = difflib.get_close_matches(ov.pattern, names, n=3)
        hint = f" (closest: {', '.join(close)})" if close else ""
        raise ValueError(
            f"overrides[{i}].pattern={ov.pattern!r} matches no quantizable layer{hint}; "
            f"layer names are: {shown} (or {', '.join(PLACES)})"
        )
