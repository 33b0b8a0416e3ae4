"""A language model's float ops as the fused ONNX Runtime kernels they are (``com.microsoft``).

ONNX Runtime fuses ``LayerNormalization`` (opset 17) and RMSNorm by itself, but not the GELU
nor the attention that ``torch.onnx.export`` writes: tanh-GELU comes out as eight elementwise
ops, and causal ``scaled_dot_product_attention`` as a mask built from the sequence length,
two batched ``MatMul`` s, a ``Softmax`` and the transposes between them (a quarter of a small
GPT's time at 128 tokens). :func:`fused_ops` swaps them, for the export only, for:

- ``nn.GELU`` → ``FastGelu`` (``approximate="tanh"``) or ``Gelu`` (erf);
- causal self-attention without a mask or dropout, as many key / value heads as query heads
  → ``MultiHeadAttention(unidirectional=1)`` on ``(batch, sequence, heads·dim)`` views.

Both in the float model (the FP32 baseline: ``nn.GELU`` modules and calls of
``F.scaled_dot_product_attention``) and as the float islands of a prepared model (``QAct``
with a float output around ``nn.GELU`` or a captured ``scaled_dot_product_attention``), so the
float and quantized files compare like for like. They compute in float32 as ONNX Runtime's
kernels round, which the statistical contract of :mod:`qat.export.verify_lm` covers (not the
bit-exact float64 files). Anything else (masks, grouped-query attention, Llama's eager
attention) stays as the model wrote it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qat.export.onnx.emit import _const, _tracing_off
from qat.quant.layers import QAct
from qat.quant.layers.functional import SLOT, FunctionalOp
from qat.quant.prepare import set_module

__all__ = ["MS_DOMAIN", "fused_ops"]

MS_DOMAIN = "com.microsoft"
_SDPA = F.scaled_dot_product_attention


class _AttentionFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> Any:  # type: ignore[override]
        with _tracing_off():
            return _SDPA(q, k, v, is_causal=True)

    @staticmethod
    def symbolic(g: Any, q: Any, k: Any, v: Any, heads: int) -> Any:
        flat = _const(g, torch.tensor([0, 0, -1], dtype=torch.int64))
        qkv = [g.op("Reshape", g.op("Transpose", z, perm_i=[0, 2, 1, 3]), flat) for z in (q, k, v)]
        y = g.op(f"{MS_DOMAIN}::MultiHeadAttention", *qkv, num_heads_i=heads, unidirectional_i=1)
        y = g.op("Reshape", y, _const(g, torch.tensor([0, 0, heads, -1], dtype=torch.int64)))
        y = g.op("Transpose", y, perm_i=[0, 2, 1, 3])
        with contextlib.suppress(RuntimeError, AttributeError, TypeError):
            y.setType(q.type())  # (batch, heads, sequence, dim), as q
        return y


def _causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Any = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, as ``MultiHeadAttention`` where that computes it."""
    fits = is_causal and attn_mask is None and not dropout_p and scale is None
    fits = fits and q.dim() == 4 and k.shape[1] == q.shape[1] == v.shape[1]
    if not fits:
        return _SDPA(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    return _AttentionFn.apply(q, k, v, int(q.shape[1]))


class _ExportAttention(nn.Module):
    """A captured ``scaled_dot_product_attention`` island, called with its kwargs."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.kwargs = kwargs

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _causal_attention(q, k, v, **self.kwargs)


class _GeluFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, approximate: str) -> torch.Tensor:  # type: ignore[override]
        with _tracing_off():
            return F.gelu(x, approximate=approximate)

    @staticmethod
    def symbolic(g: Any, x: Any, approximate: str) -> Any:
        y = g.op(f"{MS_DOMAIN}::{'FastGelu' if approximate == 'tanh' else 'Gelu'}", x)
        with contextlib.suppress(RuntimeError, AttributeError, TypeError):
            y.setType(x.type())
        return y


class _ExportGelu(nn.Module):
    def __init__(self, approximate: str) -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _GeluFn.apply(x, self.approximate)


def _is_attention_island(op: nn.Module) -> bool:
    if not isinstance(op, FunctionalOp) or op.target is not _SDPA:
        return False
    return op.args == (SLOT, SLOT, SLOT) and all(v is not SLOT for v in op.kwargs.values())


def _swap_modules(model: nn.Module) -> None:
    """Replace, in place, the GELUs and attention islands :func:`fused_ops` fuses."""
    for name, m in list(model.named_modules()):
        inner = m.act if isinstance(m, QAct) and not m.output_quant.enabled else m
        if isinstance(m, QAct) and inner is m:
            continue  # an island with an output quantizer: not a float op
        if isinstance(inner, nn.GELU) and inner.approximate in ("none", "tanh"):
            set_module(model, name, _ExportGelu(inner.approximate))
        elif isinstance(m, QAct) and _is_attention_island(inner):
            set_module(model, name, _ExportAttention(dict(inner.kwargs)))


@contextlib.contextmanager
def fused_ops(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` (a copy to export: changed in place) with its GELUs and causal attention as
    ONNX Runtime's fused kernels (module docstring), while the ``with`` block exports it."""
    _swap_modules(model)
    F.scaled_dot_product_attention = _causal_attention  # the float model's own calls
    try:
        yield model
    finally:
        F.scaled_dot_product_attention = _SDPA
