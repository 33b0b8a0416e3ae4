"""Inference benchmark: ResNet-20 (CIFAR-style 3x32x32, 10 classes), float beside integer.

Prepares W8A8 (and W4A4 for the file-size figure), calibrates on digits resized to 32x32 (or
random data; accuracy is irrelevant here), exports with ``qat.export``, checks parity on the
calibration data, and prints, for batch 1 and 64, measured side by side in one process
(interleaved rounds, median):

- ONNX Runtime FP32 (float model exported to ONNX, BN folded) vs ONNX Runtime INT8 (QDQ);
- torch FP32 eager vs TorchScript INT8 (PyTorch quantized kernels), the same file loaded under
  the ``fbgemm`` engine (what the export verifies under) and under ``x86`` (PyTorch's default);
- file sizes: float ONNX, INT8 ONNX, INT4-packed ONNX.

Goals (DESIGN.md): ORT INT8 ≥ 3x ORT FP32 at batch 64; TorchScript INT8 ≥ 3.5x torch FP32
eager at batch 64; INT8 file ≈ 4x smaller than float, INT4 packed ≈ 8x.

Usage:
    python scripts/bench_inference.py [--rounds 7] [--threads 2 1] [--data digits|random]
        [--train-steps 40] [--out-dir DIR] [--json results.json]

The machine is shared and noisy: every figure is a median over interleaved rounds, and the
ratios (taken within one round) are what to read. Idle threads sleep rather than spin in both
runtimes (``OMP_WAIT_POLICY=PASSIVE`` for PyTorch, set below before torch is imported, and
``allow_spinning=0`` for ONNX Runtime): with spinning threads and another process on a core,
2-thread PyTorch ran 8x slower than 1-thread here.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch

import qat
from qat import snap_bias
from qat.export import benchmark_artifacts, export_model, verify_artifacts
from qat.export.onnx import export_float_onnx, optimized_op_types
from qat.models import create_model

# The engine the export verifies under first (qat.export.torchscript.ENGINE), then PyTorch's
# default: both load the same model.ts (bench_torchscript_engine.py compares them in depth).
TS_ENGINES = ("fbgemm", "x86")


def data_batches(kind: str, batch: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Digits resized to 3x32x32 (gray → RGB) with labels, or uniform noise (label 0)."""
    if kind == "random":
        g = torch.Generator().manual_seed(0)
        return [
            (torch.rand(batch, 3, 32, 32, generator=g), torch.zeros(batch, dtype=torch.long))
            for _ in range(8)
        ]
    from qat.data import DigitsDataModule

    dm = DigitsDataModule(batch_size=batch, image_size=32)
    dm.setup("fit")
    return [(x.repeat(1, 3, 1, 1).contiguous(), y) for x, y in dm.train_dataloader()]


def train_float(model: torch.nn.Module, batches: list, steps: int) -> None:
    """A few Adam steps, so the logits have margins and top-1 agreement means something (an
    untrained network ties its quantized logits, and argmax then breaks ties arbitrarily)."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for i in range(steps):
        x, y = batches[i % len(batches)]
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def quantized(model: torch.nn.Module, bits: int, batches: list[torch.Tensor]) -> torch.nn.Module:
    recipe = {"weight": {"bits": bits}, "activation": {"bits": bits}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = qat.prepare(model, recipe)
        qat.calibrate(q, batches)
    q.eval()
    snap_bias(q, batches[0][:8])  # the fake-quant model adds the int32 bias the runtimes add
    return q


def _kb(n: int) -> str:
    return f"{n / 1024:8.1f} KB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=[2])
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds per timing")
    parser.add_argument("--data", choices=("digits", "random"), default="digits")
    parser.add_argument("--train-steps", type=int, default=40, help="float steps (0: none)")
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the full results here")
    args = parser.parse_args()

    torch.manual_seed(0)
    float_model = create_model("resnet20", num_classes=10, in_channels=3, image_size=32).eval()
    data = data_batches(args.data)
    train_float(float_model, data, args.train_steps)
    batches = [x for x, _ in data[:4]]
    example = batches[0][:1]
    tmp = tempfile.TemporaryDirectory()
    out = args.out_dir or Path(tmp.name)

    t0 = time.perf_counter()
    q8 = quantized(float_model, 8, batches)
    w8 = export_model(q8, out / "w8a8", example)
    q4 = quantized(float_model, 4, batches)
    w4 = export_model(q4, out / "w4a4", example, targets=["onnx"])["onnx"]
    w4p = export_model(q4, out / "w4a4_int4", example, targets=["onnx"], int4_packed=True)["onnx"]
    fp32_onnx = export_float_onnx(float_model, out / "float.onnx", example)
    export_s = time.perf_counter() - t0

    parity = verify_artifacts(q8, w8, data[4:10])
    ops = optimized_op_types(w8["onnx"])
    sizes = {
        "float": fp32_onnx.stat().st_size,
        "int8": w8["onnx"].stat().st_size,
        "int4_as_int8": w4.stat().st_size,
        "int4_packed": w4p.stat().st_size,
    }

    print(
        f"ResNet-20 CIFAR (3x32x32, 10 classes), W8A8; export took {export_s:.1f}s; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
    )
    print(f"ORT optimized INT8 graph: {dict(sorted(ops.items()))}")
    for rt in ("torchscript", "onnx"):
        r = parity["runtimes"][rt]
        print(
            f"parity {rt:11s}: top-1 agreement {r['agreement']:.4%}, max |logit diff| "
            f"{r['max_diff_steps']:.2f} output steps ({parity['num_samples']} digits images)"
        )
    results = {}
    for threads in args.threads:
        result = benchmark_artifacts(
            w8,
            float_model,
            batches[0],
            batch_sizes=(1, 64),
            rounds=args.rounds,
            threads=threads,
            min_time=args.min_time,
            float_onnx_path=out / "float_bench.onnx",
            torchscript_engines=TS_ENGINES,
        )
        results[threads] = result
        _print_times(result, threads, args.rounds)
    _print_sizes(sizes)
    if args.json:
        payload = {
            "bench": {str(t): r for t, r in results.items()},
            "sizes_bytes": sizes,
            "parity": parity,
            "ort_ops": dict(ops),
        }
        args.json.write_text(json.dumps(payload, indent=2))


def _print_times(result: dict, threads: int, rounds: int) -> None:
    lat = {k: v["latency_ms"] for k, v in result["runtimes"].items()}
    print(f"-- {threads} thread(s), median of {rounds} interleaved rounds")
    for bs in ("1", "64"):
        ratio = lat["ort_fp32"][bs] / lat["onnx"][bs]
        goal = "   goal >= 3x" if bs == "64" else ""
        print(
            f"batch {bs:>2}: ORT FP32 {lat['ort_fp32'][bs]:8.2f} ms | ORT INT8 "
            f"{lat['onnx'][bs]:8.2f} ms | INT8 speedup {ratio:5.2f}x{goal}"
        )
    for engine in TS_ENGINES:
        name = "torchscript" if engine == TS_ENGINES[0] else f"torchscript_{engine}"
        for bs in ("1", "64"):
            ratio = lat["torch_fp32"][bs] / lat[name][bs]
            goal = "   goal >= 3.5x" if bs == "64" else ""
            print(
                f"batch {bs:>2}: torch FP32 eager {lat['torch_fp32'][bs]:8.2f} ms | TorchScript "
                f"INT8 ({engine:>6}) {lat[name][bs]:8.2f} ms | INT8 speedup {ratio:5.2f}x{goal}"
            )
    for bs in ("1", "64"):
        tput = {k: v["throughput"][bs] for k, v in result["runtimes"].items()}
        print(
            f"batch {bs:>2} throughput (img/s): "
            + ", ".join(f"{k} {v:,.0f}" for k, v in tput.items())
        )


def _print_sizes(sizes: dict[str, int]) -> None:
    print(
        f"size: float ONNX {_kb(sizes['float'])} | INT8 ONNX {_kb(sizes['int8'])} "
        f"({sizes['float'] / sizes['int8']:.2f}x smaller, goal ~4x) | INT4 packed ONNX "
        f"{_kb(sizes['int4_packed'])} ({sizes['float'] / sizes['int4_packed']:.2f}x smaller, "
        f"goal ~8x) | W4 as int8 ONNX {_kb(sizes['int4_as_int8'])}"
    )


if __name__ == "__main__":
    main()
