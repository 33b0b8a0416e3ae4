"""Which llama.cpp architecture a model is, and where each of its tensors goes in a GGUF file.

Three layouts, found by duck typing (no ``transformers`` or ``qat.models`` import):

- qat's ``gpt`` (``tok_emb``, ``pos_emb``, ``blocks[i].attn.qkv`` ...) → llama.cpp ``gpt2``;
- Hugging Face ``GPT2LMHeadModel`` (``config.model_type == "gpt2"``; ``Conv1D`` weights
  ``(in, out)``, written transposed) → ``gpt2``;
- Hugging Face ``LlamaForCausalLM`` → ``llama``; ``q_proj`` / ``k_proj`` rows are permuted
  as ``convert_hf_to_gguf.py`` does (llama.cpp rotates adjacent pairs, Hugging Face the two
  halves of each head), which moves whole rows, so their quantization blocks move intact.

A weight is named with the module that holds it (its quantizer decides the GGUF type); norms
and biases are float tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qat.quant.layers import FloatLayer, QAct

__all__ = ["GGUFLayout", "GGUFTensor", "gguf_layout"]


@dataclass
class GGUFTensor:
    """One tensor of the file: a layer's weight (``layer``) or a float tensor (``value``).

    ``rows`` reorders the rows of the ``(out, in)`` weight (the Llama Q / K permutation).
    """

    name: str
    layer: nn.Module | None = None
    value: torch.Tensor | None = None
    rows: torch.Tensor | None = None


@dataclass
class GGUFLayout:
    arch: str
    hparams: dict[str, Any]
    tensors: list[GGUFTensor] = field(default_factory=list)
    vocab_size: int = 0

    def weight(self, name: str, layer: nn.Module, rows: torch.Tensor | None = None) -> None:
        self.tensors.append(GGUFTensor(name, layer=layer, rows=rows))

    def value(self, name: str, value: torch.Tensor | None) -> None:
        if value is not None:
            self.tensors.append(GGUFTensor(name, value=value.detach().float()))


def _unwrap(module: nn.Module) -> nn.Module:
    """The float module inside a float island (``QAct``) or a skipped layer (``FloatLayer``)."""
    while isinstance(module, QAct | FloatLayer):
        module = module.act if isinstance(module, QAct) else module.module
    return module


def _norm(layout: GGUFLayout, name: str, norm: nn.Module) -> None:
    norm = _unwrap(norm)
    layout.value(f"{name}.weight", norm.weight)
    layout.value(f"{name}.bias", getattr(norm, "bias", None))


def _linear(layout: GGUFLayout, name: str, layer: nn.Module, rows: Any = None) -> None:
    layout.weight(f"{name}.weight", layer, rows)
    layout.value(f"{name}.bias", getattr(layer, "bias", None))


def _qat_gpt(model: nn.Module) -> GGUFLayout:
    block = model.blocks[0]
    layout = GGUFLayout(
        "gpt2",
        {
            "context_length": model.context_length,
            "embedding_length": model.d_model,
            "feed_forward_length": block.mlp.fc.out_features,
            "block_count": len(model.blocks),
            "head_count": model.n_heads,
            "layer_norm_eps": float(_unwrap(block.ln1).eps),
        },
        vocab_size=model.vocab_size,
    )
    layout.weight("token_embd.weight", model.tok_emb)
    layout.weight("position_embd.weight", model.pos_emb)
    for i, b in enumerate(model.blocks):
        p = f"blk.{i}"
        _norm(layout, f"{p}.attn_norm", b.ln1)
        _linear(layout, f"{p}.attn_qkv", b.attn.qkv)
        _linear(layout, f"{p}.attn_output", b.attn.proj)
        _norm(layout, f"{p}.ffn_norm", b.ln2)
        _linear(layout, f"{p}.ffn_up", b.mlp.fc)
        _linear(layout, f"{p}.ffn_down", b.mlp.proj)
    _norm(layout, "output_norm", model.ln_f)
    _linear(layout, "output", model.head)
    return layout


def _hf_gpt2(model: nn.Module) -> GGUFLayout:
    cfg, tr = model.config, model.transformer
    layout = GGUFLayout(
        "gpt2",
        {
            "context_length": cfg.n_positions,
            "embedding_length": cfg.n_embd,
            "feed_forward_length": cfg.n_inner or 4 * cfg.n_embd,
            "block_count": cfg.n_layer,
            "head_count": cfg.n_head,
            "layer_norm_eps": float(cfg.layer_norm_epsilon),
        },
        vocab_size=cfg.vocab_size,
    )
    layout.weight("token_embd.weight", tr.wte)
    layout.weight("position_embd.weight", tr.wpe)
    for i, h in enumerate(tr.h):
        p = f"blk.{i}"
        _norm(layout, f"{p}.attn_norm", h.ln_1)
        _linear(layout, f"{p}.attn_qkv", h.attn.c_attn)
        _linear(layout, f"{p}.attn_output", h.attn.c_proj)
        _norm(layout, f"{p}.ffn_norm", h.ln_2)
        _linear(layout, f"{p}.ffn_up", h.mlp.c_fc)
        _linear(layout, f"{p}.ffn_down", h.mlp.c_proj)
    _norm(layout, "output_norm", tr.ln_f)
    _linear(layout, "output", model.lm_head)
    return layout


def _rope_permutation(rows: int, heads: int) -> torch.Tensor:
    """``convert_hf_to_gguf``'s ``permute``: per head, rows (2, half) → (half, 2)."""
    idx = torch.arange(rows).reshape(heads, 2, rows // heads // 2)
    return idx.transpose(1, 2).reshape(-1)


def _rope_theta(cfg: Any) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _hf_llama(model: nn.Module) -> GGUFLayout:
    cfg, body = model.config, model.model
    heads = cfg.num_attention_heads
    kv_heads = cfg.num_key_value_heads or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    layout = GGUFLayout(
        "llama",
        {
            "context_length": cfg.max_position_embeddings,
            "embedding_length": cfg.hidden_size,
            "feed_forward_length": cfg.intermediate_size,
            "block_count": cfg.num_hidden_layers,
            "head_count": heads,
            "head_count_kv": kv_heads,
            "rope_dimension_count": head_dim,
            "rope_freq_base": _rope_theta(cfg),
            "layer_norm_rms_eps": float(cfg.rms_norm_eps),
        },
        vocab_size=cfg.vocab_size,
    )
    layout.weight("token_embd.weight", body.embed_tokens)
    for i, layer in enumerate(body.layers):
        p, att, mlp = f"blk.{i}", layer.self_attn, layer.mlp
        _norm(layout, f"{p}.attn_norm", layer.input_layernorm)
        _linear(layout, f"{p}.attn_q", att.q_proj, _rope_permutation(heads * head_dim, heads))
        _linear(layout, f"{p}.attn_k", att.k_proj, _rope_permutation(kv_heads * head_dim, kv_heads))
        _linear(layout, f"{p}.attn_v", att.v_proj)
        _linear(layout, f"{p}.attn_output", att.o_proj)
        _norm(layout, f"{p}.ffn_norm", layer.post_attention_layernorm)
        _linear(layout, f"{p}.ffn_gate", mlp.gate_proj)
        _linear(layout, f"{p}.ffn_up", mlp.up_proj)
        _linear(layout, f"{p}.ffn_down", mlp.down_proj)
    _norm(layout, "output_norm", body.norm)
    _linear(layout, "output", model.lm_head)
    return layout


_QAT_GPT_PARTS = ("tok_emb", "pos_emb", "blocks", "ln_f", "head")
_HF: dict[str, Callable[[nn.Module], GGUFLayout]] = {"gpt2": _hf_gpt2, "llama": _hf_llama}


def gguf_layout(model: nn.Module) -> GGUFLayout:
    """The :class:`GGUFLayout` of ``model``.

    Raises:
        ValueError: a model none of the layouts fits (named, with the supported ones).
    """
    if all(hasattr(model, part) for part in _QAT_GPT_PARTS):
        return _qat_gpt(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _HF:
        return _HF[model_type](model)
    raise ValueError(
        f"GGUF export supports qat's gpt and Hugging Face gpt2 / llama causal LMs; "
        f"{type(model).__name__} (model_type={model_type!r}) is none of them: export it with "
        "export.targets=[onnx]"
    )
