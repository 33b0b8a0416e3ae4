"""Which llama.cpp architecture a model is, and where each of its tensors goes in a GGUF file.

Two kinds of model, found by duck typing (no ``transformers`` or ``qat.models`` import):

- qat's ``gpt`` (``tok_emb``, ``pos_emb``, ``blocks[i].attn.qkv`` ...) → llama.cpp ``gpt2``;
- Hugging Face causal LMs of the families llama.cpp runs, by ``config.model_type``: ``llama``
  and ``mistral`` → ``llama``; ``qwen2``, ``qwen3``, ``gemma``, ``gemma2``, ``gemma3_text``,
  ``phi3``, ``gpt2``. Tensor names come from the ``gguf`` package's
  :func:`gguf.get_tensor_name_map` (the table ``convert_hf_to_gguf.py`` uses) applied to the
  model's own module names, so every layer a family has lands where llama.cpp looks for it.

Family rules, as llama.cpp's converter applies them:

- ``llama``: ``q_proj`` / ``k_proj`` rows permuted (llama.cpp rotates adjacent pairs, Hugging
  Face the two halves of each head), which moves whole rows, so quantization blocks move
  intact. The other families use llama.cpp's NEOX rope (halves) and need no permutation.
- Gemma: RMSNorm computes ``x · (1 + w)``, llama.cpp ``x · w``: norms are written as ``1 + w``;
  the scaled embedding (``· √hidden``) is llama.cpp's own for these archs. ``gemma`` /
  ``gemma2`` always use ``token_embd`` as the output layer.
- GPT-2's ``Conv1D`` stores ``(in, out)``: written transposed (``qat.export.lm_weights``).
- Phi-3's fused ``qkv_proj`` / ``gate_up_proj`` and Qwen's biases / q-k norms map as they are.

A tied output layer (``config.tie_word_embeddings``) whose weights equal the embedding's in the
file is left out: llama.cpp then reads ``token_embd``. A weight is written from the module that
holds it (its quantizer decides the GGUF type); norms and biases are float tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qat.quant.layers import FloatLayer, QAct, QConv1D, QEmbedding, QLinear, is_hf_conv1d

__all__ = ["GGUF_FAMILIES", "GGUFLayout", "GGUFTensor", "gguf_layout"]

#: ``config.model_type`` → the ``gguf.MODEL_ARCH`` member llama.cpp runs it as.
GGUF_FAMILIES = {
    "llama": "LLAMA",
    "mistral": "LLAMA",
    "qwen2": "QWEN2",
    "qwen3": "QWEN3",
    "gemma": "GEMMA",
    "gemma2": "GEMMA2",
    "gemma3_text": "GEMMA3",
    "phi3": "PHI3",
    "gpt2": "GPT2",
}
_GEMMA = ("gemma", "gemma2", "gemma3_text")
#: Archs whose llama.cpp graph always uses token_embd as the output layer.
_OUTPUT_IS_EMBEDDING = ("gemma", "gemma2")


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
    """``arch`` (``gguf.MODEL_ARCH`` name, lower case), ``hparams`` (``GGUFWriter.add_<key>``
    → value), the tensors, the vocabulary size; ``tied_output``: the output layer was left out
    if its weights equal the embedding's (:func:`qat.export.gguf.export_gguf` decides);
    ``output_is_embedding``: the arch has no output tensor at all."""

    arch: str
    hparams: dict[str, Any]
    tensors: list[GGUFTensor] = field(default_factory=list)
    vocab_size: int = 0
    tied_output: bool = False
    output_is_embedding: bool = False

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


def _rope_permutation(rows: int, heads: int) -> torch.Tensor:
    """``convert_hf_to_gguf``'s llama ``permute``: per head, rows (2, half) → (half, 2)."""
    idx = torch.arange(rows).reshape(heads, 2, rows // heads // 2)
    return idx.transpose(1, 2).reshape(-1)


def _rope_theta(cfg: Any, default: float = 10000.0) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    if "full_attention" in params:  # Gemma 3: per layer type; the global layers' base
        params = params["full_attention"]
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", None) or default))


def _head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _hparams(model_type: str, cfg: Any) -> dict[str, Any]:
    """The ``GGUFWriter.add_<key>`` hyper-parameters llama.cpp reads for the family."""
    if model_type == "gpt2":
        return {
            "context_length": cfg.n_positions,
            "embedding_length": cfg.n_embd,
            "feed_forward_length": cfg.n_inner or 4 * cfg.n_embd,
            "block_count": cfg.n_layer,
            "head_count": cfg.n_head,
            "layer_norm_eps": float(cfg.layer_norm_epsilon),
        }
    heads = cfg.num_attention_heads
    head_dim = _head_dim(cfg)
    hp: dict[str, Any] = {
        "context_length": cfg.max_position_embeddings,
        "embedding_length": cfg.hidden_size,
        "feed_forward_length": cfg.intermediate_size,
        "block_count": cfg.num_hidden_layers,
        "head_count": heads,
        "head_count_kv": getattr(cfg, "num_key_value_heads", None) or heads,
        "layer_norm_rms_eps": float(cfg.rms_norm_eps),
        "rope_freq_base": _rope_theta(cfg),
        "key_length": head_dim,
        "value_length": head_dim,
    }
    if model_type in ("llama", "mistral", "qwen2", "qwen3", "phi3"):
        rot = float(getattr(cfg, "partial_rotary_factor", None) or 1.0)
        hp["rope_dimension_count"] = int(rot * head_dim)
    if model_type in ("gemma2", "gemma3_text"):
        _check_attention_scale(model_type, cfg, head_dim)
        if getattr(cfg, "attn_logit_softcapping", None):
            hp["attn_logit_softcapping"] = float(cfg.attn_logit_softcapping)
        if cfg.final_logit_softcapping:
            hp["final_logit_softcapping"] = float(cfg.final_logit_softcapping)
        hp["sliding_window"] = int(cfg.sliding_window)
        # Which layers slide, as the config says (llama.cpp's default patterns are 2 and 6).
        hp["sliding_window_pattern"] = [t == "sliding_attention" for t in cfg.layer_types]
        params = getattr(cfg, "rope_parameters", None) or {}
        local = params.get("sliding_attention", {}).get("rope_theta")
        local = local or getattr(cfg, "rope_local_base_freq", None) or hp["rope_freq_base"]
        hp["rope_freq_base_swa"] = float(local)
    return hp


def _check_attention_scale(model_type: str, cfg: Any, head_dim: int) -> None:
    """llama.cpp scales Gemma 2 / 3 attention by ``1/√head_dim`` (``1/√(hidden/heads)`` for
    the 27B depths); Hugging Face by ``1/√query_pre_attn_scalar``: they must agree."""
    big = cfg.num_hidden_layers in (46, 62)  # gemma-2-27b, gemma-3-27b
    want = cfg.hidden_size // cfg.num_attention_heads if big else head_dim
    if cfg.query_pre_attn_scalar != want:
        raise ValueError(
            f"GGUF {model_type}: llama.cpp scales attention by 1/sqrt({want}), this model by "
            f"1/sqrt(query_pre_attn_scalar={cfg.query_pre_attn_scalar}): set "
            f"query_pre_attn_scalar={want} or export it with export.targets=[onnx]"
        )


def _weighted(module: nn.Module) -> bool:
    """A layer whose weight the file stores as a (possibly quantized) matrix."""
    inner = _unwrap(module)
    return isinstance(
        module, QLinear | QConv1D | QEmbedding | FloatLayer | nn.Linear | nn.Embedding
    ) or (is_hf_conv1d(inner) and inner is module)


def _leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """``(Hugging Face name, module)`` of every weighted layer and every module holding its
    own ``weight`` (norms); wrappers (``QAct``, ``FloatLayer``) keep the wrapped module's name."""
    out: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if _weighted(child):
            out.append((full, child))
        elif isinstance(child, QAct | FloatLayer):
            out.append((full, _unwrap(child)))
        elif isinstance(getattr(child, "weight", None), nn.Parameter):
            out.append((full, child))
        else:
            out.extend(_leaves(child, f"{full}."))
    return out


def _hf_model(model: nn.Module, model_type: str) -> GGUFLayout:
    import gguf

    cfg = model.config
    arch = getattr(gguf.MODEL_ARCH, GGUF_FAMILIES[model_type])
    hp = _hparams(model_type, cfg)
    layout = GGUFLayout(
        gguf.MODEL_ARCH_NAMES[arch],
        hp,
        vocab_size=cfg.vocab_size,
        tied_output=bool(getattr(cfg, "tie_word_embeddings", False)),
        output_is_embedding=model_type in _OUTPUT_IS_EMBEDDING,
    )
    names = gguf.get_tensor_name_map(arch, hp["block_count"])
    heads, head_dim = hp["head_count"], hp.get("key_length", 0)
    kv_heads = hp.get("head_count_kv", heads)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for hf_name, module in _leaves(model):
        target = names.get_name(hf_name)
        if module is head and target is None:  # gemma's map has none: token_embd stands in
            target = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT]
        if target is None:
            raise ValueError(
                f"GGUF export of {model_type}: llama.cpp's tensor map has no place for "
                f"{hf_name!r} ({type(module).__name__}); export it with export.targets=[onnx]"
            )
        if _weighted(module):
            rows = None
            if model_type in ("llama", "mistral") and target.endswith(("attn_q", "attn_k")):
                n = heads if target.endswith("attn_q") else kv_heads
                rows = _rope_permutation(n * head_dim, n)
            _linear(layout, target, module, rows)
            continue
        weight = module.weight.detach().float()
        if model_type in _GEMMA:
            weight = weight + 1.0  # Gemma's RMSNorm scales by (1 + w)
        layout.value(f"{target}.weight", weight)
        layout.value(f"{target}.bias", getattr(module, "bias", None))
    return layout


_QAT_GPT_PARTS = ("tok_emb", "pos_emb", "blocks", "ln_f", "head")


def gguf_layout(model: nn.Module) -> GGUFLayout:
    """The :class:`GGUFLayout` of ``model``.

    Raises:
        ValueError: a model none of the layouts fits (named, with the supported ones).
    """
    if all(hasattr(model, part) for part in _QAT_GPT_PARTS):
        return _qat_gpt(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in GGUF_FAMILIES:
        return _hf_model(model, model_type)
    raise ValueError(
        f"GGUF export supports qat's gpt and Hugging Face causal LMs of model_type "
        f"{', '.join(GGUF_FAMILIES)}; {type(model).__name__} (model_type={model_type!r}) is "
        "none of them: export it with export.targets=[onnx]"
    )
