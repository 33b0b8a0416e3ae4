"""GGUF's k-quant grids Q4_K and Q6_K: super-blocks of 256 with quantized sub-block scales.

What the file stores, and so what the fake-quant model computes (``gguf.quants.dequantize`` of
a packed block returns these values bit for bit; ``tests/quant/test_kquants.py`` checks it):

- ``Q4_K``: 8 sub-blocks of 32; value ``(d·sc_j)·q − (dmin·m_j)``, ``q ∈ [0, 15]``, 6-bit
  ``sc_j, m_j ∈ [0, 63]``, fp16 ``d, dmin``. Each sub-block's range ``[min(0, lo), hi]`` gives
  its scale ``(hi − lo)/15`` and min ``−lo``; ``d``, ``dmin`` map the largest of them to 63.
- ``Q6_K``: 16 sub-blocks of 16; value ``(d·sc_j)·(q − 32)``, ``q − 32 ∈ [−32, 31]``, int8
  ``sc_j``, fp16 ``d``. Each sub-block's scale maps its element of largest magnitude to −32 (as
  Q4_0 does), ``d`` maps the largest scale to −128.

These are the value sets llama.cpp dequantizes; the choice of scales inside them is ours (simpler
than ``quantize_row_q4_K_ref``'s search), so a file is the trained model, not a re-quantization.
The codes are computed with the fp16 scales the file stores. Gradients pass straight through
where a code was not clipped.
"""

from __future__ import annotations

import torch

from qat.quant.blocks import fp16_scale

__all__ = ["KQUANT_BLOCK", "KQUANT_GRIDS", "kquant_fake_quantize", "kquant_params"]

#: Elements per super-block.
KQUANT_BLOCK = 256
#: grid → (sub-block length, lowest code, highest code) of the signed codes used here.
KQUANT_GRIDS = {"q4_k": (32, 0, 15), "q6_k": (16, -32, 31)}


def _div(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``x / d``, 0 where ``d == 0``."""
    safe = torch.where(d == 0, torch.ones_like(d), d)
    return torch.where(d == 0, torch.zeros_like(x), x / safe)


def _signed_max(x: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude of each row of ``x`` (the first on ties), sign kept."""
    return torch.gather(x, -1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)


@torch.no_grad()
def kquant_params(blocks: torch.Tensor, grid: str) -> dict[str, torch.Tensor]:
    """The stored parameters and codes of ``blocks`` ``(N, 256)`` on ``grid``.

    Returns:
        ``q4_k``: ``d``, ``dmin`` ``(N,)`` (fp16-representable float32), ``sc``, ``m``
        ``(N, 8)`` and codes ``q`` ``(N, 8, 32)`` in ``[0, 15]``; ``q6_k``: ``d``, ``sc``
        ``(N, 16)`` and ``q`` ``(N, 16, 16)`` in ``[−32, 31]``; all float tensors holding
        integers (but ``d`` / ``dmin``), and ``values`` ``(N, 256)``: what the file decodes.
    """
    x = blocks.detach().float()
    n = x.shape[0]
    if grid == "q4_k":
        x = x.reshape(n, 8, 32)
        lo, hi = x.amin(-1).clamp(max=0.0), x.amax(-1)
        scale, mn = (hi - lo) / 15, -lo
        d, dmin = scale.amax(-1) / 63, mn.amax(-1) / 63
        sc = torch.round(_div(scale, d[:, None])).clamp(0, 63)
        m = torch.round(_div(mn, dmin[:, None])).clamp(0, 63)
        d16, dmin16 = fp16_scale(d), fp16_scale(dmin)
        ds, dm = (d16[:, None] * sc)[..., None], (dmin16[:, None] * m)[..., None]
        q = torch.round(_div(x + dm, ds)).clamp(0, 15)
        values = ds * q - dm
        return {"d": d16, "dmin": dmin16, "sc": sc, "m": m, "q": q, "values": values.reshape(n, -1)}
    if grid == "q6_k":
        x = x.reshape(n, 16, 16)
        scale = _signed_max(x) / -32
        d = _signed_max(scale) / -128
        sc = torch.round(_div(scale, d[:, None])).clamp(-128, 127)
        d16 = fp16_scale(d)
        ds = (d16[:, None] * sc)[..., None]
        q = torch.round(_div(x, ds)).clamp(-32, 31)
        return {"d": d16, "sc": sc, "q": q, "values": (ds * q).reshape(n, -1)}
    raise ValueError(f"grid={grid!r} is not a k-quant grid: allowed: {', '.join(KQUANT_GRIDS)}")


class _KQuantFakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, blocks, grid):  # type: ignore[override]
        p = kquant_params(blocks, grid)
        sub = KQUANT_GRIDS[grid][0]
        x = blocks.detach().float().reshape(blocks.shape[0], -1, sub)
        if grid == "q4_k":
            ds = (p["d"][:, None] * p["sc"])[..., None]
            scaled = _div(x + (p["dmin"][:, None] * p["m"])[..., None], ds)
            lo, hi = 0.0, 15.0
        else:
            scaled = _div(x, (p["d"][:, None] * p["sc"])[..., None])
            lo, hi = -32.0, 31.0
        inside = (scaled >= lo - 0.5) & (scaled <= hi + 0.5)
        ctx.save_for_backward(inside.reshape(blocks.shape).to(blocks.dtype))
        return p["values"].to(blocks.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return grad * mask, None


def kquant_fake_quantize(blocks: torch.Tensor, grid: str) -> torch.Tensor:
    """``blocks`` ``(N, 256)`` on the k-quant ``grid``, with a straight-through gradient."""
    return _KQuantFakeQuantize.apply(blocks, grid)
