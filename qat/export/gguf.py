"""GGUF files for llama.cpp, written from the trained quantizers (``gguf`` package).

Weights on GGUF's block grids (``grid: q4_0`` / ``q8_0`` in the recipe) are written as ``Q4_0``
/ ``Q8_0`` blocks from their trained ``d`` and integer codes (:mod:`qat.export.lm_weights`),
never re-quantized from float: ``gguf.quants.dequantize`` of the file returns the fake-quant
weights bit for bit. Float weights, norms and biases are ``F32``. Other grids (affine per-group
scales) have no GGUF type and are refused, naming the layer.

The vocabulary: the Hugging Face tokenizer of the model's folder is embedded
(:mod:`qat.export.gguf_vocab`: BPE or SentencePiece, special tokens, chat template), so
``llama-cli -m model.gguf -p "..."`` runs the file. Without one, a 256-token model is taken as
byte-level and gets GPT-2's byte-to-unicode tokens with no merges (a BPE that leaves every byte
a token); other vocabularies are written as ``no_vocab``: llama.cpp (0.3.36) refuses to load
such a file (it reads a vocabulary of 0 tokens), so the export warns and verify runs it in
PyTorch only (:mod:`qat.export.gguf_runner`). Pass ``tokenizer=`` a folder to make it runnable.
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qat.export.gguf_arch import GGUFLayout, GGUFTensor, gguf_layout
from qat.export.gguf_vocab import tokenizer_folder, write_tokenizer
from qat.export.lm_weights import quant_weight
from qat.quant.kquants import KQUANT_BLOCK, KQUANT_GRIDS, kquant_params
from qat.quant.layers import FloatLayer, is_hf_conv1d

log = logging.getLogger(__name__)

__all__ = ["byte_tokens", "export_gguf", "pack_blocks", "pack_kquant"]

# llama.cpp's LLAMA_FTYPE_MOSTLY_*: Q4_0, Q8_0, Q4_K_M, Q6_K; 0 = all F32. The first grid of
# this order found in the file names it.
_FILE_TYPE = {"q4_0": 2, "q4_k": 15, "q6_k": 18, "q8_0": 7}


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


def pack_kquant(params: dict[str, torch.Tensor], grid: str) -> np.ndarray:
    """GGUF block bytes ``(N, 144)`` (``Q4_K``) / ``(N, 210)`` (``Q6_K``) of
    :func:`qat.quant.kquants.kquant_params`' output, laid out as ``ggml-quants.c`` stores them.
    """
    n = params["q"].shape[0]
    if grid == "q4_k":
        sc = params["sc"].numpy().astype(np.uint8)
        m = params["m"].numpy().astype(np.uint8)
        scales = np.zeros((n, 12), dtype=np.uint8)
        # Sub-blocks 0-3: 6 bits in bytes 0-3 (scale) / 4-7 (min); 4-7: low nibbles in bytes
        # 8-11, the top 2 bits in the top 2 bits of bytes 0-3 / 4-7.
        scales[:, :4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
        scales[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
        scales[:, 8:] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
        q = params["q"].numpy().astype(np.uint8).reshape(n, 4, 2, 32)  # pairs of sub-blocks
        qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, 128)
        d = params["d"].numpy().astype(np.float16).view(np.uint8).reshape(n, 2)
        dmin = params["dmin"].numpy().astype(np.float16).view(np.uint8).reshape(n, 2)
        return np.concatenate([d, dmin, scales, qs], axis=1)
    u = (params["q"].numpy() + 32).astype(np.uint8).reshape(n, 2, 4, 32)  # halves of 128
    # Per half: low nibbles of quarters 0/1 in ql's low nibbles, of 2/3 in the high ones;
    # the top 2 bits of the four quarters side by side in qh.
    low = (u[:, :, :2] & 0xF).reshape(n, 2, 64) | ((u[:, :, 2:] & 0xF) << 4).reshape(n, 2, 64)
    top = u >> 4
    qh = top[:, :, 0] | (top[:, :, 1] << 2) | (top[:, :, 2] << 4) | (top[:, :, 3] << 6)
    ql = low
    scales = params["sc"].numpy().astype(np.int8).view(np.uint8)
    d = params["d"].numpy().astype(np.float16).view(np.uint8).reshape(n, 2)
    return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), scales, d], axis=1)


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
    if wq.spec.grid in KQUANT_GRIDS:
        return _kquant_tensor(t, layer, wq)
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


def _kquant_tensor(t: GGUFTensor, layer: nn.Module, wq: nn.Module) -> tuple:
    """A Q4_K / Q6_K tensor from the layer's weights, checked against the fake-quant weight."""
    import gguf

    grid = wq.spec.grid
    if not (wq.fake_quant_enabled and wq.is_initialized):
        raise ValueError(f"GGUF tensor {t.name}: its weight quantizer is off or never saw data")
    w = _float_weight(layer)
    expected = wq(layer.weight).detach().float()
    expected = expected.t() if is_hf_conv1d(getattr(layer, "module", layer)) else expected
    if t.rows is not None:
        w, expected = w[t.rows], expected[t.rows]
    rows = w.shape[0]
    params = kquant_params(w.reshape(-1, KQUANT_BLOCK), grid)
    if not torch.equal(params["values"].reshape(w.shape), expected):
        raise ValueError(
            f"GGUF tensor {t.name}: the {grid} blocks differ from the fake-quant weight"
        )
    qtype = getattr(gguf.GGMLQuantizationType, grid.upper())
    return pack_kquant(params, grid).reshape(rows, -1), qtype, grid


def _write_vocab(writer: object, layout: GGUFLayout, tokenizer: Path | None) -> None:
    if tokenizer is not None:
        write_tokenizer(writer, tokenizer, layout.vocab_size)
    elif layout.vocab_size == 256:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(byte_tokens())
        writer.add_token_types([1] * 256)  # NORMAL
        writer.add_token_merges(["Ā ā"])  # one never-matching merge: the key must exist
    else:
        writer.add_tokenizer_model("no_vocab")
        log.warning(
            "GGUF: the model has no tokenizer and %d tokens (not bytes): the file is written "
            "with no vocabulary, which llama.cpp does not load; pass a Hugging Face folder "
            "with its tokenizer (export_gguf(..., tokenizer=<folder>))",
            layout.vocab_size,
        )


def _drop_tied_output(
    tensors: list[tuple[str, np.ndarray, object | None, str | None]], layout: GGUFLayout
) -> list[tuple[str, np.ndarray, object | None, str | None]]:
    """Leave ``output.weight`` out where llama.cpp reads ``token_embd`` in its place (module
    docstring of :mod:`qat.export.gguf_arch`)."""
    by_name = {t[0]: t for t in tensors}
    out, emb = by_name.get("output.weight"), by_name.get("token_embd.weight")
    if out is None or emb is None or not (layout.tied_output or layout.output_is_embedding):
        return tensors
    same = out[2] == emb[2] and np.array_equal(out[1], emb[1])
    if not same and layout.output_is_embedding:
        raise ValueError(
            f"GGUF {layout.arch}: llama.cpp uses token_embd as the output layer, but the "
            "trained output layer's weights differ from the embedding's: keep them tied "
            "(same weights, same grid: give the output layer the embedding's spec)"
        )
    return [t for t in tensors if t[0] != "output.weight"] if same else tensors


@torch.no_grad()
def export_gguf(
    model: nn.Module,
    path: str | os.PathLike[str],
    name: str = "qat",
    tokenizer: str | os.PathLike[str] | None = None,
) -> Path:
    """Write ``model`` (a prepared qat ``gpt`` or a Hugging Face causal LM of a family in
    :data:`~qat.export.gguf_arch.GGUF_FAMILIES`) as a GGUF file.

    Args:
        model: the prepared (fake-quant) model.
        path: the file to write.
        name: ``general.name``.
        tokenizer: a Hugging Face folder whose tokenizer the file embeds; None: the folder the
            model was loaded from (``config._name_or_path``) if it holds one, else a 256-token
            model gets byte tokens and any other ``no_vocab``.

    Returns:
        The path written.

    Raises:
        ValueError: the model's architecture has no GGUF layout here, or a layer's weights
            are on a grid GGUF cannot store (both named).
    """
    import gguf

    layout = gguf_layout(copy.deepcopy(model).cpu().eval())
    tensors = _drop_tied_output([(t.name, *_tensor(t)) for t in layout.tensors], layout)
    folder = tokenizer_folder(model, tokenizer)
    grids = {grid for *_, grid in tensors if grid is not None}
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), layout.arch)
    writer.add_name(name)
    file_type = next((code for grid, code in _FILE_TYPE.items() if grid in grids), 0)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in layout.hparams.items():
        getattr(writer, f"add_{key}")(value)  # add_context_length, add_head_count, ...
    _write_vocab(writer, layout, folder)
    for tname, array, qtype, _ in tensors:
        if qtype is None:
            writer.add_tensor(tname, array)
        else:
            writer.add_tensor(tname, array, raw_dtype=qtype)
    # gguf-py logs "Writing the following files: <path>: n_tensors = ..." at INFO, and the path
    # is the export's staged temporary file, not the file the user gets: keep it out of the log.
    gguf_log = logging.getLogger(gguf.gguf_writer.__name__)
    level = gguf_log.level
    gguf_log.setLevel(max(level, logging.WARNING))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    finally:
        gguf_log.setLevel(level)
    return path
