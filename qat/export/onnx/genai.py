"""ONNX Runtime GenAI folders (``export.targets=[genai]``): generation with a KV cache.

A Hugging Face causal LM trained with a weight-only, Q8_0-activation or dynamic int8 recipe
(tested: Llama, Mistral, Qwen2, Qwen3, Gemma; the builder fails on Phi-3) becomes the folder
``onnxruntime-genai`` loads (``og.Model(folder)``): ``model.onnx`` (+ ``model.onnx.data``)
with ``input_ids``, ``attention_mask``, ``past_key_values.N.key/value`` in and ``logits``,
``present.N.key/value`` out, ``genai_config.json`` and the tokenizer files.

The graph is onnxruntime-genai's own model builder's (``onnxruntime_genai.models.builder``, the
peer the issue measures against): fused ``GroupQueryAttention`` with rotary embeddings and a
shared KV buffer, ``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization``,
built at fp32 from the fake-quant weights (``codes · scales``, exact). Then every ``MatMul``
whose weight is one or more quantized layers side by side (the builder fuses q/k/v into one
``qkv_proj``) is replaced by the kernel of the trained grid, from the layers' own codes
(:func:`qat.export.lm_weights.quant_weight`), so the file computes what was trained, not the
builder's re-quantization (RTN) of the float weights:

- 4 / 8-bit weights per group (``lm_w4g32``, ``lm_q4_0`` …): ``MatMulNBits``, codes stored
  unsigned with the default zero point ``2^(b−1)``, one float scale per group. After float
  activations (weight-only recipes) at ``accuracy_level`` 0: float32 on the exact dequantized
  weights, what the model trained with. After Q8_0 activations (``lm_q4_0``, llama.cpp's
  scheme) at ``accuracy_level`` 4, ONNX Runtime's int8 kernel, the fast path on CPUs: it
  quantizes its input to int8 blocks of 32 with the scale ``amax / 127`` in float32, where
  Q8_0 stores it in fp16 (``d16``), so each block is first multiplied by ``d16 / d`` (``d16+``
  kinds, as :mod:`qat.export.onnx.llm` does), after which the kernel takes ``d16`` and the
  model's codes up to float32 rounding of the ratio: it agrees with the model to the verify
  contract, not bit for bit. ``q8_ops=True`` writes the fake-quant model's whole Q8_0
  rounding as float ops before it instead (the kernel re-quantizes those values to the same
  codes), exact up to summation order and slower. An explicit ``accuracy_level`` sets it for
  every grouped layer (4 on a weight-only model is faster and quantizes activations the model
  never saw: the verify step measures what that costs);
- 4-bit weights per group after int8 blocks of the group's size with a float32 scale
  (``lm_w4a8``): ``MatMulNBits`` at ``accuracy_level`` 4 with nothing before it, the kernel's
  own rounding of its input (the builder's int4 file's kernel, as fast);
- 8-bit per-channel weights after per-token symmetric int8 activations (``lm_w8da8``): each
  row's codes into ``MatMulInteger`` (u8 × s8, zero point 128), times the row's and the
  channel's scales, as :mod:`qat.export.onnx.llm` writes it; after per-tensor dynamic uint8
  activations: ``DynamicQuantizeMatMul``;
- other quantized weights (8-bit per channel with float activations): a float ``MatMul`` on the
  fake-quant weight (exact; not smaller).

Quantized embeddings are gathered from their fake-quant table. Other dynamic activation
grids (``lm_8da4w``'s asymmetric per-token int8) are refused.

The decode loop quantizes each call's input: a per-tensor dynamic recipe sees one token per
decode step, as the fake-quant model does when it generates with its KV cache
(:func:`greedy_tokens`), not the whole-sequence tensor of a training forward.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from qat.export.hf_checkpoint import HF_FILES, float_state_dict
from qat.export.lm_io import is_hf_model
from qat.export.lm_weights import QuantWeight, quant_weight, weighted_layers
from qat.export.onnx.genai_builder import builder_folder, builder_module
from qat.export.onnx.genai_inputs import NodeWriter, q8_0_input, token_int8_input
from qat.quant.layers import QEmbedding
from qat.quant.runtime_matmul import int8_blocks, ort_linear_kind

__all__ = [
    "GENAI_CONFIG",
    "build_genai_folder",
    "export_genai",
    "genai_layer_kinds",
]

GENAI_CONFIG = "genai_config.json"
#: The builder's CPU precisions used here (the peer's files and qat's fp32 base graph).
_MS = "com.microsoft"


def _dequantized_hf_folder(model: nn.Module, folder: Path, source_dir: Path | None) -> None:
    """``save_pretrained`` of ``model``'s architecture with its fake-quant weights (exact
    ``codes · scales``) and float everything else, plus the source folder's tokenizer."""
    import transformers

    state = float_state_dict(model)
    for name, layer in weighted_layers(model):
        state[f"{name}.weight"] = quant_weight(layer, name).weight
    config = copy.deepcopy(model.config)
    config.tie_word_embeddings = False  # a quantized lm_head is its own tensor
    config.use_cache = True
    with torch.device("cpu"):
        plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("inv_freq")]
    if missing or unexpected:
        raise ValueError(
            f"export target genai: the model's weights do not fit {type(plain).__name__} "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    plain.save_pretrained(folder)
    copied = 0
    if source_dir is not None and source_dir.is_dir():
        for fname in HF_FILES:
            if (source_dir / fname).is_file():
                shutil.copyfile(source_dir / fname, folder / fname)
                copied += fname.startswith("tokenizer")
    if not copied:
        raise ValueError(
            f"export target genai: no tokenizer in {source_dir} (the folder the model was loaded "
            "from): onnxruntime-genai needs tokenizer.json; pass source_dir=<a folder with it>"
        )


def genai_layer_kinds(
    model: nn.Module, accuracy_level: int | None = None, q8_ops: bool = False
) -> dict[str, str]:
    """How each quantized layer exports to the genai graph: ``nbits<bits>_g<group>_acc<level>``
    (``q8_0+`` in front: after the Q8_0 rounding ops, ``q8_ops``; ``d16+``: after the rescale
    to Q8_0's fp16 scale, module docstring), ``dynamic_int8``, ``float``
    (fake-quant weight) or ``gather``.

    Raises:
        ValueError: a layer quantizes its activations in a way no kernel here reproduces.
    """
    kinds = {}
    for name, layer in weighted_layers(model):
        if isinstance(layer, QEmbedding):
            kinds[name] = "gather"
            continue
        qw = quant_weight(layer, name)
        runtime = ort_linear_kind(layer)
        aq = getattr(layer, "act_quant", None)
        act_on = aq is not None and aq.enabled and bool(aq.fake_quant_enabled)
        q8 = act_on and aq.spec.grid == "q8_0"
        blocks = act_on and int8_blocks(aq.spec, qw.group)  # the kernel's own input grid
        if runtime in ("dynamic_int8", "token_int8"):
            kinds[name] = runtime
        elif act_on and not ((q8 or blocks) and _nbits_ok(qw)):
            raise ValueError(
                f"export target genai: layer {name!r} quantizes its inputs "
                f"(dynamic={aq.spec.dynamic}, grid={aq.spec.grid}), which the genai graph "
                "cannot reproduce: train with quant=lm_w4a8 (int4, int8 blocks), lm_w4g32 "
                "(int4 weight-only), lm_q4_0 (int4, Q8_0 activations) or lm_w8da8 (int8), or "
                "drop genai from export.targets"
            )
        elif _nbits_ok(qw):
            level = accuracy_level
            if level is None:
                level = 4 if q8 or blocks else 0
            ops = ""
            if q8 and q8_ops:
                ops = "q8_0+"
            elif q8 and level == 4:
                ops = "d16+"
            kinds[name] = f"{ops}nbits{qw.bits}_g{qw.group}_acc{level}"
        else:
            kinds[name] = "float"
    return kinds


def _nbits_ok(w: QuantWeight) -> bool:
    k = w.codes.shape[1]
    pow2 = w.group & (w.group - 1) == 0
    return w.bits in (4, 8) and 16 <= w.group < k and pow2 and k % w.group == 0


def _pack(w: QuantWeight) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits' ``B`` ``(N, blocks, group·bits/8)`` uint8 and scales ``(N·blocks,)``."""
    n, k = w.codes.shape
    u = (w.codes + (1 << (w.bits - 1))).to(torch.uint8).reshape(n, k // w.group, w.group)
    if w.bits == 4:
        u = u[..., 0::2] | (u[..., 1::2] << 4)
    return u.contiguous().numpy(), w.scales.float().reshape(-1).contiguous().numpy()


def _match(
    weight: np.ndarray, layers: list[tuple[str, QuantWeight]], used: set[str]
) -> list[tuple[str, QuantWeight]] | None:
    """The layers whose fake-quant weights, transposed and side by side, are ``weight``
    ``(K, N)`` bit for bit (the builder's fused q/k/v), or None."""
    k, n = weight.shape
    parts, col = [], 0
    while col < n:
        for name, qw in layers:
            rows = qw.weight.shape[0]
            if name in used or qw.weight.shape[1] != k or col + rows > n:
                continue
            wt = qw.weight.numpy().T
            if np.array_equal(weight[:, col], wt[:, 0]) and np.array_equal(
                weight[:, col : col + rows], wt
            ):
                parts.append((name, qw))
                col += rows
                break
        else:
            return None
    return parts


def _rewrite_matmuls(
    proto: onnx.ModelProto, model: nn.Module, kinds: Mapping[str, str]
) -> dict[str, str]:
    """Replace each builder ``MatMul`` on quantized layers' weights with their kernel (module
    docstring). Returns ``MatMul node → kind``; raises if a quantized layer found no node."""
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    layers = [
        (name, quant_weight(layer, name))
        for name, layer in weighted_layers(model)
        if not isinstance(layer, QEmbedding)
    ]
    used: set[str] = set()
    done: dict[str, str] = {}
    q8: dict[str, Any] = {}
    new_nodes = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            new_nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        parts = _match(weight, layers, used) if weight.ndim == 2 else None
        part_kinds = {kinds[name] for name, _ in parts or []}
        if not parts or len(part_kinds) != 1 or part_kinds == {"float"}:
            new_nodes.append(node)  # a float layer, or mixed grids: the fake-quant weight
            used.update(name for name, _ in parts or [])
            continue
        used.update(name for name, _ in parts)
        kind = part_kinds.pop()
        new_nodes += _kernel(node, [qw for _, qw in parts], kind, graph, q8)
        graph.initializer.remove(inits.pop(node.input[1]))
        done[node.name] = kind
    missing = [name for name, _ in layers if name not in used]
    if missing:
        raise ValueError(
            f"export target genai: no MatMul of the builder's graph holds layer(s) "
            f"{missing[:4]}: this architecture's layout is not supported"
        )
    del graph.node[:]
    graph.node.extend(new_nodes)
    return done


def _kernel(
    node: onnx.NodeProto, parts: list[QuantWeight], kind: str, graph: Any, q8: dict[str, Any]
) -> list[onnx.NodeProto]:
    """The quantized node(s) that replace ``node`` (``MatMul(x, W)``); ``q8``: input → its
    quantization already in the graph (gate and up read one input: quantized once)."""
    base = node.input[1]
    n = sum(int(p.codes.shape[0]) for p in parts)
    k = int(parts[0].codes.shape[1])
    if kind in ("dynamic_int8", "token_int8"):
        codes = torch.cat([p.codes for p in parts]).t().to(torch.int8).contiguous().numpy()
        scales = torch.cat([p.scales.reshape(-1) for p in parts]).float().numpy()
        graph.initializer.extend(
            [
                numpy_helper.from_array(codes, f"{base}_s8"),
                numpy_helper.from_array(scales, f"{base}_scale"),
            ]
        )
        if kind == "token_int8":
            # As qat.export.onnx.llm writes it: fl(fl(acc)·s_x)·s_w, the same on every CPU.
            x, nodes = node.input[0], []
            if x not in q8:
                q8[x], nodes = token_int8_input(x, f"{node.name}/int8", graph)
            codes_u8, row_scale, zero = q8[x]
            w = NodeWriter(f"{node.name}_I8", graph, nodes)
            acc = w.op("Cast", w.op("MatMulInteger", codes_u8, f"{base}_s8", zero), to=1)
            scaled = w.op("Mul", acc, row_scale)
            nodes.append(helper.make_node("Mul", [scaled, f"{base}_scale"], list(node.output)))
            return nodes
        return [
            helper.make_node(
                "DynamicQuantizeMatMul",
                [node.input[0], f"{base}_s8", f"{base}_scale"],
                list(node.output),
                name=f"{node.name}_DQ8",
                domain=_MS,
            )
        ]
    bits, group = parts[0].bits, parts[0].group
    level = int(kind.rsplit("acc", 1)[1])
    x, nodes = node.input[0], []
    if "+" in kind and x in q8:
        x = q8[x]
    elif "+" in kind:
        explicit = kind.startswith("q8_0+")
        q8[x], nodes = q8_0_input(x, f"{node.name}/q8_0", graph, explicit)
        x = q8[x]
    packed = [_pack(p) for p in parts]
    b = np.concatenate([p[0] for p in packed])
    s = np.concatenate([p[1] for p in packed])
    graph.initializer.extend(
        [
            numpy_helper.from_array(b, f"{base}_Q{bits}"),
            numpy_helper.from_array(s, f"{base}_scales"),
        ]
    )
    return [
        *nodes,
        helper.make_node(
            "MatMulNBits",
            [x, f"{base}_Q{bits}", f"{base}_scales"],
            list(node.output),
            name=f"{node.name}_Q{bits}",
            domain=_MS,
            K=k,
            N=n,
            bits=bits,
            block_size=group,
            accuracy_level=level,
        ),
    ]


@torch.no_grad()
def build_genai_folder(
    model: nn.Module,
    out_dir: str | Path,
    source_dir: str | Path | None = None,
    accuracy_level: int | None = None,
    q8_ops: bool = False,
) -> dict[str, Any]:
    """Write the genai folder of a quantized Hugging Face causal LM into ``out_dir``.

    Args:
        model: a prepared, calibrated (trained) ``transformers`` causal LM (unchanged).
        out_dir: the folder to fill (created).
        source_dir: the folder with its tokenizer (default: ``model.config._name_or_path``,
            the folder ``model=hf`` loaded).
        accuracy_level: ``MatMulNBits``' compute type for every grouped layer; None: per layer
            (:func:`genai_layer_kinds`).
        q8_ops: after Q8_0 activations, write the fake-quant model's Q8_0 rounding as float
            ops before each kernel (the file then computes the model's arithmetic up to
            summation order, at about half the speed: docs/benchmarks.md). False: the int8
            kernel quantizes its float input to blocks of 32 itself, with the same
            ``amax / 127`` scale kept in float32 rather than rounded to fp16.

    Returns:
        ``{"nodes": MatMul node → kind, "layers": layer → kind}``.

    Raises:
        ValueError: not a Hugging Face model, no quantized layer, an unsupported activation
            recipe or architecture, no tokenizer, or no onnxruntime-genai.
    """
    if not is_hf_model(model):
        raise ValueError(
            f"export target genai needs a Hugging Face causal LM (model=hf), not "
            f"{type(model).__name__}: use export.targets=[onnx] for qat's own models"
        )
    if not weighted_layers(model):
        raise ValueError("export target genai: no layer has quantized weights (quant=lm_*)")
    if accuracy_level is not None and accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level={accuracy_level!r} is invalid: 0, 1, 2, 3 or 4")
    model = model.cpu().eval()
    kinds = genai_layer_kinds(model, accuracy_level, q8_ops)
    builder_module()  # fail before any work when it is missing
    source = Path(source_dir or getattr(model.config, "_name_or_path", "") or ".")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(tmp) / "hf"
        _dequantized_hf_folder(model, hf, source)
        built = builder_folder(hf, Path(tmp) / "genai", "fp32")
        proto = onnx.load(str(built / "model.onnx"))
        nodes = _rewrite_matmuls(proto, model, kinds)
        for f in built.iterdir():
            if f.name not in ("model.onnx", "model.onnx.data"):
                shutil.copyfile(f, out_dir / f.name)
        onnx.save(proto, str(out_dir / "model.onnx"))
    return {"nodes": nodes, "layers": kinds}


def export_genai(
    model: nn.Module,
    out_dir: str | Path,
    source_dir: str | Path | None = None,
    accuracy_level: int | None = None,
    q8_ops: bool = False,
) -> Path:
    """:func:`build_genai_folder` into ``out_dir``; returns it."""
    build_genai_folder(model, out_dir, source_dir, accuracy_level, q8_ops)
    return Path(out_dir)
