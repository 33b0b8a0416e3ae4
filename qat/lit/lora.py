"""LoRA QAT: low-rank adapters trained through the fake quantizer, merged exactly before export.

Each adapted ``QLinear`` computes with ``Q(W₀ + (α/r)·B·A)``: the frozen base weight plus the
adapter update, fake-quantized together (a ``torch.nn.utils.parametrize`` parametrization of
``weight``, so the layer's own quantizer sees the sum). Only ``A`` and ``B`` (and learned
quantizer ranges) train. Merging (:func:`merge_lora`) writes ``W₀ + (α/r)·B·A`` into ``weight``
with the same float ops, so the merged layer's fake-quant weight, and every exported file, is
bit for bit the trained one.

Why not ``peft``: its adapters add ``B·A·x`` beside the quantized base layer, in float, so the
model trained is not the one a quantized file can store once merged (the merged weight would
be re-quantized). Here the adapter update is inside the quantizer from the first step.

Example:
    >>> names = add_lora(qmodel, rank=8, alpha=16)  # after qat.prepare
    >>> ... train ...
    >>> merge_lora(qmodel)  # before test / export
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from qat.quant.control import iter_quantizers
from qat.quant.layers import QLinear

__all__ = ["LoRADelta", "add_lora", "lora_layers", "merge_lora"]


class LoRADelta(nn.Module):
    """The parametrization ``W ↦ W + scale · B · A`` (``A`` Kaiming-initialised, ``B`` zero, so
    training starts from the base model)."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = float(alpha) / rank

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.lora_B @ self.lora_A).to(weight.dtype)


def lora_layers(model: nn.Module) -> list[str]:
    """Names of the layers that carry an adapter."""
    return [
        name
        for name, m in model.named_modules()
        if parametrize.is_parametrized(m, "weight")
        and any(isinstance(p, LoRADelta) for p in m.parametrizations["weight"])
    ]


def add_lora(
    model: nn.Module,
    rank: int,
    alpha: float = 16.0,
    targets: list[str] | None = None,
) -> list[str]:
    """Put a rank-``rank`` adapter on every quantized linear layer whose name matches one of
    ``targets`` (shell patterns; None: all but the output layer), and freeze everything else
    but learned quantizer ranges.

    Returns:
        The adapted layers' names.

    Raises:
        ValueError: a bad rank, or no layer matches.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora_rank={rank!r} is invalid: an int >= 1 (0: no adapters)")
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, QLinear)]
    if targets:
        chosen = [(n, m) for n, m in linears if any(fnmatch.fnmatch(n, p) for p in targets)]
    else:
        # The output layer (the last linear, lm_head) keeps its weights: LoRA's usual choice.
        chosen = linears[:-1]
    if not chosen:
        raise ValueError(
            f"lora_targets={targets} matches no quantized linear layer (there are "
            f"{len(linears)}, e.g. {', '.join(n for n, _ in linears[:3])})"
        )
    quantizer_params = {id(p) for _, q in iter_quantizers(model) for p in q.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in quantizer_params)
    for _, layer in chosen:
        w = layer.weight
        delta = LoRADelta(w.shape[0], w.shape[1], rank, alpha).to(device=w.device)
        parametrize.register_parametrization(layer, "weight", delta)
    return [n for n, _ in chosen]


@torch.no_grad()
def merge_lora(model: nn.Module) -> list[str]:
    """Write every adapter into its layer's ``weight`` (exactly the weight trained with) and
    remove it; every weight trainable again. Returns the merged layers' names."""
    names = lora_layers(model)
    for name in names:
        parametrize.remove_parametrizations(
            model.get_submodule(name), "weight", leave_parametrized=True
        )
    for p in model.parameters():
        p.requires_grad_(True)
    return names
