"""A quantized Hugging Face checkpoint in the compressed-tensors format (``export.targets=[hf]``).

The folder ``transformers`` (``AutoModelForCausalLM.from_pretrained``), vLLM and SGLang load:
``config.json`` with a ``quantization_config`` (``quant_method: compressed-tensors``),
``model.safetensors``, and the source folder's tokenizer and generation config. Every quantized
``nn.Linear`` is stored as integers with the trained scales (:func:`qat.export.lm_weights.
quant_weight`, which checks ``codes · scales`` is the fake-quant weight bit for bit):

- 4-bit (or any width below 8) weights, per group of ``g`` or per channel: ``pack-quantized``
  (``weight_packed`` int32, ``weight_scale``, ``weight_shape``), symmetric.
- 8-bit weights: ``int-quantized`` (``weight`` int8, ``weight_scale``), with the dynamic input
  quantization of the recipe (``input_activations``: int8, per token or per tensor) for W8A8.

Layers compressed-tensors has no integer format for (embeddings, GPT-2's ``Conv1D``) are
stored as their fake-quant weights (``codes · scales`` in float32), in ``ignore``. Weights on
GGUF grids (Q4_0 / Q8_0, per block of 32) are symmetric integers with a per-group scale too,
stored the same way (a Q4_0 ``d`` may be negative; ``q · d`` is what is stored and computed).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat.export.lm_io import is_hf_model
from qat.export.lm_weights import QuantWeight, quant_weight, weighted_layers
from qat.quant.layers import QConv1D, QEmbedding, QLinear

__all__ = [
    "HF_FILES",
    "export_hf_checkpoint",
    "float_state_dict",
    "load_hf_checkpoint",
    "quantization_config",
]

#: Files copied from the source model folder, when there: tokenizer and generation settings.
HF_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


def _weight_args(qw: QuantWeight, in_features: int) -> dict[str, Any]:
    per_channel = qw.group >= in_features
    return {
        "num_bits": qw.bits,
        "type": "int",
        "symmetric": True,
        "strategy": "channel" if per_channel else "group",
        "group_size": None if per_channel else qw.group,
        "dynamic": False,
    }


def _input_args(layer: nn.Module) -> dict[str, Any] | None:
    """The dynamic input quantization of ``layer`` as compressed-tensors arguments (or None)."""
    act = getattr(layer, "act_quant", None)
    spec = getattr(act, "spec", None)
    if act is None or spec is None or not getattr(act, "enabled", True) or spec.bits >= 32:
        return None
    if spec.dynamic == "none":
        raise ValueError(
            "static activation ranges have no compressed-tensors W8A8 form here: use a "
            "weight-only or dynamic activation recipe (quant=lm_w4g32, lm_w8da8)"
        )
    strategy = {"token": "token", "tensor": "tensor"}.get(spec.dynamic, "group")
    return {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": bool(spec.symmetric),
        "strategy": strategy,
        "group_size": spec.group_size if strategy == "group" else None,
        "dynamic": True,
    }


def _fits_signed(qw: QuantWeight) -> bool:
    lo, hi = -(1 << (qw.bits - 1)), (1 << (qw.bits - 1)) - 1
    return bool(qw.codes.min() >= lo and qw.codes.max() <= hi)


def float_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own parameters and buffers under the Hugging Face names, without the
    quantizers' state (each Q-layer keeps its float ``weight`` / ``bias``)."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, QLinear | QConv1D | QEmbedding):
            skip += [f"{name}.{child}." for child, _ in module.named_children()]
    # Tied weights (GPT-2's lm_head and wte) under every name: both are written.
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    names |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    state = model.state_dict()
    return {
        k: v.detach()
        for k, v in state.items()
        if k in names and not any(k.startswith(p) for p in skip)
    }


def quantization_config(
    schemes: Mapping[str, tuple[dict[str, Any], dict[str, Any] | None, str]],
    ignore: list[str],
) -> dict[str, Any]:
    """The ``quantization_config`` of config.json: one config group per (weights, inputs,
    format) combination, its layers named exactly."""
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for name, (weights, inputs, fmt) in schemes.items():
        key = (json.dumps(weights, sort_keys=True), json.dumps(inputs, sort_keys=True), fmt)
        group = groups.setdefault(
            key,
            {"targets": [], "weights": weights, "input_activations": inputs, "format": fmt},
        )
        group["targets"].append(name)
    formats = {g["format"] for g in groups.values()}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
        "ignore": sorted(ignore),
    }


@torch.no_grad()
def export_hf_checkpoint(
    model: nn.Module, out_dir: str | Path, source_dir: str | Path | None = None
) -> Path:
    """Write the quantized Hugging Face checkpoint of a fake-quant HF causal LM in ``out_dir``.

    Args:
        model: a Hugging Face model prepared by :func:`qat.prepare` (trained or calibrated).
        out_dir: the folder (created; files in it are overwritten).
        source_dir: the folder the model was loaded from, whose tokenizer and generation
            config are copied (default: ``model.config._name_or_path`` when it is a folder).

    Returns:
        ``out_dir``.

    Raises:
        ValueError: not a Hugging Face model, or weights compressed-tensors cannot store.
    """
    from safetensors.torch import save_file

    if not is_hf_model(model):
        raise ValueError(
            f"export target hf writes Hugging Face checkpoints: {type(model).__name__} is not a "
            "transformers model (model=hf model.path=...)"
        )
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    except ImportError:
        raise ValueError(
            "export target hf needs the compressed-tensors package: pip install -e '.[llm]'"
        ) from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.float().clone() if v.is_floating_point() else v.clone()
        for k, v in float_state_dict(model).items()
    }
    schemes: dict[str, tuple[dict[str, Any], dict[str, Any] | None, str]] = {}
    ignore: list[str] = []
    for name, layer in weighted_layers(model):
        qw = quant_weight(layer, name)
        if not isinstance(layer, QLinear) or not _fits_signed(qw):
            # Stored as the exact fake-quant weight (Conv1D keeps its transposed layout).
            tensors[f"{name}.weight"] = (
                qw.weight.t().contiguous() if isinstance(layer, QConv1D) else qw.weight.contiguous()
            )
            ignore.append(name)
            continue
        weights = _weight_args(qw, layer.in_features)
        del tensors[f"{name}.weight"]
        scale = qw.scales.float().contiguous()
        if qw.bits == 8:
            fmt = "int-quantized"
            tensors[f"{name}.weight"] = qw.codes.to(torch.int8).contiguous()
        else:
            fmt = "pack-quantized"
            tensors[f"{name}.weight_packed"] = pack_to_int32(qw.codes.to(torch.int8), qw.bits)
            tensors[f"{name}.weight_shape"] = torch.tensor(list(qw.codes.shape))
        tensors[f"{name}.weight_scale"] = scale
        schemes[name] = (weights, _input_args(layer), fmt)
    if not schemes:
        raise ValueError(
            "export target hf: no nn.Linear layer has quantized weights (quant.enabled=false?)"
        )
    config = model.config.to_dict()
    # A tied output layer quantized apart from the embedding is its own tensor now.
    config["tie_word_embeddings"] = False
    config["dtype"] = "float32"
    config.pop("torch_dtype", None)
    config.pop("_name_or_path", None)
    config["use_cache"] = True
    config["quantization_config"] = quantization_config(schemes, ignore)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    source = Path(source_dir or getattr(model.config, "_name_or_path", "") or "")
    if str(source) and source.is_dir():
        for fname in HF_FILES:
            if (source / fname).is_file():
                shutil.copyfile(source / fname, out / fname)
    return out


def load_hf_checkpoint(path: str | Path) -> Any:
    """``ids → logits`` of a checkpoint folder, as ``transformers`` loads it (CPU, float32,
    eager attention: the arithmetic the fake-quant model was verified with)."""
    from transformers import AutoModelForCausalLM

    from qat.export.lm_io import logits_of

    model = AutoModelForCausalLM.from_pretrained(
        Path(path), local_files_only=True, attn_implementation="eager"
    ).eval()

    @torch.no_grad()
    def run(ids: torch.Tensor) -> torch.Tensor:
        return logits_of(model, ids.cpu().long()).float()

    return run
