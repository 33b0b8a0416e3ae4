"""Straight-through fake quantization as vectorized autograd functions.

``fake_quantize(x, scale, zero_point, qmin, qmax)`` returns
``(clamp(round(x · (1/s)) + z, qmin, qmax) − z) · s`` with round half to even: bitwise what
``torch.fake_quantize_per_{tensor,channel}_affine`` and PyTorch's quantized CPU kernels compute
(they also multiply by the float32 reciprocal). Gradients follow the STE: ``∂x̂/∂x = 1`` where
``round(x/s) + z`` lies in ``[qmin, qmax]``, 0 outside.

Why not torch's fused kernels: on this project's CI CPU their per-element scalar loop ran
70–100x slower than a ReLU pass over the same tensor (8–12 ms vs 0.12 ms for a 2M-element
activation), which alone made W8A8 QAT steps ~1.8x the float step. These few vectorized ops keep
the exact same numerics and run at memory speed. A quantizer that observes its input in the
same call (training with live ranges) runs one fused kernel for both instead:
:mod:`qat.quant.fused_observer`; LSQ's learned scales are :mod:`qat.quant.lsq`.
"""

from __future__ import annotations

import os
import types
import warnings

import torch


def _broadcast(t: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """Per-channel ``(C,)`` parameters → a shape that broadcasts along ``axis`` of ``x``."""
    if axis is None:
        return t.reshape(())
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape)


def _alias(t: torch.Tensor, offset: int, shape: tuple, stride: tuple) -> torch.Tensor:
    """A tensor on ``t``'s storage that is not an autograd view of ``t``: Dynamo guards on a
    view's base (its rank, its strides), which would recompile the kernels per layer anyway.
    Only for kernels that record no autograd graph."""
    return t.new_empty(0).set_(t.untyped_storage(), offset, shape, stride)


def is_dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill a block of memory without gaps (any dimension order)."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t``, or, when it is a slice or an expanded tensor, a copy of it in the same dimension
    order (as an elementwise op's output would be laid out)."""
    return t if is_dense(t) else torch.empty_like(t).copy_(t)


def as_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Contiguous ``t`` as ``(rows, numel / rows)``, an alias rather than a view (see
    :func:`_alias`): the per-channel and per-row kernels' one rank whatever the layer."""
    k = t.numel() // rows
    return _alias(t, t.storage_offset(), (rows, k), (k, 1))


def memory_view(t: torch.Tensor) -> torch.Tensor:
    """A dense ``t``'s elements as a 1-D tensor in memory order, sharing its storage.

    Elementwise kernels and whole-tensor reductions give the same values on it; the compiled
    kernels then see one rank and stride whatever the model's shapes, instead of recompiling
    for each layer (and falling back to eager code past Dynamo's recompile limit, as a small
    ViT's did).
    """
    return _alias(t, t.storage_offset(), (t.numel(),), (1,))


def from_memory_view(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A fresh contiguous result (1-D, or the kernel's ``(C, K)`` rows) laid out as
    :func:`memory_view` read ``like``: ``like``'s shape and strides, as a tensor of its own (not
    a view that in-place ops on it would trip over)."""
    return _alias(flat, flat.storage_offset(), tuple(like.shape), like.stride())


def _in_range_mask(clamped: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The STE mask (1 where clamping changed nothing) as a float tensor, not bool.

    On CPU ``grad * bool_mask`` promotes element by element and ran ~10x slower than a float
    multiply (5.3 ms vs 0.5 ms on a 2M-element activation here), and a float-output ``eq`` is
    twice as fast as a bool one: the float mask's 4 bytes per element buy most of the speed.
    """
    return torch.eq(clamped, q, out=torch.empty_like(q))


def _fake_quant_levels(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: torch.Tensor,
    qmax: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, clamp(q))`` with ``q = round(x · (1/s)) + z``: one definition for every kernel, so
    the backward's recomputed mask is bitwise the forward's."""
    q = torch.round(x * (1.0 / scale)) + zero_point
    return q, torch.clamp(q, qmin, qmax)


#: The one-byte STE codes the fused forward kernels write for their backward: the gradient
#: passes where the code is ``STE_PASS``, is multiplied by 0 where the value was clipped
#: (``STE_CLIPPED``) and is exactly +0.0 where a ReLU folded into the quantizer zeroed it
#: (``STE_RELU_ZERO``, ReLU's own backward).
STE_RELU_ZERO, STE_PASS, STE_CLIPPED = 0, 1, 2


def _ste_codes(q: torch.Tensor, clamped: torch.Tensor) -> torch.Tensor:
    """:data:`STE_PASS` where clamping changed nothing, else :data:`STE_CLIPPED`, as float.

    Stored as ``uint8``: a float ``where`` cast to ``uint8`` is a vectorized store under
    Inductor, where a comparison cast to ``uint8`` or stored as bool ran 10-30x slower than the
    whole fake-quant loop on this CPU (torch 2.13).
    """
    return torch.where(clamped == q, float(STE_PASS), float(STE_CLIPPED))


def _fake_quant_values(x, scale, zero_point, qmin, qmax):  # type: ignore[no-untyped-def]
    """``(x̂, STE codes)``: one fused pass that writes 4 + 1 bytes per element; the kernel of
    the fused per-tensor path and of a ``torch.compile``d model (``scale`` / ``zero_point``
    broadcast against ``x``)."""
    q, clamped = _fake_quant_levels(x, scale, zero_point, qmin, qmax)
    return (clamped - zero_point) * scale, _ste_codes(q, clamped).to(torch.uint8)


def _fake_quant_only(x, scale, zero_point, qmin, qmax):  # type: ignore[no-untyped-def]
    """``x̂`` alone, for a backward that needs no codes (LSQ's recomputes from ``x``)."""
    _, clamped = _fake_quant_levels(x, scale, zero_point, qmin, qmax)
    return (clamped - zero_point) * scale


def _ste_grad(grad, codes):  # type: ignore[no-untyped-def]
    """The STE gradient from the forward's codes: ``grad · 1`` or ``grad · 0`` (bitwise the
    eager float-mask product), +0.0 where a folded ReLU zeroed the input. The codes are
    compared as floats: Inductor's ``uint8`` comparisons ran 30x slower than this loop."""
    c = codes.to(grad.dtype)
    g = grad * torch.where(c == STE_PASS, 1.0, 0.0)
    return torch.where(c == STE_RELU_ZERO, 0.0, g)


def _fake_quant_forward_eager(x, scale, zero_point, qmin, qmax):  # type: ignore[no-untyped-def]
    # The same arithmetic in place, for when torch.compile is off or unavailable.
    q = torch.mul(x, 1.0 / scale).round_().add_(zero_point)
    clamped = q.clamp(float(qmin), float(qmax))
    mask = _in_range_mask(clamped, q)
    return clamped.sub_(zero_point).mul_(scale), mask


def _fake_quant_values_eager(x, scale, zero_point, qmin, qmax):  # type: ignore[no-untyped-def]
    q = torch.mul(x, 1.0 / scale).round_().add_(zero_point)
    clamped = q.clamp(float(qmin), float(qmax))
    codes = _ste_codes(q, clamped).to(torch.uint8)
    return clamped.sub_(zero_point).mul_(scale), codes


def _fake_quant_only_eager(x, scale, zero_point, qmin, qmax):  # type: ignore[no-untyped-def]
    return _fake_quant_values_eager(x, scale, zero_point, qmin, qmax)[0]


def eager_kernel(fn):  # type: ignore[no-untyped-def]
    """``fn`` run as plain torch ops, recording no graph: the fallback of a compiled kernel
    whose ops are already functional (bitwise the compiled results)."""

    def run(*args):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            return fn(*args)

    return run


_ste_grad_eager = eager_kernel(_ste_grad)


def _compile(fn, serial: bool):  # type: ignore[no-untyped-def]
    """``torch.compile(fn, dynamic=True)``; ``serial``: compiled for one thread, from a copy of
    ``fn``'s code object, on which Dynamo keeps a cache of its own (the parallel compilation's
    guards would otherwise match and run it). Casts to fp16 round as eager ones do (GGUF's
    scales): by default Inductor skips a ``float → half → float`` round trip."""
    options = {"emulate_precision_casts": True}
    if not serial:
        return torch.compile(fn, dynamic=True, options=options)
    code = fn.__code__.replace(co_name=f"{fn.__name__}_serial")
    copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__)
    return torch.compile(copy, dynamic=True, options={**options, "cpp.threads": 1})


class _FusedKernels:
    """The per-tensor fake-quant forward and STE backward, each ``torch.compile``d once.

    Compiled, each is one loop over ``x`` instead of five passes, which is most of what keeps
    a W8A8 QAT step near the float step on CPU. The forward writes ``x̂`` and a one-byte STE
    code per element (:func:`_ste_codes`), and the backward reads the codes instead of ``x``:
    activations the size of a transformer's outlive the caches, so the backward's reads come
    from memory, and ``x`` itself need not be kept. If compiling fails, both fall back to the
    eager kernels for good (bitwise the same results). Set ``QAT_COMPILE=0`` to stay eager.
    """

    #: Below this many elements (weights, pooled features) a fused loop saves less than the
    #: compiled function's guard checks cost; those tensors stay eager.
    MIN_NUMEL = 1 << 16
    #: With OpenMP threads that sleep when idle (``OMP_WAIT_POLICY=PASSIVE``, as ``train.py``
    #: sets), inputs below this many elements run on one thread, whatever torch's thread
    #: count. Inductor's CPU kernel is one OpenMP region with a barrier after each of its loops
    #: (the reduction, the scale's arithmetic, the elementwise loop), and each barrier then
    #: waits for a thread to wake: below about this size the second thread costs more time than
    #: it saves (docs/design.md, "STE kernels"). Spinning threads (``ACTIVE``, or unset:
    #: OpenMP spins a while first) wake at once, and there one thread made no step faster.
    SERIAL_NUMEL = 1 << 20

    def __init__(self) -> None:
        self.failed = os.environ.get("QAT_COMPILE", "1") == "0"
        # OpenMP reads the policy when torch loads, before any of this runs.
        passive = os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"
        self.serial_numel = self.SERIAL_NUMEL if passive else 0
        self._compiled: dict[tuple[str, bool], object] = {}

    def takes(self, x: torch.Tensor, min_numel: int = MIN_NUMEL) -> bool:
        """Whether ``x`` takes the fused kernels (large enough, not being traced)."""
        return not (
            self.failed
            or x.numel() < min_numel
            or torch.jit.is_tracing()
            or torch.jit.is_scripting()
        )

    def run(self, fn, eager, *args):  # type: ignore[no-untyped-def]
        """``fn(*args)`` compiled (once per function and threading), or ``eager(*args)`` once
        that failed. ``args[0]`` is the tensor the kernel loops over: below ``serial_numel``
        elements (:attr:`SERIAL_NUMEL`, or 0) it runs the one-thread compilation of ``fn``."""
        if not self.failed:
            serial = torch.get_num_threads() > 1 and args[0].numel() < self.serial_numel
            compiled = self._compiled.get((fn.__name__, serial))
            if compiled is None:
                compiled = self._compiled[fn.__name__, serial] = _compile(fn, serial)
            try:
                return compiled(*args)  # type: ignore[operator]
            except Exception as err:  # e.g. no C++ compiler on this machine
                self.failed = True
                warnings.warn(
                    f"torch.compile of the fake-quant kernel failed ({type(err).__name__}); "
                    "using the eager kernel (same results, slower). Set QAT_COMPILE=0 to skip.",
                    stacklevel=3,
                )
        return eager(*args)

    def forward(self, x, scale, zero_point, qmin, qmax):  # type: ignore[no-untyped-def]
        """Per-tensor ``(x̂, codes)`` of a dense ``x`` (0-dim ``scale`` / ``zero_point``); the
        codes are 1-D, in ``x``'s memory order."""
        args = (memory_view(x), scale, zero_point, qmin, qmax)
        out, codes = self.run(_fake_quant_values, _fake_quant_values_eager, *args)
        return from_memory_view(out, x), codes

    def backward(self, grad, codes, layout):  # type: ignore[no-untyped-def]
        """The per-tensor STE gradient from 1-D ``codes`` of an input laid out as ``layout``."""
        return self.run_on_layout(_ste_grad, _ste_grad_eager, grad, layout, codes)

    def run_on_layout(self, fn, eager, grad, layout, *args):  # type: ignore[no-untyped-def]
        """``fn(grad, *args)`` for a per-tensor backward, on a 1-D memory view of ``grad`` laid
        out as the forward's input was (``layout``: its shape and strides; ``grad`` is first
        copied to it if it has another). The result, or the first of several, comes back in
        that layout."""
        shape, stride = layout
        if grad.stride() != stride:
            grad = grad.new_empty_strided(shape, stride).copy_(grad)
        out = self.run(fn, eager, memory_view(grad), *args)
        flat = out if isinstance(out, torch.Tensor) else out[0]
        aligned = _alias(flat, flat.storage_offset(), shape, stride)
        return aligned if isinstance(out, torch.Tensor) else (aligned, *out[1:])


fused = _FusedKernels()
#: Kept for callers of the old name (its ``MIN_NUMEL``).
fake_quant_forward = fused

_CONSTANTS: dict[tuple, tuple[torch.Tensor, ...]] = {}


def kernel_constants(
    values: tuple[float, ...], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """``values`` as 0-dim tensors, the form the fused kernels take their numbers in: a changed
    bit width or decay must not recompile them, and a number inlined as a constant can be
    folded (``+ 0``) or rewritten (a division into a reciprocal multiply). Cached per process
    outside compiled code (the kernels never write them), and made outside inference mode: a
    cache filled under it (Lightning's validation, BN re-estimation) would hand inference
    tensors to a later training step, which cannot save them for its backward."""
    if torch.compiler.is_compiling():
        return tuple(torch.tensor(float(v), dtype=dtype, device=device) for v in values)
    key = (values, dtype, device)
    constants = _CONSTANTS.get(key)
    if constants is None:
        with torch.inference_mode(False):
            constants = tuple(torch.tensor(float(v), dtype=dtype, device=device) for v in values)
        _CONSTANTS[key] = constants
    return constants


def _grid(qmin: int, qmax: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``qmin`` / ``qmax`` as 0-dim tensors of ``x``'s dtype (:func:`kernel_constants`)."""
    return kernel_constants((qmin, qmax), x.dtype, x.device)  # type: ignore[return-value]


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis):  # type: ignore[override]
        s = _broadcast(scale, x, axis)
        z = _broadcast(zero_point.to(x.dtype), x, axis)
        lo, hi = _grid(qmin, qmax, x)
        x = x.detach()
        per_tensor = s.dim() == 0 and z.dim() == 0
        ctx.fused = per_tensor and not torch.compiler.is_compiling() and fused.takes(x)
        if ctx.fused:
            x = dense(x)
            out, codes = fused.forward(x, s, z, lo, hi)
            ctx.layout = (tuple(x.shape), x.stride())
            ctx.save_for_backward(codes)
            return out
        ctx.compiled = torch.compiler.is_compiling()
        if ctx.compiled:
            # Inside a compiled model: the functional kernel, which the model's own graph
            # fuses (the eager one's in-place ops and float(qmin) would break that graph).
            out, codes = _fake_quant_values(x, s, z, lo, hi)
            ctx.save_for_backward(codes)
            return out
        out, mask = _fake_quant_forward_eager(x, s, z, lo, hi)
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.fused:
            grad_x = fused.backward(grad, *ctx.saved_tensors, ctx.layout)
        elif ctx.compiled:
            grad_x = _ste_grad(grad, *ctx.saved_tensors)
        else:
            (mask,) = ctx.saved_tensors
            grad_x = grad * mask
        return grad_x, None, None, None, None, None


class _ReLU(torch.autograd.Function):
    """``relu`` whose backward multiplies by ``sign(relu(x))`` instead of comparing: inside a
    compiled model the partitioner would otherwise save a bool mask, and Inductor's bool
    stores are slow (see :func:`_ste_codes`). The same gradient for every finite upstream
    gradient."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        y = torch.relu(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return grad * torch.sign(y)


def compiled_relu(x: torch.Tensor) -> torch.Tensor:
    """``relu(x)`` for code that runs inside ``torch.compile`` (:class:`_ReLU`)."""
    return _ReLU.apply(x)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> torch.Tensor:
    """Fake-quantize ``x`` with an STE (per-tensor when ``axis`` is None, else per channel).

    Args:
        x: float tensor.
        scale: ``(1,)`` or ``(C,)`` positive scales (no gradient flows to them).
        zero_point: ``(1,)`` or ``(C,)`` integer zero points (int or float dtype).
        qmin, qmax: the integer grid.
        axis: channel axis of ``x`` for per-channel parameters.
    """
    return _FakeQuantize.apply(x, scale.detach(), zero_point.detach(), qmin, qmax, axis)
