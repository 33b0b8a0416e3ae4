"""A local Hugging Face causal language model and its tokenizer (``model=hf``).

:func:`load_hf_causal_lm` loads any folder ``save_pretrained`` wrote (``config.json``,
safetensors, tokenizer files) with ``AutoModelForCausalLM.from_pretrained(path,
local_files_only=True)``: nothing is downloaded. The data (``data=text``) reads the same folder's
tokenizer through :func:`load_hf_tokenizer`. Bad folders are refused with one line naming what
is missing, before any work.

Example:
    >>> model = load_hf_causal_lm("checkpoints/my-llama", dtype="float32")
    >>> tok = load_hf_tokenizer("checkpoints/my-llama")
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qat.hf_folder import check_hf_folder, load_hf_tokenizer, transformers_module

__all__ = ["DTYPES", "check_hf_folder", "load_hf_causal_lm", "load_hf_tokenizer"]

#: ``model.dtype`` values: the weights' dtype after loading.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_hf_causal_lm(
    path: str,
    dtype: str = "float32",
    gradient_checkpointing: bool = False,
    trust_remote_code: bool = False,
    attn_implementation: str | None = "eager",
) -> nn.Module:
    """A local Hugging Face causal LM, in training mode.

    Args:
        path: a folder ``save_pretrained`` wrote (config.json, weights, tokenizer).
        dtype: ``float32`` (QAT on CPU: the default), ``bfloat16`` or ``float16``.
        gradient_checkpointing: recompute the blocks' activations in the backward pass (less
            memory, about a third more compute).
        trust_remote_code: run the folder's own modelling code (only for folders you trust).
        attn_implementation: ``eager`` (the default: plain matmuls, what the exporters trace),
            ``sdpa``, or null for transformers' choice.

    Raises:
        ValueError: a bad folder or option (one line saying what to fix).
    """
    folder = check_hf_folder(path, need_tokenizer=False)  # the data loads the tokenizer
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is invalid: allowed: {', '.join(DTYPES)}")
    transformers = transformers_module()
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": DTYPES[dtype]}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except Exception as err:
        first = str(err).strip().splitlines()
        raise ValueError(
            f"model.path={path}: AutoModelForCausalLM cannot load it: "
            f"{first[0] if first else type(err).__name__}"
        ) from None
    if gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(
                f"model.gradient_checkpointing=true: {type(model).__name__} does not support it; "
                "set model.gradient_checkpointing=false"
            )
        # Non-reentrant: the fake quantizers' autograd functions recompute cleanly.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        # That also hooks the input embedding to make its output require grad (for frozen
        # embeddings, e.g. adapters): every weight trains here, and the QAT swap replaces the
        # embedding, leaving a dead hook handle that breaks deepcopy (export).
        if hasattr(model, "disable_input_require_grads"):
            model.disable_input_require_grads()
    # The QAT loop owns the cache and the loss: logits only.
    model.config.use_cache = False
    return model.train()
