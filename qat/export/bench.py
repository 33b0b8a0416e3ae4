"""Latency, throughput and size of the exported models, float beside integer.

All runtimes are measured side by side in one process, interleaved: every round times each
runtime in turn (the order rotates from round to round), and the reported latency is the median
over rounds. Absolute times drift on a shared machine; ratios taken this way hold up.

Threads: PyTorch and ONNX Runtime get the same number of intra-op threads. Idle ONNX Runtime
workers do not spin (``spinning=False``), to match OpenMP's passive wait
(``OMP_WAIT_POLICY=PASSIVE``, which ``scripts/bench_inference.py`` sets before importing torch):
with spinning workers, whichever runtime ran last steals the cores of the next, and on this
shared 2-core machine a 2-thread torch model ran 8x slower than with one thread.

Runtimes:

- ``torch_fp32``: the float model, eager PyTorch;
- ``ort_fp32``: the float model exported to ONNX (eval mode: BN folded into the convs), ONNX
  Runtime CPU;
- one entry per artifact: ``torchscript`` (PyTorch quantized kernels), ``onnx`` (ONNX Runtime,
  QDQ fused into integer kernels), and any other ``onnx*`` artifact given (e.g. packed INT4).
"""

from __future__ import annotations

import copy
import io
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["benchmark_artifacts", "make_batch", "time_interleaved"]


def make_batch(example_input: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``batch_size`` samples built by repeating the example batch."""
    if not isinstance(example_input, torch.Tensor):
        raise ValueError("benchmark_artifacts takes one input tensor")
    n = example_input.shape[0]
    reps = -(-batch_size // n)
    x = example_input.repeat(reps, *([1] * (example_input.dim() - 1)))[:batch_size]
    return x.contiguous().float().cpu()


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    rounds: int = 7,
    min_time: float = 0.2,
    warmup: int = 2,
) -> dict[str, float]:
    """Median seconds per call of each function, measured interleaved.

    Args:
        fns: name → zero-argument callable.
        rounds: timed rounds; each round times every function once (rotating the order).
        min_time: each timing repeats the call until about this many seconds have passed.
        warmup: untimed calls per function first (allocations, lazy packing, thread pools).
    """
    names = list(fns)
    iters: dict[str, int] = {}
    for name in names:
        for _ in range(warmup):
            fns[name]()
        t0 = time.perf_counter()
        fns[name]()
        once = max(time.perf_counter() - t0, 1e-6)
        iters[name] = max(1, int(min_time / once))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fn, k = fns[name], iters[name]
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            samples[name].append((time.perf_counter() - t0) / k)
    return {name: statistics.median(v) for name, v in samples.items()}


def _torch_fn(module: Callable, x: torch.Tensor) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            return module(x)

    return run


def _ort_fn(session: Any, x: torch.Tensor) -> Callable[[], Any]:
    feeds = {session.get_inputs()[0].name: np.ascontiguousarray(x.numpy(), dtype=np.float32)}

    def run() -> Any:
        return session.run(None, feeds)

    return run


def benchmark_artifacts(
    artifacts: Mapping[str, str | Path],
    float_model: nn.Module | None,
    example_input: torch.Tensor,
    batch_sizes: Sequence[int] = (1, 64),
    rounds: int = 7,
    threads: int = 2,
    min_time: float = 0.2,
    float_onnx_path: str | Path | None = None,
    spinning: bool = False,
    torchscript_engines: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Time the float model and every exported artifact; report sizes and ratios.

    Args:
        artifacts: name → file from :func:`qat.export.export_model` (``torchscript``,
            ``onnx``; more ``onnx*`` / ``torchscript*`` keys are timed too).
        float_model: the float (unprepared) model, for the FP32 baselines (None: time the
            artifacts only).
        example_input: an input batch (its samples are repeated to each batch size).
        batch_sizes: batch sizes to time.
        rounds: interleaved rounds (the median is reported).
        threads: threads for PyTorch and ONNX Runtime (intra-op).
        min_time: seconds each timing lasts at least (short calls are repeated).
        float_onnx_path: where to write the float ONNX model (default: a temporary file).
        spinning: let idle ONNX Runtime workers spin (see the module docstring).
        torchscript_engines: PyTorch quantized engines to load each TorchScript artifact under
            (default: only the one the export verifies under, ``x86``); the first keeps the
            artifact's name, the others add ``_<engine>`` (``torchscript_fbgemm``), all timed in
            the same interleaved rounds.

    Returns:
        ``{"batch_sizes", "rounds", "threads", "runtimes": {name: {"size_bytes",
        "latency_ms": {bs: ms}, "throughput": {bs: images/s}}}, "ratios": {...}}`` with batch
        sizes as string keys (JSON-friendly); TorchScript entries also name their ``engine``.
        Ratios: ``speedup_ort_int8_vs_fp32``,
        ``speedup_torchscript_int8_vs_torch_fp32`` (and ``speedup_torchscript_<engine>_...``
        for the further engines; per batch size) and
        ``size_fp32_vs_<artifact>`` (float ONNX bytes / ONNX artifact bytes; float state-dict
        bytes / TorchScript bytes).
    """
    from qat.export.onnx import export_float_onnx, make_session
    from qat.export.torchscript import ENGINE, load_torchscript

    for bs in batch_sizes:
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
            raise ValueError(f"batch size {bs!r} is invalid: expected an int >= 1")
    if rounds < 1:
        raise ValueError(f"rounds={rounds!r} is invalid: expected >= 1")
    engines = list(torchscript_engines or [ENGINE])
    supported = torch.backends.quantized.supported_engines
    unknown = [e for e in engines if e not in supported]
    if unknown or len(set(engines)) != len(engines):
        raise ValueError(
            f"torchscript_engines={engines!r} is invalid: expected distinct engines of this "
            f"PyTorch build ({', '.join(supported)})"
        )
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    tmpdir = tempfile.TemporaryDirectory()
    sizes: dict[str, int] = {}
    loaders: dict[str, Any] = {}
    engine_of: dict[str, str] = {}
    try:
        if float_model is not None:
            float_model = copy.deepcopy(float_model).cpu().eval()
            fp32_path = Path(float_onnx_path or Path(tmpdir.name) / "float.onnx")
            export_float_onnx(float_model, fp32_path, make_batch(example_input, 1))
            buf = io.BytesIO()
            torch.save(float_model.state_dict(), buf)
            sizes["torch_fp32"] = len(buf.getvalue())
            sizes["ort_fp32"] = fp32_path.stat().st_size
            loaders["torch_fp32"] = ("torch", float_model)
            loaders["ort_fp32"] = ("ort", make_session(fp32_path, threads, spinning=spinning))
        for name, path in artifacts.items():
            sizes[name] = Path(path).stat().st_size
            if name.startswith("torchscript"):
                for i, engine in enumerate(engines):
                    key = name if i == 0 else f"{name}_{engine}"
                    sizes[key], engine_of[key] = sizes[name], engine
                    loaders[key] = ("torchscript", (path, engine))
            elif name.startswith("onnx"):
                loaders[name] = ("ort", make_session(path, threads, spinning=spinning))
            else:
                raise ValueError(f"unknown artifact {name!r}: expected torchscript* or onnx*")
        latency: dict[str, dict[str, float]] = {name: {} for name in loaders}
        for bs in batch_sizes:
            x = make_batch(example_input, bs)
            fns = {}
            for name, (kind, obj) in loaders.items():
                if kind == "torchscript":
                    # Loaded afresh for each batch size: the x86 engine's oneDNN convs keep the
                    # primitive of the first input shape they see, and a module first run at
                    # batch 64 ran batch 1 1.7x slower than one first run at batch 1.
                    obj = load_torchscript(obj[0], engine=obj[1])
                fns[name] = _ort_fn(obj, x) if kind == "ort" else _torch_fn(obj, x)
            for name, sec in time_interleaved(fns, rounds=rounds, min_time=min_time).items():
                latency[name][str(bs)] = sec * 1000.0
    finally:
        torch.set_num_threads(old_threads)
        tmpdir.cleanup()

    runtimes = {
        name: {
            "size_bytes": sizes[name],
            "latency_ms": latency[name],
            "throughput": {bs: int(bs) / (ms / 1000.0) for bs, ms in latency[name].items()},
            **({"engine": engine_of[name]} if name in engine_of else {}),
        }
        for name in loaders
    }
    ratios: dict[str, Any] = {}
    if "onnx" in latency and "ort_fp32" in latency:
        ratios["speedup_ort_int8_vs_fp32"] = {
            bs: latency["ort_fp32"][bs] / latency["onnx"][bs] for bs in latency["onnx"]
        }
    for name in ["torchscript"] + [f"torchscript_{e}" for e in engines[1:]]:
        if name in latency and "torch_fp32" in latency:
            ratios[f"speedup_{name}_int8_vs_torch_fp32"] = {
                bs: latency["torch_fp32"][bs] / latency[name][bs] for bs in latency[name]
            }
    for name in artifacts:
        # ONNX files against the float ONNX file, TorchScript against the float state dict.
        base = "ort_fp32" if name.startswith("onnx") else "torch_fp32"
        if base in sizes:
            ratios[f"size_fp32_vs_{name}"] = sizes[base] / sizes[name]
    return {
        "batch_sizes": [int(b) for b in batch_sizes],
        "rounds": rounds,
        "threads": threads,
        "runtimes": runtimes,
        "ratios": ratios,
    }
