"""Where TorchScript INT8 and ONNX Runtime INT8 part ways: conv time per kind of conv.

``bench_inference.py`` times whole models; this script says which layers make the difference.
It exports one W8A8 model (ResNet-20, MobileNetV2 or ResNet-18, 3x32x32, as bench_inference
builds them), then, in interleaved rounds at one batch size:

- ONNX Runtime runs qat's ``model.onnx`` with its profiler on; each ``QLinearConv`` node's
  kernel time is read from the profile;
- the eager integer model that ``model.ts`` is a trace of (``build_integer_model``: the same
  ``quantized::conv2d`` calls on the same packed weights) runs under each quantized engine,
  each conv timed by forward hooks.

The convs are matched in execution order (the script checks that their channels agree) and
summed per kind: ``depthwise`` (groups = channels), ``1x1``, ``full`` (the rest). Median of the
rounds, milliseconds per batch, and each engine's ratio to ONNX Runtime.

    python scripts/bench_conv_layers.py [--model mobilenetv2|resnet20|resnet18] [--batch 64]
        [--threads 1] [--rounds 7] [--train-steps 40]

Both runtimes are in the same process and rounds, so machine noise hits them alike; read the
ratios. Timing hooks and the profiler add a little to every layer, alike for both.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_inference import digits_rgb, quantized, train_float
from torch import nn

from qat.export import export_model
from qat.export.bench import make_batch
from qat.export.torchscript import build_integer_model, quantized_engine
from qat.models import create_model

ENGINES = ("x86", "fbgemm")
KINDS = ("depthwise", "1x1", "full")


def conv_kind(conv: nn.Module) -> str:
    if conv.groups > 1 and conv.groups == conv.in_channels:
        return "depthwise"
    return "1x1" if tuple(conv.kernel_size) == (1, 1) else "full"


def timed_convs(model: nn.Module) -> tuple[list[nn.Module], list[list[float]]]:
    """The quantized convs of an integer model, in execution order, each timed by hooks."""
    convs: list[nn.Module] = []
    times: list[list[float]] = []

    def pre(module: nn.Module, _args: tuple) -> None:
        module._t0 = time.perf_counter()  # type: ignore[assignment]

    def post(module: nn.Module, _args: tuple, _out: torch.Tensor) -> None:
        if module not in convs:  # the first run records the order
            convs.append(module)
            times.append([])
        times[convs.index(module)].append(time.perf_counter() - module._t0)  # type: ignore[operator]

    for module in model.modules():
        if isinstance(module, torch.ao.nn.quantized.Conv2d):  # ConvReLU2d included
            module.register_forward_pre_hook(pre)
            module.register_forward_hook(post)
    return convs, times


def ort_conv_times(profile: Path, rounds: int) -> list[tuple[str, list[int], list[float]]]:
    """``(node, input shape, per-round seconds)`` of each ``QLinearConv``, in execution order."""
    events = json.loads(profile.read_text())
    nodes: dict[str, tuple[list[int], list[float]]] = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        if e["args"].get("op_name") != "QLinearConv":
            continue
        shape = next(iter(e["args"]["input_type_shape"][0].values()))
        nodes.setdefault(e["name"], (shape, []))[1].append(e["dur"] * 1e-6)
    return [(name, shape, ts[-rounds:]) for name, (shape, ts) in nodes.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("mobilenetv2", "resnet20", "resnet18"),
                        default="mobilenetv2")  # fmt: skip
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--train-steps", type=int, default=40, help="float steps (0: none)")
    args = parser.parse_args()
    missing = [e for e in ENGINES if e not in torch.backends.quantized.supported_engines]
    if missing:
        parser.error(f"this PyTorch build lacks the quantized engine(s) {missing}: x86 CPUs only")
    if args.batch < 1 or args.rounds < 1:
        parser.error("--batch and --rounds must be at least 1")
    import onnxruntime as ort

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    float_model = create_model(args.model, num_classes=10, in_channels=3, image_size=32).eval()
    data = digits_rgb()
    train_float(float_model, data, args.train_steps)
    calib = [x for x, _ in data[:4]]
    q = quantized(float_model, 8, calib)
    x = make_batch(calib[0], args.batch)

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_model(q, f"{tmp}/qat", calib[0][:1], targets=["onnx"])["onnx"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.enable_profiling = True
        opts.profile_file_prefix = f"{tmp}/ort"
        session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        feeds = {session.get_inputs()[0].name: x.numpy()}

        models, timers = {}, {}
        for engine in ENGINES:
            # Built on the timed batch: x86's oneDNN convs keep the first input shape's primitive.
            models[engine] = build_integer_model(q, x, engine=engine)
            timers[engine] = timed_convs(models[engine])

        def run_ts(engine: str) -> None:
            with torch.no_grad(), quantized_engine(engine):
                models[engine](x)

        runs = {"ort": lambda: session.run(None, feeds)}
        runs.update({engine: (lambda e=engine: run_ts(e)) for engine in ENGINES})
        wall: dict[str, list[float]] = {k: [] for k in runs}
        warmup = 2
        for r in range(warmup + args.rounds):
            for key, run in runs.items():
                t0 = time.perf_counter()
                run()
                if r >= warmup:
                    wall[key].append(time.perf_counter() - t0)
        ort_convs = ort_conv_times(Path(session.end_profiling()), args.rounds)

    convs = timers[ENGINES[0]][0]
    if len(ort_convs) != len(convs):
        raise SystemExit(f"{len(ort_convs)} QLinearConv nodes but {len(convs)} TorchScript convs")
    for i, ((_, shape, _), conv) in enumerate(zip(ort_convs, convs, strict=True)):
        if conv.in_channels not in (shape[1], shape[-1]):  # NCHW or ORT's NHWC
            raise SystemExit(f"conv {i}: ONNX input {shape}, TorchScript {conv}")
    # seconds[runtime][conv][round]
    seconds = {"ort": [ts for _, _, ts in ort_convs]}
    seconds.update({e: [ts[warmup:] for ts in timers[e][1]] for e in ENGINES})
    kinds = [conv_kind(conv) for conv in convs]

    def per_round(runtime: str, members: list[int]) -> list[float]:
        return [sum(seconds[runtime][i][r] for i in members) for r in range(args.rounds)]

    def print_row(label: str, n: int | str, rounds: dict[str, list[float]]) -> None:
        ms = {k: statistics.median(v) * 1e3 for k, v in rounds.items()}
        print(
            f"{label:<10}{n:>6}{ms['ort']:>9.2f}"
            + "".join(f"{ms[e]:>12.2f}{ms[e] / ms['ort']:>6.2f}x" for e in ENGINES)
        )

    print(
        f"{args.model} W8A8, batch {args.batch}, {args.threads} thread(s), median of "
        f"{args.rounds} interleaved rounds; ms per batch in each runtime's convs"
    )
    print(
        f"{'kind':<10}{'convs':>6}{'ORT':>9}"
        + "".join(f"{'TS ' + e:>12}{'/ORT':>7}" for e in ENGINES)
    )
    for kind in KINDS:
        members = [i for i, k in enumerate(kinds) if k == kind]
        if members:
            print_row(kind, len(members), {k: per_round(k, members) for k in seconds})
    every = list(range(len(convs)))
    conv_sums = {k: per_round(k, every) for k in seconds}
    print_row("all convs", len(convs), conv_sums)
    # The rest of each forward: other layers, the runtime's own overhead (and the timing's).
    other = {k: [w - c for w, c in zip(wall[k], conv_sums[k], strict=True)] for k in wall}
    print_row("other", "", other)
    print_row("model", "", wall)


if __name__ == "__main__":
    main()
