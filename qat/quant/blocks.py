"""Per-group (block) quantization: group views of a weight, and GGUF's Q8_0 / Q4_0 grids.

A group quantizer is a per-channel quantizer on a view of the tensor: a weight ``(out, in)``
with groups of ``g`` along ``in`` is viewed as ``(out · in/g, g)``, one "channel" per group, so
the per-channel observers, kernels and LSQ of :class:`~qat.quant.quantizer.FakeQuantizer` serve
groups unchanged (:func:`group_view` / :func:`ungroup`).

GGUF's block grids, written from ggml's reference quantizers (``ggml-quants.c``; the Python
``gguf.quants`` reproduces them bit for bit, and ``tests/quant`` checks these against it):

- ``Q8_0``: per block of 32, ``d = amax / 127``, codes ``roundf(x · (1/d))`` (round half away
  from zero), values ``codes · fp16(d)``;
- ``Q4_0``: per block of 32, ``d = m / −8`` with ``m`` the block's element of largest magnitude
  (the first one on ties, sign kept), codes ``trunc(x · (1/d) + 8.5)`` clipped to ``[0, 15]``,
  values ``(codes − 8) · fp16(d)``; the extreme element lands on −8 exactly.

The codes are computed with the float32 ``d``, the values with its fp16 rounding, which is what
a GGUF file stores: so the dequantized tensors of the file are these values exactly. Every step
is a separate float32 op (no fused multiply-add), as in numpy.
"""

from __future__ import annotations

import torch

#: ggml's block length for Q8_0 / Q4_0.
GGUF_BLOCK = 32


def group_view(x: torch.Tensor, group_size: int, in_axis: int) -> torch.Tensor:
    """``x`` (2-D) as ``(rows · groups, group_size)``, groups running along ``in_axis``.

    Raises:
        ValueError: ``x`` is not 2-D or ``group_size`` does not divide its ``in_axis`` size.
    """
    if x.dim() != 2:
        raise ValueError(
            f"group_size={group_size} applies to 2-D (linear / embedding) weights, got shape "
            f"{tuple(x.shape)}: set group_size=0 for this layer with an override"
        )
    if x.shape[in_axis] % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide the input size {x.shape[in_axis]} of a "
            f"weight {tuple(x.shape)}: choose a group size that divides it"
        )
    rows = x if in_axis == 1 else x.t()
    return rows.reshape(-1, group_size)


def ungroup(view: torch.Tensor, shape: torch.Size, in_axis: int) -> torch.Tensor:
    """The inverse of :func:`group_view`."""
    if in_axis == 1:
        return view.reshape(shape)
    return view.reshape(shape[1], shape[0]).t()


def round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C's ``roundf`` as ``gguf.quants.np_roundf`` computes it (exact in float32)."""
    a = v.abs()
    floored = torch.floor(a)
    return torch.sign(v) * (floored + torch.floor(2 * (a - floored)))


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def gguf_scale(
    blocks: torch.Tensor, grid: str, q8_max: float | torch.Tensor = 127.0
) -> torch.Tensor:
    """The float32 ``d`` of each row of ``blocks`` ``(N, 32)`` on ``grid`` (``q8_0``/``q4_0``).

    ``q8_max``: Q8_0's 127, as a number or a 0-dim float32 tensor (which compiled code must
    use: Inductor turns a division by a constant into a multiplication by its reciprocal).
    """
    blocks = blocks.detach().float()
    if grid == "q8_0":
        return blocks.abs().amax(dim=1) / q8_max
    if grid == "q4_0":
        imax = blocks.abs().argmax(dim=1, keepdim=True)  # first maximal index, as numpy's
        return torch.gather(blocks, 1, imax).squeeze(1) / -8
    raise ValueError(f"grid={grid!r} is not a GGUF grid: allowed: q8_0, q4_0")


def gguf_codes(blocks: torch.Tensor, d: torch.Tensor, grid: str) -> torch.Tensor:
    """Signed integer codes (float tensor) of ``blocks`` with the float32 scales ``d``."""
    scaled = blocks * _inverse(d.float())[:, None]
    if grid == "q8_0":
        return round_half_away(scaled).clamp(-127, 127)
    return torch.trunc(scaled + 8.5).clamp(0, 15) - 8


def fp16_scale(d: torch.Tensor) -> torch.Tensor:
    """``d`` as a GGUF file stores it (fp16), back in float32."""
    return d.float().half().float()


class _GGUFFakeQuantize(torch.autograd.Function):
    """Values on a GGUF grid with a straight-through gradient (0 where a code was clipped)."""

    @staticmethod
    def forward(ctx, blocks, d, grid):  # type: ignore[override]
        codes = gguf_codes(blocks.detach(), d, grid)
        lo, hi = (-127.0, 127.0) if grid == "q8_0" else (-8.0, 7.0)
        scaled = blocks.detach() * _inverse(d.float())[:, None]
        inside = (scaled >= lo - 0.5) & (scaled <= hi + 0.5)
        ctx.save_for_backward(inside.to(blocks.dtype))
        return codes * fp16_scale(d)[:, None]

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None


def gguf_fake_quantize(blocks: torch.Tensor, d: torch.Tensor, grid: str) -> torch.Tensor:
    """``blocks`` ``(N, 32)`` on ``grid`` with the float32 scales ``d`` ``(N,)``, with an STE."""
    return _GGUFFakeQuantize.apply(blocks, d.detach(), grid)


def gguf_quantize_reference(x: torch.Tensor, grid: str) -> torch.Tensor:
    """``x`` (rows a multiple of 32 long) through the GGUF grid: quantize, then dequantize.

    What ``gguf.quants.dequantize(gguf.quants.quantize(x, Q8_0 / Q4_0))`` returns; ggml's
    llama.cpp runs activations of Q4_0 / Q8_0 matmuls through Q8_0 this way.
    """
    return gguf_round_trip(x.reshape(-1, GGUF_BLOCK).float(), grid).reshape(x.shape)


def gguf_round_trip(
    blocks: torch.Tensor, grid: str, q8_max: float | torch.Tensor = 127.0
) -> torch.Tensor:
    """Float32 ``blocks`` ``(N, 32)`` quantized on ``grid`` and dequantized (``q8_max``: see
    :func:`gguf_scale`)."""
    d = gguf_scale(blocks, grid, q8_max)
    return gguf_codes(blocks, d, grid) * fp16_scale(d)[:, None]
