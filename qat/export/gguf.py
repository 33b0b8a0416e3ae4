"""GGUF files for llama.cpp, written from the trained quantizers (``gguf`` package).

Weights on GGUF's block grids (``grid: q4_0`` / ``q8_0`` in the recipe) are written as ``Q4_0``
/ ``Q8_0`` blocks from their trained ``d`` and integer codes (:mod:`qat.export.lm_weights`),
never re-quantized from float: ``gguf.quants.dequantize`` of the file returns the fake-quant
weights bit for bit. Float weights, norms and biases are ``F32``. Other grids (affine per-group
scales) have no GGUF type and are refused, naming the layer.

The vocabulary: a 256-token model is taken as byte-level and gets GPT-2's byte-to-unicode
tokens with no merges (a BPE that leaves every byte a token); other vocabularies are written as
``no_vocab`` (llama.cpp then runs on token ids).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qat.export.gguf_arch import GGUFLayout, GGUFTensor, gguf_layout
from qat.export.lm_weights import quant_weight
from qat.quant.layers import FloatLayer, is_hf_conv1d

__all__ = ["byte_tokens", "export_gguf", "pack_blocks"]

_FILE_TYPE = {"q4_0": 2, "q8_0": 7}  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_0 / _Q8_0; 0 = all F32


def byte_tokens() -> list[str]:
    """GPT-2's ``bytes_to_unicode``: one printable character per byte value, by byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def pack_blocks(codes: torch.Tensor, d16: torch.Tensor, grid: str) -> np.ndarray:
    """GGUF block bytes ``(rows, blocks · block bytes)`` of ``codes`` ``(rows, in)`` and fp16
    scales ``(rows, blocks)``: Q8_0 ``[d, 32 × int8]``, Q4_0 ``[d, 16 bytes]`` with the code of
    element ``j`` (plus 8) in the low nibble of byte ``j`` and element ``j + 16`` in the high one.
    """
    rows, k = codes.shape
    blocks = codes.reshape(rows, k // 32, 32)
    d = d16.reshape(rows, k // 32, 1).numpy().astype(np.float16).view(np.uint8)
    if grid == "q8_0":
        qs = blocks.numpy().astype(np.int8).view(np.uint8)
    else:
        u = (blocks + 8).numpy().astype(np.uint8)
        qs = u[..., :16] | (u[..., 16:] << np.uint8(4))
    return np.concatenate([d, qs], axis=-1).reshape(rows, -1)


def _float_weight(layer: nn.Module) -> torch.Tensor:
    inner = layer.module if isinstance(layer, FloatLayer) else layer
    w = inner.weight.detach().float()
    return w.t() if is_hf_conv1d(inner) else w


def _tensor(t: GGUFTensor) -> tuple[np.ndarray, object | None, str | None]:
    """``(array, raw GGML type or None for F32, grid)`` of one file tensor."""
    import gguf

    if t.value is not None:
        return t.value.contiguous().numpy().astype(np.float32), None, None
    layer = t.layer
    wq = getattr(layer, "weight_quant", None)
    if wq is None or not wq.enabled:
        w = _float_weight(layer)
        w = w if t.rows is None else w[t.rows]
        return w.contiguous().numpy().astype(np.float32), None, None
    qw = quant_weight(layer, t.name)
    if qw.grid not in _FILE_TYPE:
        raise ValueError(
            f"GGUF tensor {t.name}: its layer's weights are on an {qw.bits}-bit {qw.grid} grid, "
            "which GGUF cannot store; train with grid q4_0 or q8_0 (quant=lm_q4_0 / lm_q8_0) "
            "or export it with export.targets=[onnx]"
        )
    codes, scales = qw.codes, qw.scales
    if t.rows is not None:
        codes, scales = codes[t.rows], scales[t.rows]
    qtype = getattr(gguf.GGMLQuantizationType, qw.grid.upper())
    return pack_blocks(codes, scales, qw.grid), qtype, qw.grid


def _write_vocab(writer: object, layout: GGUFLayout) -> None:
    if layout.vocab_size == 256:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(byte_tokens())
        writer.add_token_types([1] * 256)  # NORMAL
        writer.add_token_merges(["Ā ā"])  # one never-matching merge: the key must exist
    else:
        writer.add_tokenizer_model("no_vocab")


@torch.no_grad()
def export_gguf(model: nn.Module, path: str | os.PathLike[str], name: str = "qat") -> Path:
    """Write ``model`` (a prepared qat ``gpt``, Hugging Face GPT-2 or Llama) as a GGUF file.

    Returns:
        The path written.

    Raises:
        ValueError: the model's architecture has no GGUF layout here, or a layer's weights
            are on a grid GGUF cannot store (both named).
    """
    import gguf

    layout = gguf_layout(copy.deepcopy(model).cpu().eval())
    tensors = [(t.name, *_tensor(t)) for t in layout.tensors]
    grids = {grid for *_, grid in tensors if grid is not None}
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), layout.arch)
    writer.add_name(name)
    file_type = (
        _FILE_TYPE["q4_0"] if "q4_0" in grids else _FILE_TYPE.get("q8_0" if grids else "", 0)
    )
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in layout.hparams.items():
        getattr(writer, f"add_{key}")(value)  # add_context_length, add_head_count, ...
    _write_vocab(writer, layout)
    for tname, array, qtype, _ in tensors:
        if qtype is None:
            writer.add_tensor(tname, array)
        else:
            writer.add_tensor(tname, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
