"""A small decoder-only transformer (GPT-2 layout) for next-token prediction.

Pre-LayerNorm blocks with learned position embeddings, one fused ``qkv`` projection, causal
scaled-dot-product attention and a tanh-GELU MLP: the layout of llama.cpp's ``gpt2``
architecture, so a trained model maps onto a GGUF file tensor for tensor. The forward is plain
tensor code (traceable by ``torch.fx``), takes token ids ``(B, T)`` and returns logits
``(B, T, vocab_size)``.

Example:
    >>> from qat.models import create_model
    >>> model = create_model("gpt", vocab_size=256, context_length=128)
    >>> model(torch.randint(0, 256, (2, 16))).shape
    torch.Size([2, 16, 256])
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qat.models.registry import register_model


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        shape = (b, t, self.n_heads, c // self.n_heads)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, hidden)
        self.act = nn.GELU(approximate="tanh")  # ggml's gelu
        self.proj = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, hidden: int, dropout: float, eps: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model, eps=eps)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model, eps=eps)
        self.mlp = MLP(d_model, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    """Decoder-only transformer over a byte (or any small) vocabulary.

    Args:
        vocab_size: number of token ids.
        context_length: longest sequence (size of the position table).
        d_model: width; a multiple of 32 keeps every weight row on GGUF's blocks of 32.
        n_layers: transformer blocks.
        n_heads: attention heads (``d_model`` must divide by it).
        mlp_ratio: MLP hidden width over ``d_model``.
        dropout: dropout on the residual branches and attention weights (training only).
        layer_norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        vocab_size: int = 256,
        context_length: int = 128,
        d_model: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("context_length", context_length),
            ("d_model", d_model),
            ("n_layers", n_layers),
            ("n_heads", n_heads),
            ("mlp_ratio", mlp_ratio),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.vocab_size, self.context_length = vocab_size, context_length
        self.d_model, self.n_layers, self.n_heads = d_model, n_layers, n_heads
        self.hidden = mlp_ratio * d_model
        self.layer_norm_eps = layer_norm_eps
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(context_length, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, self.hidden, dropout, layer_norm_eps) for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # GPT-2's scaled init of the residual projections
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


@register_model
def gpt(
    vocab_size: int = 256,
    context_length: int = 128,
    d_model: int = 128,
    n_layers: int = 4,
    n_heads: int = 4,
    mlp_ratio: int = 4,
    dropout: float = 0.0,
    layer_norm_eps: float = 1e-5,
) -> GPT:
    """GPT-2-style decoder (:class:`GPT`); the defaults are the results table's model."""
    return GPT(
        vocab_size, context_length, d_model, n_layers, n_heads, mlp_ratio, dropout, layer_norm_eps
    )
