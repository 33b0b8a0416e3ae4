"""ONNX export of quantized language models for ONNX Runtime's 4-bit and dynamic int8 kernels.

Each quantized linear layer becomes, from its trained quantizers (:mod:`qat.export.lm_weights`):

- per-group weights of 2–8 bits (4-bit groups, GGUF's Q4_0 / Q8_0 blocks): ``MatMulNBits``
  (``com.microsoft``): codes stored unsigned with the default zero point ``2^(b−1)``, one float
  scale per block (``block_size`` = the group size), so ORT dequantizes exactly the fake-quant
  weight. After Q8_0 activations it runs at ``accuracy_level=4``: its int8 kernel quantizes
  the input per block of 32 with the scale ``amax/127``, the Q8_0 grid, after one rescale of
  each block that makes that scale Q8_0's fp16 ``d``
  (:func:`~qat.export.onnx.llm_inputs.q8_0_rescale_ops`); after ``lm_w4a8``'s int8 blocks
  (float32 scale ``amax/127``: the kernel's own grid) at level 4 with nothing before it; the
  bias is the kernel's input. After float activations at
  ``accuracy_level=0`` (float32);
- 8-bit per-channel weights with per-token symmetric int8 activations (``lm_w8da8``): each
  row's codes ``round(x / s_x)`` (``s_x = max|x| / 127``) plus 128 as uint8, ``MatMulInteger``
  with zero point 128 (ONNX Runtime's u8 × s8 GEMM, exact int32 sums), then ``· s_x · s_w``;
- 8-bit per-channel weights with per-tensor dynamic uint8 activations:
  ``DynamicQuantizeLinear → MatMulInteger → Cast → Mul(s_x · s_w)``, the pattern ONNX Runtime
  fuses into ``DynamicQuantizeMatMul``;
- other per-channel weights: ``DequantizeLinear`` of int8 codes → ``MatMul``.

Other dynamic activations (torchao's 8da4w per token) are emitted as the float ops of
:mod:`qat.quant.dynamic` (min / max reductions, ``Div``, ``Round``), op for op what the
fake-quant model computes, then the layer's weight op. Quantized embeddings are int8 codes
times their block scales, then ``Gather``. Everything else (residual adds, reshapes) is the
model's own float code, exported by ``torch.onnx.export(dynamo=False)``, which calls these
layers' ``symbolic``.

Float islands (LayerNorm, attention, GELU: a ``QAct`` with a float output) come two ways.
``float_islands="float32"`` (the default): the ops ONNX Runtime fuses (``LayerNormalization``
at opset 17, ``FastGelu``, ``MultiHeadAttention``: :mod:`qat.export.onnx.llm_fused`), fast,
agreeing with the fake-quant model to the statistical contract of :mod:`qat.export.verify_lm`
on every CPU. ``"float64"`` (an opt-in): islands in float64 rounded to float32
(:mod:`qat.quant.float_island`) and the Q8_0 rounding as explicit float ops, which the
fake-quant model evaluated under :func:`qat.runtime_numerics` computes bit for bit
(:mod:`qat.quant.runtime_matmul`); 2–3x slower, often slower than the float file
(docs/design.md says why it is not the default).
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from dataclasses import dataclass
from typing import Any

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from qat.export.lm_io import LogitsModule
from qat.export.lm_weights import QuantWeight, quant_weight, weighted_layers
from qat.export.onnx.emit import _const, _tracing_off
from qat.export.onnx.llm_fused import MS_DOMAIN, fused_ops
from qat.export.onnx.llm_inputs import dynamic_ops, q8_0_rescale_ops, token_int8_ops
from qat.export.onnx.passes import bias_into_matmulnbits, compact_names
from qat.quant.blocks import GGUF_BLOCK
from qat.quant.dynamic import dynamic_quantize
from qat.quant.float_island import to_float64
from qat.quant.layers import QAct, QEmbedding
from qat.quant.prepare import set_module
from qat.quant.quantizer import FakeQuantizer
from qat.quant.runtime_matmul import int8_activations, int8_blocks, ort_linear_kind
from qat.quant.spec import QuantSpec

__all__ = [
    "FLOAT_ISLANDS",
    "ISLANDS_KEY",
    "LM_OPSET",
    "build_lm_onnx",
    "float_lm_onnx",
    "linear_kinds",
]

LM_OPSET = 17
#: How float islands compute (:func:`build_lm_onnx`), and the metadata key that records it.
FLOAT_ISLANDS = ("float64", "float32")
ISLANDS_KEY = "qat.float_islands"
_MS = MS_DOMAIN


@dataclass
class _Linear:
    """What one linear layer exports as (a plain object: it travels through the tracer)."""

    kind: str  # "nbits", "dynamic_int8", "token_int8" or "dq_matmul"
    weight: QuantWeight
    bias: torch.Tensor | None
    act: QuantSpec | None  # dynamic activation spec, or None (float input)
    accuracy_level: int
    # Activations left to MatMulNBits' int8 kernel (accuracy level 4), which quantizes its
    # input per block itself, instead of explicit float ops before it: Q8_0 blocks after a
    # rescale to their fp16 scale (``rescale``), lm_w4a8's float32-scale blocks as they are.
    act_in_kernel: bool = False
    rescale: bool = False


def _kind(w: QuantWeight, act: QuantSpec | None) -> str:
    k = w.codes.shape[1]
    int8 = int8_activations(act)
    if int8 and w.group == k and w.bits == 8 and w.grid == "affine":
        return int8
    if w.group < k and w.bits in (4, 8) and w.group >= 16:
        return "nbits"
    return "dq_matmul"


def _act_spec(layer: nn.Module) -> QuantSpec | None:
    aq = getattr(layer, "act_quant", None)
    if isinstance(aq, FakeQuantizer) and aq.enabled and bool(aq.fake_quant_enabled):
        return aq.spec
    return None


def _pack(w: QuantWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """MatMulNBits' ``B`` ``(N, blocks, group·bits/8)`` uint8 and scales ``(N, blocks)``."""
    n, k = w.codes.shape
    offset = 1 << (w.bits - 1)
    u = (w.codes + offset).to(torch.uint8).reshape(n, k // w.group, w.group)
    if w.bits == 4:
        u = u[..., 0::2] | (u[..., 1::2] << 4)
    return u.contiguous(), w.scales.float().contiguous()


def _emit_linear(g: Any, plan: _Linear, x: Any) -> Any:
    w = plan.weight
    n, k = w.codes.shape
    if plan.act_in_kernel:
        x = q8_0_rescale_ops(g, x) if plan.rescale else x
    elif plan.act is not None and plan.kind not in ("dynamic_int8", "token_int8"):
        x = dynamic_ops(g, x, plan.act, k)
    if plan.kind == "nbits":
        packed, scales = _pack(w)
        y = g.op(
            f"{_MS}::MatMulNBits",
            x,
            _const(g, packed),
            _const(g, scales),
            K_i=k,
            N_i=n,
            bits_i=w.bits,
            block_size_i=w.group,
            accuracy_level_i=plan.accuracy_level,
        )
        _set_type(y, x, n)
    elif plan.kind == "token_int8":
        # fl(fl(acc)·s_x)·s_w, two Muls ONNX Runtime leaves unfused: its MatMulIntegerToFloat
        # rounds another way, and these two are the same on every CPU (runtime_matmul).
        xq, xs = token_int8_ops(g, x, plan.act)
        codes = _const(g, w.codes.t().to(torch.int8).contiguous())
        acc = g.op("MatMulInteger", xq, codes, _const(g, torch.tensor(128, dtype=torch.uint8)))
        y = g.op("Mul", g.op("Cast", acc, to_i=1), xs)
        y = g.op("Mul", y, _const(g, w.scales.reshape(-1).float()))
    elif plan.kind == "dynamic_int8":
        xq, xs, xz = g.op("DynamicQuantizeLinear", x, outputs=3)
        codes = _const(g, w.codes.t().to(torch.int8).contiguous())
        acc = g.op("MatMulInteger", xq, codes, xz)
        scale = g.op("Mul", xs, _const(g, w.scales.reshape(-1).float()))
        y = g.op("Mul", g.op("Cast", acc, to_i=1), scale)
    else:
        # Cast · scale rather than DequantizeLinear: ORT rewrites DQ → MatMul into its own
        # MatMulNBits, which did not reproduce the dequantized weight here.
        codes = _const(g, w.codes.to(torch.int8).reshape(n, k // w.group, w.group))
        wt = g.op("Mul", g.op("Cast", codes, to_i=1), _const(g, w.scales.float()[..., None]))
        wt = g.op("Reshape", wt, _const(g, torch.tensor([n, k], dtype=torch.int64)))
        y = g.op("MatMul", x, g.op("Transpose", wt, perm_i=[1, 0]))
    if plan.bias is not None:
        y = g.op("Add", y, _const(g, plan.bias))
    return y


def _set_type(y: Any, x: Any, n: int) -> None:
    """Give a contrib op's output its type (the exporter cannot infer it for MatMulNBits)."""
    try:
        sizes = x.type().varyingSizes()
        y.setType(x.type().with_sizes([*sizes[:-1], n]))
    except (RuntimeError, AttributeError, TypeError):  # unknown input shape: leave it untyped
        pass


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, plan: _Linear, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        with _tracing_off():
            if plan.act is not None:
                x = dynamic_quantize(x, plan.act)
            return F.linear(x, plan.weight.weight, plan.bias)

    @staticmethod
    def symbolic(g: Any, plan: _Linear, x: Any) -> Any:
        return _emit_linear(g, plan, x)


class _EmbeddingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, w: QuantWeight, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        with _tracing_off():
            return F.embedding(ids, w.weight)

    @staticmethod
    def symbolic(g: Any, w: QuantWeight, ids: Any) -> Any:
        rows, dim = w.codes.shape
        codes = w.codes.to(torch.int8).reshape(rows, dim // w.group, w.group)
        scaled = g.op(
            "Mul",
            g.op("Cast", _const(g, codes), to_i=1),
            _const(g, w.scales.float()[..., None]),
        )
        table = g.op("Reshape", scaled, _const(g, torch.tensor([rows, dim], dtype=torch.int64)))
        return g.op("Gather", table, ids, axis_i=0)


class _ExportLinear(nn.Module):
    def __init__(self, plan: _Linear) -> None:
        super().__init__()
        self.plan = plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LinearFn.apply(self.plan, x)


class _ExportIsland(nn.Module):
    """A float island (a :class:`~qat.QAct` with a float output) in float64, rounded to float32:
    ``Cast(double) → the op's own ONNX ops → Cast(float)``, as the reference computes it under
    :func:`qat.runtime_numerics` (:mod:`qat.quant.float_island`)."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.act = act.double()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args = tuple(to_float64(a) for a in args)
        out = self.act(*args, **{k: to_float64(v) for k, v in kwargs.items()})
        return out.float() if isinstance(out, torch.Tensor) else out


class _ExportEmbedding(nn.Module):
    def __init__(self, weight: QuantWeight) -> None:
        super().__init__()
        self.qweight = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return _EmbeddingFn.apply(self.qweight, ids)


def linear_kinds(model: nn.Module) -> dict[str, str]:
    """How each quantized layer exports: ``nbits``, ``dynamic_int8``, ``token_int8``,
    ``dq_matmul``, ``gather``."""
    kinds = {}
    for name, layer in weighted_layers(model):
        if isinstance(layer, QEmbedding):
            kinds[name] = "gather"
        else:
            kinds[name] = _kind(quant_weight(layer, name), _act_spec(layer))
    return kinds


def _check_activations(model: nn.Module) -> None:
    for name, q in model.named_modules():
        if not isinstance(q, FakeQuantizer) or q.role != "activation" or not q.enabled:
            continue
        if q.spec.dynamic == "none" and bool(q.fake_quant_enabled) and q.is_initialized:
            raise ValueError(
                f"quantizer {name!r} has a static activation grid: the language-model exporters "
                "take weight-only or dynamic-activation recipes (quant=lm_*); static grids "
                "export through the classification targets (torchscript, onnx)"
            )


@torch.no_grad()
def build_lm_onnx(
    model: nn.Module,
    example_ids: torch.Tensor,
    opset: int = LM_OPSET,
    accuracy_level: int | None = None,
    float_islands: str | None = None,
) -> onnx.ModelProto:
    """The ONNX model of a quantized language model (module docstring), input ``input_ids``
    ``(batch, sequence)`` int64, output ``logits``; checked with ``onnx.checker``.

    Args:
        model: a prepared model with weight-only or dynamic-activation quantizers (unchanged).
        example_ids: token ids ``(B, T)`` for tracing (both dimensions stay dynamic).
        opset: the ONNX opset (13–20; ``ReduceMax`` with axis attributes needs ≤ 17).
        accuracy_level: ``MatMulNBits``' compute type. None (the default): per layer, the one
            that computes the fake-quant model's arithmetic: 4 (int8) where the activations
            are Q8_0 blocks, else 0 (float32 on the exact dequantized weights). 0 or 4 sets
            it for every layer (0 after Q8_0 activations keeps their rounding as float ops).
        float_islands: ``"float32"`` (None: the default): LayerNorm, attention and GELU in
            ONNX Runtime's fused float32 kernels, Q8_0 activations quantized by
            ``MatMulNBits``' int8 kernel (module docstring): fast, and statistically the
            fake-quant model. ``"float64"``: the bit-exact file (islands in float64, the Q8_0
            rounding as explicit float ops), which the fake-quant model reproduces under
            :func:`qat.runtime_numerics` (``DynamicQuantizeMatMul`` files on every x86 CPU,
            ``MatMulNBits`` ones on AVX-512 VNNI); 2–3x slower. Recorded in the file's
            metadata (``qat.float_islands``), which :func:`~qat.export.verify_lm_artifacts`
            reads to pick the reference.

    Raises:
        ValueError: an unprepared model, a static activation grid, or a weight whose codes do
            not reproduce the fake-quant weight.
    """
    if not weighted_layers(model):
        raise ValueError(
            "no quantized linear / embedding layer found: prepare the model with an LM recipe "
            "(qat.prepare(model, recipe)) and calibrate it before exporting"
        )
    if opset > LM_OPSET:
        raise ValueError(f"opset={opset} is invalid: 13–{LM_OPSET} (ReduceMax axes attribute)")
    if float_islands is None:
        float_islands = "float32"
    if float_islands not in FLOAT_ISLANDS:
        raise ValueError(f"float_islands={float_islands!r} is invalid: one of {FLOAT_ISLANDS}")
    deploy = copy.deepcopy(model).cpu().eval()
    _check_activations(deploy)
    for name, layer in weighted_layers(deploy):
        qw = quant_weight(layer, name)
        if isinstance(layer, QEmbedding):
            set_module(deploy, name, _ExportEmbedding(qw))
            continue
        act = _act_spec(layer)
        bias = None if layer.bias is None else layer.bias.detach().float().clone()
        kind = _kind(qw, act)
        q8_blocks = kind == "nbits" and act is not None and act.grid == "q8_0"
        q8_blocks = q8_blocks and qw.group == GGUF_BLOCK
        blocks = q8_blocks or (kind == "nbits" and int8_blocks(act, qw.group))
        exact = float_islands == "float64"
        level = accuracy_level
        if level is None:
            int8 = ort_linear_kind(layer) == "nbits_int8" if exact else blocks
            level = 4 if int8 else 0
        in_kernel = blocks and level == 4 and not exact
        plan = _Linear(kind, qw, bias, act, level, in_kernel, rescale=q8_blocks)
        set_module(deploy, name, _ExportLinear(plan))
    islands = [
        name
        for name, m in deploy.named_modules()
        if isinstance(m, QAct) and not m.output_quant.enabled
    ]
    for name in islands if float_islands == "float64" else []:
        set_module(deploy, name, _ExportIsland(deploy.get_submodule(name).act))
    wrapper = LogitsModule(deploy).eval()
    kinds = {m.plan.kind for m in deploy.modules() if isinstance(m, _ExportLinear)}
    fused = float_islands == "float32"
    custom = {_MS: 1} if "nbits" in kinds or fused else {}
    with fused_ops(deploy) if fused else contextlib.nullcontext():
        data = _export(wrapper, example_ids, opset, custom, fold=False)
    proto = onnx.load_from_string(data)
    bias_into_matmulnbits(proto.graph)
    onnx.helper.set_model_props(proto, {ISLANDS_KEY: float_islands})
    compact_names(proto.graph)  # the exporter's value names are a third of a small file
    onnx.checker.check_model(proto)
    return proto


def _export(
    wrapper: nn.Module, ids: torch.Tensor, opset: int, custom: dict[str, int], fold: bool
) -> bytes:
    buf = io.BytesIO()
    axes = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated
        torch.onnx.export(
            wrapper,
            (ids.detach().cpu().long(),),
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=["input_ids"],
            output_names=["logits"],
            dynamic_axes={"input_ids": axes, "logits": axes},
            custom_opsets=custom,
            # Not for quantized models: folding would store Cast(codes) · scales as float.
            do_constant_folding=fold,
        )
    return buf.getvalue()


@torch.no_grad()
def float_lm_onnx(model: nn.Module, example_ids: torch.Tensor, opset: int = LM_OPSET) -> bytes:
    """The float language model as ONNX bytes (the FP32 baseline of the benchmarks), its GELU
    and causal attention as ONNX Runtime's fused kernels, as in the quantized files
    (:func:`~qat.export.onnx.llm_fused.fused_ops`)."""
    deploy = copy.deepcopy(model).cpu().eval()
    wrapper = LogitsModule(deploy).eval()
    with fused_ops(deploy):
        data = _export(wrapper, example_ids, opset, {_MS: 1}, fold=True)
    proto = onnx.load_from_string(data)
    compact_names(proto.graph)  # as for the quantized files, so their sizes compare fairly
    return proto.SerializeToString()
