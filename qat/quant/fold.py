"""Exact batch-norm folding, as pure functions.

``conv(x, W) + b → BN`` in eval mode equals ``conv(x, W·f) + (β + (b − μ)·f)`` with
``f = γ / sqrt(σ² + ε)``. :class:`qat.QConvBn2d` uses these same functions for its
frozen / eval forward and the exporters use them again, so the folded numbers are bitwise the
ones the fake-quant model ran.
"""

from __future__ import annotations

import torch
from torch import nn


def bn_fold_factor(bn: nn.BatchNorm2d) -> torch.Tensor:
    """Per-channel ``γ / sqrt(running_var + ε)`` (γ = 1 for a BN without affine)."""
    gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
    return gamma / torch.sqrt(bn.running_var + bn.eps)


def fold_bn_params(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn: nn.BatchNorm2d,
    factor: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Folded ``(weight, bias)`` for ``conv(weight, bias) → bn`` with running statistics.

    Args:
        weight: conv weight, output channels on axis 0.
        bias: conv bias or None.
        bn: the BatchNorm that follows the conv.
        factor: a precomputed :func:`bn_fold_factor` (avoids computing it twice).
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("fold_bn_params needs a BatchNorm with running statistics")
    f = bn_fold_factor(bn) if factor is None else factor
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return weight * f.reshape(shape), fold_bn_bias(bias, bn, factor=f)


def fold_bn_bias(
    bias: torch.Tensor | None, bn: nn.BatchNorm2d, factor: torch.Tensor | None = None
) -> torch.Tensor:
    """The folded bias ``β + (b − μ)·f`` alone (see :func:`fold_bn_params`)."""
    f = bn_fold_factor(bn) if factor is None else factor
    beta = bn.bias if bn.affine else torch.zeros_like(f)
    conv_b = bias if bias is not None else torch.zeros_like(f)
    return beta + (conv_b - bn.running_mean) * f


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new float ``Conv2d`` equal to ``conv → bn`` in eval mode (for float baselines/export)."""
    folded = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
    ).to(conv.weight.device)
    with torch.no_grad():
        w, b = fold_bn_params(conv.weight, conv.bias, bn)
        folded.weight.copy_(w)
        folded.bias.copy_(b)
    return folded
