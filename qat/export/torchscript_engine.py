"""The quantized engine of the TorchScript export, and the numerics it verifies under.

Engine: ``torch.jit.load`` packs the saved weights for the ``torch.backends.quantized.engine``
set *when it loads*, and the engines round differently. ``fbgemm`` requantizes as ONNX Runtime
does, ``round(float32(acc + b/(s_in·s_w)) · M) + z``. The default ``x86`` engine, on a Linux CPU
with AVX-512 VNNI, runs convs of at most 100 groups on oneDNN, which applies the scales one by
one and adds the zero point before it rounds (:func:`qat.quant.numerics.onednn_levels`, matched
bit for bit on millions of near-tie outputs), so near-ties land one level apart (MobileNetV2
W4A4: 99.85% top-1 agreement with fbgemm's numerics); wider depthwise convs, linears, adds and
concats run as under ``fbgemm``. Each engine is exact against the fake-quant model evaluated
for it (:func:`qat.runtime_numerics` with the target :func:`numerics_target` names), and ``x86``
ran batch 64 faster (ResNet-20 1.9-4.3x, MobileNetV2 1.03-2.3x: docs/benchmarks.md). So :mod:`qat.export.torchscript` builds, loads and verifies under
:data:`ENGINE` (``x86``) and restores the caller's engine afterwards; ``fbgemm`` stays available
(``engine=``). Without qat, set the engine the model was verified under, then ``torch.jit.load``.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator

import torch
import torch.ao.nn.quantized as nnq

__all__ = [
    "ENGINE",
    "EXACT_ENGINES",
    "deprecations_silenced",
    "numerics_target",
    "quantized_engine",
]

#: The quantized engine the TorchScript model is built, verified and timed under (see above).
ENGINE = "x86"

#: The engines whose numerics the fake-quant model reproduces (:func:`numerics_target`).
EXACT_ENGINES = ("x86", "fbgemm")


@contextlib.contextmanager
def quantized_engine(name: str = ENGINE) -> Iterator[None]:
    """Set ``torch.backends.quantized.engine`` for a block; the previous engine comes back after.

    Raises:
        RuntimeError: this PyTorch build has no such engine (fbgemm needs an x86 CPU build).
    """
    supported = torch.backends.quantized.supported_engines
    if name not in supported:
        raise RuntimeError(
            f"PyTorch's quantized engine {name!r} is not in this build "
            f"(supported: {', '.join(supported)}): the TorchScript export runs on x86 CPUs "
            "(u8 activations × s8 weights on fbgemm); export onnx only (export.targets=[onnx])"
        )
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def numerics_target(engine: str = ENGINE) -> str:
    """The :func:`qat.runtime_numerics` target that computes what ``engine`` computes here:
    ``"torchscript_x86"`` where ``x86`` runs convs on oneDNN (a Linux CPU with AVX-512 VNNI),
    else ``"torchscript"`` (fbgemm's rounding).

    Raises:
        ValueError: ``engine`` is not one of :data:`EXACT_ENGINES`.
    """
    if engine not in EXACT_ENGINES:
        raise ValueError(f"engine={engine!r}: the fake-quant model reproduces only {EXACT_ENGINES}")
    return "torchscript_x86" if engine == "x86" and _x86_convs_on_onednn() else "torchscript"


@functools.cache
def _x86_convs_on_onednn() -> bool:
    """Asks the kernel rather than the CPU flags: one conv output lies on an exact tie
    (``acc · M = 1 · 1 · 1/2``) with zero point 1; oneDNN rounds ``0.5 + 1`` to 2, fbgemm
    ``round(0.5) + 1`` to 1."""
    with deprecations_silenced(), quantized_engine("x86"):
        conv = nnq.Conv2d(1, 1, 1, bias=False)
        conv.set_weight_bias(
            torch.quantize_per_tensor(torch.ones(1, 1, 1, 1), 1.0, 0, torch.qint8), None
        )
        conv.scale, conv.zero_point = 2.0, 1
        x = torch.quantize_per_tensor(torch.ones(1, 1, 1, 1), 1.0, 0, torch.quint8)
        return int(conv(x).int_repr().item()) == 2


@contextlib.contextmanager
def deprecations_silenced() -> Iterator[None]:
    """This file targets torch's deprecated quantized tensors and tracer on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message=".*torch.jit.(trace|save|load).* is deprecated.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield
