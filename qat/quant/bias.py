"""The int32 bias grid: how integer runtimes add a conv / linear bias, and training on it.

The integer runtimes add a bias as int32 at scale ``s_in · s_w`` (input scale times weight
scale). :func:`bias_levels` is the one rounding onto that grid, shared by the exporters' int32
bias, :func:`qat.snap_bias` (round the trained bias before the test and the export) and
bias-aware training (:func:`grid_bias`: the recipe's ``quantize_bias``, where a layer linked to
its input's quantizer trains with its bias rounded onto that grid, straight-through).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from qat.quant.quantizer import FakeQuantizer

#: Attribute of a quantized conv / linear holding the quantizer of its input, when it trains its
#: bias on the int32 grid (set by :func:`qat.link_bias_quantizers`). In ``__dict__``, not
#: ``setattr``: ``nn.Module`` would register the quantizer as a second parent's submodule, and it
#: would then appear twice in state dicts and module lists.
BIAS_INPUT_QUANT = "bias_input_quant"

#: Range of the int32 bias the integer kernels add.
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def link_input_quantizer(layer: nn.Module, quant: FakeQuantizer | None) -> None:
    """Make ``quant`` (the quantizer of ``layer``'s input) the grid ``layer`` trains its bias on."""
    layer.__dict__[BIAS_INPUT_QUANT] = quant


def linked_input_quantizer(layer: nn.Module) -> FakeQuantizer | None:
    """The quantizer :func:`link_input_quantizer` linked ``layer`` to, or None."""
    return layer.__dict__.get(BIAS_INPUT_QUANT)


def grid_bias(module: nn.Module, b: torch.Tensor | None) -> torch.Tensor | None:
    """``b`` rounded onto the int32 grid ``s_in · s_w`` the integer runtimes add a bias on
    (detached), or None when the layer does not train its bias on that grid.

    It does once :func:`qat.link_bias_quantizers` linked the layer to the quantizer of its
    input and both that and the weight quantizer are on. The scales are read live, so the grid
    follows learned and annealed ranges; the rounding is :func:`bias_levels`, the exporters'
    own, so after :func:`qat.snap_bias` the bias is unchanged by it.
    """
    quant = linked_input_quantizer(module)
    if b is None or quant is None:
        return None
    wq: FakeQuantizer = module.weight_quant
    for q in (quant, wq):
        if not (q.enabled and q.fake_quant_enabled and q.is_initialized):
            return None
    s_in, _ = quant.qparams()
    s_w, _ = wq.qparams()
    levels, scale = bias_levels(b, s_in, s_w)
    return (levels * scale.double()).to(b.dtype)


def bias_levels(
    bias: torch.Tensor, s_in: torch.Tensor | float, s_w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``round(bias / (s_in · s_w))`` as float64 levels, and that per-channel scale in float32
    (as both runtimes form it); detached. The one rounding of the bias that the exporters'
    int32 bias (:func:`int32_bias`), :func:`qat.snap_bias` and bias-aware training share."""
    s_in32 = torch.as_tensor(s_in, dtype=torch.float32, device=s_w.device).reshape(())
    scale = (s_in32 * s_w.float().reshape(-1)).expand(bias.shape[0]).contiguous()
    return torch.round(bias.detach().double() / scale.double()), scale


def int32_bias(
    bias: torch.Tensor, s_in: torch.Tensor | float, s_w: torch.Tensor, layer: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The int32 bias the integer kernels add, and its float32 scale ``s_in · s_w``.

    A bias that does not fit int32 at that scale is clamped, with a warning naming ``layer``.
    """
    levels, scale = bias_levels(bias, s_in, s_w)
    if bool((levels < INT32_MIN).any() or (levels > INT32_MAX).any()):
        warnings.warn(
            f"{layer}: the bias does not fit int32 at scale s_in·s_w and was clamped; "
            "the exported layer will differ from the fake-quant one",
            stacklevel=3,
        )
    return levels.clamp_(INT32_MIN, INT32_MAX).to(torch.int32), scale
