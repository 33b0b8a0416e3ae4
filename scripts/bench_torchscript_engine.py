"""TorchScript INT8 under PyTorch's two x86 quantized engines, each exact, side by side.

``qat.export`` builds, verifies and loads TorchScript under ``x86``; on a VNNI CPU its oneDNN
convs round some requantization near-ties one level the other way from ``fbgemm``, and the
fake-quant model reproduces each engine (``qat.runtime_numerics`` with the target
``qat.export.torchscript.numerics_target`` names; qat/export/torchscript.py). This script
exports one model, loads the same ``model.ts`` once under each engine (the weights are packed at
load time, so each module keeps its engine's kernels), and prints for each: top-1 agreement and
max logit difference with the fake-quant model evaluated for that engine, and latency at batch 1
and 64, timed interleaved in one process (median of rounds; ``qat.export.benchmark_artifacts``
loads each afresh per batch size), with the x86 / fbgemm ratio.

Usage:
    python scripts/bench_torchscript_engine.py [--model resnet20|mobilenetv2] [--bits 8 4]
        [--threads 1] [--rounds 7] [--train-steps 40]

Data: digits resized to 3x32x32 (see bench_inference.py). The machine is shared and noisy:
read the ratios, which come from the same rounds.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp

import argparse
import tempfile

import torch
from bench_inference import digits_rgb, quantized, train_float

import qat
from qat.export import benchmark_artifacts, export_model
from qat.export.torchscript import load_torchscript, numerics_target
from qat.models import create_model

ENGINES = ("fbgemm", "x86")  # the first keeps the artifact's name in benchmark_artifacts
NAMES = {"fbgemm": "torchscript", "x86": "torchscript_x86"}


def agreement(
    model: torch.nn.Module, runtime: torch.nn.Module, batches: list, engine: str
) -> tuple[float, float]:
    """Top-1 agreement of ``runtime`` with ``model`` evaluated as ``engine`` computes, and their
    max absolute logit difference."""
    same = total = 0
    diff = 0.0
    with torch.no_grad(), qat.runtime_numerics(model, target=numerics_target(engine)):
        for x in batches:
            ref, out = model(x), runtime(x)
            same += int((ref.argmax(1) == out.argmax(1)).sum())
            total += x.shape[0]
            diff = max(diff, float((ref - out).abs().max()))
    return same / total, diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("resnet20", "mobilenetv2"), default="resnet20")
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds per timing")
    parser.add_argument("--train-steps", type=int, default=40, help="float steps (0: none)")
    args = parser.parse_args()
    missing = [e for e in ENGINES if e not in torch.backends.quantized.supported_engines]
    if missing:
        parser.error(
            f"this PyTorch build lacks the quantized engine(s) {missing} "
            f"(it has {torch.backends.quantized.supported_engines}): run on an x86 CPU build"
        )
    for bits in args.bits:
        if not 2 <= bits <= 8:
            parser.error(f"--bits {bits} is invalid: expected 2..8")

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    kwargs = {"width_mult": 0.5} if args.model == "mobilenetv2" else {}
    float_model = create_model(
        args.model, num_classes=10, in_channels=3, image_size=32, **kwargs
    ).eval()
    data = digits_rgb()
    train_float(float_model, data, args.train_steps)
    calib = [x for x, _ in data[:4]]
    check = [x for x, _ in data[4:]]
    example = calib[0][:1]
    print(
        f"{args.model} (3x32x32, digits), TorchScript INT8, {args.threads} thread(s), median of "
        f"{args.rounds} interleaved rounds; engines {', '.join(ENGINES)}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for bits in args.bits:
            q = quantized(float_model, bits, calib)
            path = str(
                export_model(q, f"{tmp}/w{bits}", example, targets=["torchscript"])["torchscript"]
            )
            runtimes = {e: load_torchscript(path, engine=e) for e in ENGINES}
            for engine, rt in runtimes.items():
                agree, diff = agreement(q, rt, check, engine)
                n = sum(x.shape[0] for x in check)
                print(
                    f"W{bits}A{bits} {engine:>6}: agreement with fake-quant {agree:.2%} "
                    f"({n} images), max |logit diff| {diff:.4f}"
                )
            bench = benchmark_artifacts(
                {"torchscript": path},
                None,
                calib[0],
                rounds=args.rounds,
                threads=args.threads,
                min_time=args.min_time,
                torchscript_engines=ENGINES,
            )
            lat = {e: bench["runtimes"][name]["latency_ms"] for e, name in NAMES.items()}
            for bs in ("1", "64"):
                print(
                    f"W{bits}A{bits} batch {bs:>2}: "
                    + " | ".join(f"{e} {lat[e][bs]:8.2f} ms" for e in ENGINES)
                    + f" | x86 / fbgemm {lat['x86'][bs] / lat['fbgemm'][bs]:.2f}x"
                )


if __name__ == "__main__":
    main()
