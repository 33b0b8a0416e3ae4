"""``quant`` → :class:`qat.Recipe`, with errors worded by the config key at fault."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from qat.lit.errors import ConfigError
from qat.quant.spec import (
    FLOAT_BITS,
    QUANT_BITS,
    QuantSpec,
    Recipe,
    default_activation_spec,
    default_embedding_spec,
    default_weight_spec,
)

__all__ = ["QUANT_KEYS", "build_recipe", "container"]

#: Keys of the ``quant`` group that are not Recipe fields (``auto`` / ``budget``: quant=auto's,
#: read by qat/lit/quant_auto.py).
QUANT_KEYS = ("enabled", "bits", "name", "auto", "budget")


def container(node: Any) -> Any:
    """An OmegaConf node as plain data (other values as they are)."""
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def build_recipe(quant: Any) -> Recipe | None:
    """The :class:`qat.Recipe` of a ``quant`` config group (None when ``enabled: false``).

    ``quant.bits`` is the sweep shortcut (the presets interpolate it into the weight and/or
    activation bits); it is checked first so ``quant.bits=1`` fails with its own name.
    """
    if quant is None:
        return None
    data = container(quant)
    if not isinstance(data, dict):
        raise ConfigError(f"quant must be a mapping (a quant preset), got {data!r}")
    if not data.get("enabled", True):
        return None
    bits = data.get("bits")
    if bits is not None and (
        isinstance(bits, bool) or not isinstance(bits, int) or bits not in QUANT_BITS + FLOAT_BITS
    ):
        raise ConfigError(
            f"quant.bits={bits!r} is invalid: allowed 2–8 (integer grid) or 16/32 (keep float), "
            "e.g. quant.bits=4; for a float run use quant=float"
        )
    fields = {k: v for k, v in data.items() if k not in QUANT_KEYS}
    try:
        return Recipe.from_dict(fields)
    except ValueError as err:
        raise _recipe_error(fields, err) from None


def _renamed(message: str, key: str) -> str:
    # The dataclasses name themselves ("QuantSpec.bits=12"); the user typed a config key.
    return re.sub(r"\b(QuantSpec|Recipe)\b", key, message)


def _recipe_error(fields: dict[str, Any], err: ValueError) -> ConfigError:
    """``err`` from ``Recipe.from_dict(fields)``, re-worded with the config key at fault.

    The recipe is rebuilt piece by piece (specs, then the recipe without overrides, then one
    override more at a time) to find which key the error belongs to.
    """
    specs = (
        ("weight", default_weight_spec),
        ("activation", default_activation_spec),
        ("embedding", default_embedding_spec),
    )
    for role, base in specs:
        value = fields.get(role)
        if value is None:
            continue
        if not isinstance(value, Mapping):
            return ConfigError(
                f"quant.{role}={value!r} is invalid: expected a mapping of QuantSpec fields"
            )
        try:
            QuantSpec.from_dict(value, base=base())
        except ValueError as spec_err:
            return ConfigError(_renamed(str(spec_err), f"quant.{role}"))
    head = {k: v for k, v in fields.items() if k != "overrides"}
    try:
        Recipe.from_dict(head)
    except ValueError as head_err:
        return ConfigError(_renamed(str(head_err), "quant"))
    overrides = fields.get("overrides")
    if isinstance(overrides, list):
        for i, ov in enumerate(overrides):
            key = f"quant.overrides[{i}]"
            for role in ("weight", "activation"):
                value = ov.get(role) if isinstance(ov, Mapping) else None
                if isinstance(value, Mapping):
                    try:
                        QuantSpec.from_dict(value)
                    except ValueError as spec_err:
                        return ConfigError(_renamed(str(spec_err), f"{key}.{role}"))
            try:
                Recipe.from_dict({**head, "overrides": overrides[: i + 1]})
            except ValueError as ov_err:
                message = re.sub(r"\bLayerOverride\b", key, str(ov_err))
                message = re.sub(r"\bRecipe\b", "quant", message)
                return ConfigError(message if message.startswith(key) else f"{key}: {message}")
    return ConfigError(f"quant: {err}")
