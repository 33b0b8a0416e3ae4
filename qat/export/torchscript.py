"""TorchScript export: an integer model on PyTorch's quantized CPU kernels (x86 / fbgemm / onednn).

This is the only module of qat that depends on torch's quantized tensor ops
(``torch.ops.quantized.*``, ``torch.ao.nn.quantized``), which are deprecated upstream: the day
they go, this file goes, and nothing else changes.

How the integer model is built: a deep copy of the fake-quant model keeps its own ``forward``
(arbitrary Python), and each quantized layer is swapped for a module that runs the integer kernel
on quantized tensors (u8 activations with a zero point, s8 per-channel weights):

- conv / conv+BN(+ReLU) → ``quantized::conv2d`` / ``conv2d_relu`` with prepacked weights
  (folded, integer levels from :mod:`qat.export.convert`) and the trained float bias (see
  below);
- linear(+ReLU) → ``quantized::linear`` / ``linear_relu``;
- residual add(+ReLU) → ``quantized::add`` / ``add_relu``; concat → ``quantized::cat``;
- other layers (pooling, activations, skipped layers) → float islands: dequantize → float op →
  quantize, rounded as the fake quantizer rounds (exactly the fake-quant arithmetic);
- sub-8-bit grids live in u8 at their own levels: an integer clamp to the grid follows each
  requantization;
- the model input is quantized as the fake-quant input quantizer rounds; the output is
  dequantized.

Bias: these kernels add the trained float bias in their float requantization epilogue, unrounded
(ONNX's ``QLinearConv`` must round it to the int32 grid ``s_in · s_w``, which moves ~0.05% of conv
outputs across a rounding boundary at W8A8 and ~1.5% at W4A4 in our tests), so the TorchScript
model keeps it.

Grid-preserving ops in the forward (ReLU, max-pool, flatten, view, dropout) run on the quantized
tensors as they are. The result is traced with ``torch.jit.trace`` and loads with
``torch.jit.load`` in a process that never imports qat.

Engine: which quantized engine the model is built, loaded and verified under, and why:
:mod:`qat.export.torchscript_engine`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
from torch import nn

from qat.export.convert import convert, explicit_padding
from qat.export.ir import ActGrid, ConvertedModel, LayerDesc, keep_parameter_reads
from qat.export.lowering import lower
from qat.export.reference import float_forward
from qat.export.torchscript_engine import (
    ENGINE,
    deprecations_silenced,
    numerics_target,
    quantized_engine,
)
from qat.quant.grids import run_model
from qat.quant.prepare import remove_input_quant_hook, set_module

__all__ = [
    "ENGINE",
    "IntegerModel",
    "build_integer_model",
    "export_torchscript",
    "integer_ops",
    "load_torchscript",
    "numerics_target",
    "quantized_engine",
    "run_torchscript",
    "save_torchscript",
    "trace_integer_model",
]

#: The quantized ops an exported graph is expected to contain (for graph inspection).
QUANTIZED_OPS = (
    "quantized::conv2d",
    "quantized::conv2d_relu",
    "quantized::linear",
    "quantized::linear_relu",
    "quantized::add",
    "quantized::add_relu",
    "quantized::cat",
    "aten::quantize_per_tensor",
    "aten::_make_per_tensor_quantized_tensor",
)


def _quantize(x: torch.Tensor, grid: ActGrid, relu: bool = False) -> torch.Tensor:
    """``x`` on ``grid`` as a quint8 tensor, rounded as the fake quantizer rounds.

    Not ``quantize_per_tensor``: fbgemm's vector loop computes ``round(fl(x · (1/s) + z))``,
    one fused multiply-add, so where ``x · (1/s)`` lies just above a half level its sum with
    an odd zero point rounds onto the tie and then to the even level below (71 of 10⁶ outputs
    of DenseNet-121's first transition BatchNorm, 0.8% of its top-1). The fake quantizer
    rounds ``x · (1/s)`` first and adds ``z`` in integers: :meth:`ActGrid.quantize`.
    """
    levels = grid.quantize(x, relu)
    return torch._make_per_tensor_quantized_tensor(levels, grid.scale, grid.zero_point)


def _clamp(q: torch.Tensor, grid: ActGrid, relu: bool = False) -> torch.Tensor:
    """Integer clamp of a quint8 tensor to its grid's levels (sub-8-bit, ReLU), if needed.

    ``torch.clamp`` on a quantized tensor quantizes its bounds with the tensor's own qparams,
    so real bounds ``(level − z) · s`` give back the exact levels.
    """
    if not grid.needs_clamp(relu):
        return q
    lo, hi = grid.real_range(relu)
    return torch.clamp(q, lo, hi)


def _dequant(obj: Any) -> Any:
    # NCHW as in the fake-quant model: average pooling sums channels-last tensors (the convs'
    # output) in another order, which flipped an output level of ResNet-20 on 1 of 512 images.
    if isinstance(obj, torch.Tensor):
        return obj.dequantize().contiguous() if obj.is_quantized else obj
    if isinstance(obj, list | tuple):
        return type(obj)(_dequant(o) for o in obj)
    return obj


def _qweight(desc: LayerDesc) -> torch.Tensor:
    wd = desc.weight
    assert wd is not None
    if wd.per_channel:
        zeros = torch.zeros(wd.scale.numel(), dtype=torch.long)
        return torch._make_per_channel_quantized_tensor(
            wd.int_weight, wd.scale.double(), zeros, wd.axis
        )
    return torch._make_per_tensor_quantized_tensor(wd.int_weight, float(wd.scale[0]), 0)


class _IntConv(nn.Module):
    """Integer conv (+ReLU) on quint8 input, requantized to the layer's output grid.

    fbgemm computes in NHWC and returns channels-last tensors; passing them on as they are
    saves two layout changes per conv (~45% of ResNet-20's int8 time). ``contiguous=True``
    returns NCHW-contiguous outputs instead, for forwards that ``view`` conv outputs.
    """

    def __init__(self, desc: LayerDesc, contiguous: bool = False) -> None:
        super().__init__()
        assert desc.conv is not None and desc.output is not None
        c = desc.conv
        w = desc.weight.int_weight  # type: ignore[union-attr]
        pad = explicit_padding(desc)
        assert pad is not None and pad[:2] == pad[2:]
        cls = nniq.ConvReLU2d if desc.relu else nnq.Conv2d
        self.conv = cls(
            w.shape[1] * c["groups"],
            w.shape[0],
            c["kernel_size"],
            stride=c["stride"],
            padding=pad[:2],
            dilation=c["dilation"],
            groups=c["groups"],
            bias=desc.bias_int is not None,
        )
        self.conv.set_weight_bias(_qweight(desc), desc.float_bias)
        self.conv.scale = desc.output.scale
        self.conv.zero_point = desc.output.zero_point
        self.grid, self.relu = desc.output, desc.relu
        self.contiguous = contiguous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _clamp(self.conv(x), self.grid, self.relu)
        return y.contiguous() if self.contiguous else y


class _IntLinear(nn.Module):
    """Integer linear (+ReLU) on quint8 input, requantized to the layer's output grid."""

    def __init__(self, desc: LayerDesc) -> None:
        super().__init__()
        assert desc.output is not None
        w = desc.weight.int_weight  # type: ignore[union-attr]
        cls = nniq.LinearReLU if desc.relu else nnq.Linear
        self.linear = cls(w.shape[1], w.shape[0], desc.bias_int is not None)
        self.linear.set_weight_bias(_qweight(desc), desc.float_bias)
        self.linear.scale = desc.output.scale
        self.linear.zero_point = desc.output.zero_point
        self.grid, self.relu = desc.output, desc.relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _clamp(self.linear(x), self.grid, self.relu)


class _IntAdd(nn.Module):
    """``quantized::add`` (``add_relu``) requantizing after the add, its inputs in one layout:
    on mixed layouts the add runs its scalar loop, which rounds otherwise than the vectorized
    kernel the fake-quant model reproduces (:func:`~qat.quant.runtime_add.quantized_add_levels`;
    FastViT: 52 of 3.1M outputs). ``contiguous=True``: NCHW outputs (for ``view``)."""

    def __init__(self, desc: LayerDesc, contiguous: bool = False) -> None:
        super().__init__()
        assert desc.output is not None
        self.grid, self.relu = desc.output, desc.relu
        self.contiguous = contiguous

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        op = torch.ops.quantized.add_relu if self.relu else torch.ops.quantized.add
        if a.dim() == 4 and b.dim() == 4:
            layout = torch.channels_last if _channels_last(a) else torch.contiguous_format
            a, b = a.contiguous(memory_format=layout), b.contiguous(memory_format=layout)
        y = _clamp(op(a, b, self.grid.scale, self.grid.zero_point), self.grid, self.relu)
        return y.contiguous() if self.contiguous else y


class _IntCat(nn.Module):
    """``quantized::cat``: inputs on different grids are requantized to the output grid."""

    def __init__(self, desc: LayerDesc) -> None:
        super().__init__()
        assert desc.output is not None
        self.grid, self.dim = desc.output, desc.dim

    def forward(self, tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        y = torch.ops.quantized.cat(list(tensors), self.dim, self.grid.scale, self.grid.zero_point)
        return _clamp(y, self.grid)


class _FloatIsland(nn.Module):
    """Dequantize → the layer's float computation → quantize to its output grid (or stay float).

    Used for pooling / activations (``QAct``), skipped layers (``FloatLayer``) and conv /
    linear layers whose weights are kept in float. Bitwise the fake-quant arithmetic.
    """

    def __init__(self, desc: LayerDesc, channels_last: tuple[bool, ...] = ()) -> None:
        super().__init__()
        self.desc = desc
        # The computation's own module (a LayerNorm, a FunctionalOp), registered so its
        # parameters travel with the model; not the fake-quant wrapper, whose quantizers the
        # island does not run and torch.jit.trace would script one by one (a third of
        # CoaT's 2,000 modules).
        inner = {"act": "act", "float": "module"}.get(desc.kind)
        if inner is not None and isinstance(getattr(desc.module, inner, None), nn.Module):
            self.module = getattr(desc.module, inner)
        self.channels_last = channels_last

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        args = tuple(
            a.contiguous(memory_format=torch.channels_last)
            if i < len(self.channels_last) and self.channels_last[i]
            else a
            for i, a in enumerate(_dequant(args))
        )
        y = float_forward(self.desc, *args, **_dequant(kwargs))
        if self.desc.output is None:
            return y
        return _quantize(y, self.desc.output)


def _channels_last(t: Any) -> bool:
    return (
        isinstance(t, torch.Tensor)
        and t.dim() == 4
        and not t.is_contiguous()
        and t.is_contiguous(memory_format=torch.channels_last)
    )


@torch.no_grad()
def _island_layouts(model: nn.Module, example_input: Any, names: list[str]) -> dict[str, tuple]:
    """Per layer, which positional inputs are channels-last in the fake-quant model.

    A float island computes on its input's memory layout: a GroupNorm (PoolFormer) or a sum
    over channels-last tensors (a conv fed by a permute hands them on) reduces in another
    order than over NCHW ones, and a last-ulp difference next to a half level moves an output
    level. The islands take the fake-quant model's layout.
    """
    ref = copy.deepcopy(model).cpu().eval()
    mods = dict(ref.named_modules())
    layouts: dict[str, tuple] = {}

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: tuple) -> None:
            layouts.setdefault(name, tuple(_channels_last(a) for a in args))

        return record

    handles = [mods[name].register_forward_pre_hook(hook(name)) for name in names]
    try:
        run_model(ref, example_input)
    finally:
        for h in handles:
            h.remove()
    return layouts


def _integer_layer(
    desc: LayerDesc, contiguous: bool, channels_last: tuple[bool, ...] = ()
) -> nn.Module:
    kind = lower(desc, "torchscript")
    if kind == "conv":
        return _IntConv(desc, contiguous)
    if kind == "linear":
        return _IntLinear(desc)
    if kind == "add":
        return _IntAdd(desc, contiguous)
    if kind == "cat":
        return _IntCat(desc)
    # Conv / linear with a float output or float weights, non-zero / asymmetric padding,
    # pooling, activations, skipped layers: exact float islands.
    return _FloatIsland(desc, channels_last)


class IntegerModel(nn.Module):
    """Quantize the input → the integer body → dequantize the output(s)."""

    def __init__(self, body: nn.Module, input_grid: ActGrid | None) -> None:
        super().__init__()
        self.body = body
        self.input_grid = input_grid

    def forward(self, *args: Any) -> Any:
        if self.input_grid is not None and args and isinstance(args[0], torch.Tensor):
            args = (_quantize(args[0], self.input_grid), *args[1:])
        return _dequant(self.body(*args))


def build_integer_model(
    model: nn.Module,
    example_input: Any,
    converted: ConvertedModel | None = None,
    engine: str = ENGINE,
) -> IntegerModel:
    """An eager integer model on torch's quantized kernels, equal to ``model`` within one step.

    Conv outputs stay channels-last (fbgemm's layout) unless the model's forward cannot take
    that (a ``view`` of a conv output): then they are made contiguous.

    Args:
        model: a prepared, calibrated / trained fake-quant model (left untouched).
        example_input: one batch (a tensor or a tuple of positional arguments).
        converted: the result of :func:`qat.export.convert.convert` for the same model and
            input, if already computed.
        engine: the quantized engine the layers pack their weights for (and so compute
            with, until the traced model is saved and loaded again).
    """
    if converted is None:
        converted = convert(model, example_input)
    layouts = _island_layouts(model, example_input, list(converted.layers))
    fast = _build(model, converted, contiguous=False, engine=engine, layouts=layouts)
    try:
        with torch.no_grad():
            fast(*_example_args(example_input))
        return fast
    except RuntimeError as err:
        if "view" not in str(err):
            raise
    return _build(model, converted, contiguous=True, engine=engine, layouts=layouts)


def _build(
    model: nn.Module,
    converted: ConvertedModel,
    contiguous: bool,
    engine: str,
    layouts: dict[str, tuple] | None = None,
) -> IntegerModel:
    body = copy.deepcopy(model).cpu().eval()
    remove_input_quant_hook(body)
    modules = dict(body.named_modules())
    # The integer layers pack their weights when built: under the engine, as a load would.
    with deprecations_silenced(), quantized_engine(engine):
        for name, desc in converted.layers.items():
            # The float islands compute with the copy's modules (never the caller's).
            desc = copy.copy(desc)
            desc.module = modules[name]
            layout = (layouts or {}).get(name, ())
            layer = _integer_layer(desc, contiguous, layout)
            set_module(body, name, keep_parameter_reads(modules[name], layer))
    return IntegerModel(body, converted.input).eval()


def _example_args(example_input: Any) -> tuple[Any, ...]:
    if isinstance(example_input, dict):
        raise ValueError("TorchScript export takes positional inputs (a tensor or a tuple)")
    return example_input if isinstance(example_input, tuple) else (example_input,)


@torch.no_grad()
def trace_integer_model(integer_model: IntegerModel, example_input: Any) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of an :class:`IntegerModel` (frozen control flow, fixed layers)."""
    args = _example_args(example_input)
    with deprecations_silenced():
        return torch.jit.trace(integer_model, args, check_trace=False)


@torch.no_grad()
def export_torchscript(
    model: nn.Module,
    path: str | Path,
    example_input: Any,
    converted: ConvertedModel | None = None,
) -> Path:
    """Build, trace and save the integer TorchScript model of ``model`` to ``path``.

    The caller (``qat.export.export_model``) writes to a temporary path and replaces the real
    file only after a smoke test.
    """
    integer_model = build_integer_model(model, example_input, converted)
    traced = trace_integer_model(integer_model, example_input)
    path = Path(path)
    save_torchscript(traced, path)
    return path


def save_torchscript(module: torch.jit.ScriptModule, target: str | Path | BinaryIO) -> None:
    """``torch.jit.save`` (a path or a binary file object)."""
    with deprecations_silenced():
        torch.jit.save(module, target if not isinstance(target, Path) else str(target))


def load_torchscript(path: str | Path | BinaryIO, engine: str = ENGINE) -> torch.jit.ScriptModule:
    """Load an exported model with ``torch.jit.load`` under a quantized engine.

    The engine matters only while loading (the weights are packed then); the caller's engine is
    restored before this returns. Without qat: set ``torch.backends.quantized.engine``, then
    ``torch.jit.load``.

    Args:
        path: the ``model.ts`` file (or a binary file object).
        engine: :data:`ENGINE` (``x86``) or ``fbgemm``; each is exact against the fake-quant
            model evaluated for it (:func:`numerics_target`). Warm an ``x86`` module up at the
            batch size it will serve (its oneDNN convs keep the primitive of the first input
            shape).

    Raises:
        RuntimeError: this PyTorch build has no such engine (the message lists the ones it has).
    """
    with deprecations_silenced(), quantized_engine(engine):
        source = str(path) if isinstance(path, str | Path) else path
        return torch.jit.load(source, map_location="cpu").eval()


def integer_ops(module: torch.jit.ScriptModule) -> list[str]:
    """Kinds of the ``quantized::*`` (and quantize) nodes in a traced model's inlined graph."""
    graph = module.inlined_graph
    return sorted({n.kind() for n in graph.nodes() if n.kind() in QUANTIZED_OPS})


def run_torchscript(module: torch.jit.ScriptModule, example_input: Any) -> Any:
    """Run a loaded TorchScript model on one batch (no grad)."""
    with torch.no_grad():
        return run_model(module, example_input)
