"""``QEmbedding``: an embedding table with fake-quantized rows (weight-only).

A lookup returns rows of the quantized table, so its output is on the weight grid already and
gets no quantizer of its own. Rows are quantized per row (axis 0), or per group of
``group_size`` along the embedding dimension, as GGUF stores ``token_embd``.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn

from qat.quant.layers.base import like, weight_quantizer
from qat.quant.spec import QuantSpec


class QEmbedding(nn.Embedding):
    """``nn.Embedding`` whose lookups read ``weight_quant(weight)``."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, weight_spec: QuantSpec | None = None, **kw
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, **kw)
        shape = (num_embeddings, embedding_dim)
        self.weight_quant = weight_quantizer(weight_spec, num_embeddings, axis=0, shape=shape)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weight_quant(self.weight)
        return F.embedding(
            ids, w, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq
        )

    @classmethod
    def from_float(
        cls,
        emb: nn.Embedding,
        weight_spec: QuantSpec | None = None,
        activation_spec: QuantSpec | None = None,
    ) -> QEmbedding:
        if emb.sparse or emb.max_norm is not None:
            raise ValueError(
                "QEmbedding supports dense embeddings without max_norm (it renormalises the "
                "float table in place): skip this layer with an override"
            )
        if type(emb) is not nn.Embedding:
            return _quantized_subclass(emb, weight_spec)
        q = cls(
            emb.num_embeddings,
            emb.embedding_dim,
            weight_spec=weight_spec,
            padding_idx=emb.padding_idx,
            scale_grad_by_freq=emb.scale_grad_by_freq,
        )
        q = like(q, emb)
        with torch.no_grad():
            q.weight.copy_(emb.weight)
        return q

    def to_float(self) -> nn.Module:
        base = getattr(type(self), "float_type", None)
        if base is not None:  # a quantized subclass (_subclass_type): its own class back
            emb = copy.deepcopy(self)
            del emb.weight_quant
            emb.__class__ = base
            return emb
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx)
        emb = like(emb, self)
        with torch.no_grad():
            emb.weight.copy_(self.weight)
        return emb


@functools.cache
def _subclass_type(base: type[nn.Embedding]) -> type[nn.Embedding]:
    """``Q<Base>``: ``base`` first in the MRO, so its own ``forward`` runs and its
    ``super().forward(ids)`` (Gemma: ``· embed_scale``) is QEmbedding's quantized lookup."""
    return type(
        f"Q{base.__name__}", (base, QEmbedding), {"__module__": __name__, "float_type": base}
    )


def _quantized_subclass(emb: nn.Embedding, weight_spec: QuantSpec | None) -> nn.Embedding:
    """An ``nn.Embedding`` subclass quantized in place of its lookup, keeping its forward and
    its extra state (a scale buffer, a norm)."""
    q = copy.deepcopy(emb)
    q.__class__ = _subclass_type(type(emb))
    shape = (emb.num_embeddings, emb.embedding_dim)
    q.weight_quant = like(
        weight_quantizer(weight_spec, emb.num_embeddings, axis=0, shape=shape), emb
    )
    return q
