"""Multiply-accumulates per sample of a model's conv / linear layers, from one forward."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from qat.quant.calibrate import _default_forward

__all__ = ["layer_macs"]


def layer_macs(
    model: nn.Module, names: Sequence[str], batch: Any, forward_fn: Any
) -> dict[str, int]:
    """Multiply-accumulates per sample of each named layer, from one forward of ``batch``:
    weight elements × output positions (conv: output pixels; linear: tokens)."""
    macs: dict[str, int] = {}
    hooks = []
    for name in names:
        module = model.get_submodule(name)

        def hook(mod: nn.Module, _inp: Any, out: Any, name: str = name) -> None:
            if isinstance(out, torch.Tensor) and out.dim() >= 1:
                per_sample = out[0].numel() if out.dim() > 1 else out.numel()
                channels = max(int(mod.weight.shape[0]), 1)
                macs[name] = int(mod.weight.numel() * max(per_sample // channels, 1))

        hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            (forward_fn or _default_forward)(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return macs
