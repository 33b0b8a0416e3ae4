"""How the language-model exporters call a model: token ids in, logits out.

qat's own models take ``model(ids)``. Hugging Face models (recognised by their ``config``'s
``model_type``, without importing ``transformers``) are called with keywords and an all-ones
attention mask: with no mask, transformers 5 looks for packed sequences with ``torch.diff``,
which neither the ONNX exporter nor a fixed graph can follow.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LogitsModule", "is_hf_model", "logits_of"]


def is_hf_model(model: nn.Module) -> bool:
    """True for a Hugging Face ``PreTrainedModel`` (duck-typed)."""
    return isinstance(getattr(getattr(model, "config", None), "model_type", None), str)


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``model``'s logits for token ids ``(B, T)``: ``(B, T, V)`` (or ``(B, C)``)."""
    if not is_hf_model(model):
        out = model(ids)
        return out[0] if isinstance(out, tuple | list) else out
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(model.config, "is_decoder", False) or "CausalLM" in type(model).__name__:
        kwargs["use_cache"] = False
    return model(**kwargs).logits


class LogitsModule(nn.Module):
    """``forward(ids) → logits`` around any model :func:`logits_of` can call (for export)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model, ids)
