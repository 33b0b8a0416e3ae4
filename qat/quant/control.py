"""Model-level switches over every fake quantizer: observers, fake quantization, bit widths."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import nn

from qat.quant.quantizer import FakeQuantizer

#: Name of a prepared model's input quantizer (fed by a forward pre-hook).
INPUT_QUANT = "input_quant"


def is_prepared(model: nn.Module) -> bool:
    """True when ``model`` already holds fake quantizers."""
    return any(isinstance(m, FakeQuantizer) for m in model.modules())


def iter_quantizers(
    model: nn.Module, role: str | None = None
) -> Iterator[tuple[str, FakeQuantizer]]:
    """``(name, quantizer)`` for every fake quantizer in ``model`` (optionally of one role)."""
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantizer) and (role is None or module.role == role):
            yield name, module


def set_observers(model: nn.Module, enabled: bool, role: str | None = None) -> None:
    """Switch range observation on or off for every quantizer (of ``role``)."""
    for _, q in iter_quantizers(model, role):
        q.enable_observer(enabled)


def set_fake_quant(model: nn.Module, enabled: bool, role: str | None = None) -> None:
    """Switch fake quantization on or off for every quantizer (of ``role``)."""
    for _, q in iter_quantizers(model, role):
        q.enable_fake_quant(enabled)


def anneal_bits(model: nn.Module, bits: int, role: str | None = None) -> None:
    """Set every quantizer (of ``role``) to ``max(bits, its own target)``.

    Annealing moves the whole model from 8 bits down to the recipe's targets; a layer whose
    target is higher (first / last layer kept at 8 bits) never goes below its target.
    """
    for _, q in iter_quantizers(model, role):
        if q.spec.enabled and q.spec.grid == "affine":  # a GGUF grid has one fixed width
            q.set_bits(max(int(bits), q.spec.bits))


def uninitialized_quantizers(model: nn.Module) -> list[str]:
    """Names of enabled quantizers that never observed data (their range is a placeholder)."""
    return [name for name, q in iter_quantizers(model) if q.enabled and not q.is_initialized]


def quantizer_summary(model: nn.Module) -> list[dict[str, Any]]:
    """One row per quantizer: name, role, bits, mode flags, per-tensor scale summary."""
    rows = []
    for name, q in iter_quantizers(model):
        scale, zp = q.qparams()
        rows.append(
            {
                "name": name,
                "role": q.role,
                "bits": q.bits,
                "observer": bool(q.observer_enabled),
                "fake_quant": bool(q.fake_quant_enabled),
                "initialized": q.is_initialized,
                "scale_min": float(scale.min()),
                "scale_max": float(scale.max()),
                "zero_point": int(zp[0]) if zp.numel() == 1 else None,
            }
        )
    return rows
