"""Inference benchmark: qat's integer models beside the runtimes' own quantizers.

For each model (ResNet-20, MobileNetV2, ResNet-18; CIFAR-style 3x32x32, 10 classes), trained a
few float steps on digits resized to 32x32 so that logits have margins, then quantized W8A8
(calibrated on the same 4 batches everywhere), timed side by side in one process (interleaved
rounds, medians) at batch 1 and 64:

- ``ort_fp32``: the float model in ONNX Runtime (BN folded);
- ``qat_ort_int8``: qat's ONNX export (QDQ, fused by ONNX Runtime into integer kernels);
- ``ort_quantize_static``: ONNX Runtime's own ``quantize_static`` on the float ONNX model (QDQ,
  u8 activations, s8 per-channel weights): the peer a user gets in one call;
- ``torch_fp32``: the float model in eager PyTorch;
- ``qat_ts_int8``: qat's TorchScript export (PyTorch INT8 kernels, the export's engine ``x86``;
  ``--ts-engines x86 fbgemm`` adds ``qat_ts_int8_fbgemm``, the same file loaded under fbgemm);
- ``torch_ao_fx_int8``: torch.ao FX post-training quantization (``fbgemm`` qconfig), scripted:
  the other peer.

Also: each ONNX model's optimized graph (which ops run on integer kernels, which in float),
qat's parity with its fake-quant model, the peers' top-1 agreement with the float model, and
the machine's ceiling: ONNX Runtime's u8 x s8 ``MatMulInteger`` against FP32 ``MatMul`` at
1024^3. Goals (issue "Integer models faster than the runtimes' own quantizers"): qat ORT INT8
>= 1.1x ``quantize_static`` at batch 64 on every model; on ResNet-18 its speedup over FP32 >=
80% of the GEMM ceiling; TorchScript INT8 at least as fast as qat ORT INT8 at batch 64.

Usage:
    python scripts/bench_inference.py [--models resnet20 mobilenetv2 resnet18] [--rounds 7]
        [--threads 2] [--train-steps 40] [--ts-engines x86 fbgemm] [--json results.json]

Read the ratios (taken within one round), not the absolute times: the machine is shared. Idle
threads sleep (``OMP_WAIT_POLICY=PASSIVE`` before torch loads, ``allow_spinning=0`` in ONNX
Runtime).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp

import argparse
import copy
import json
import platform
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

import qat
from qat.data import DigitsDataModule
from qat.export import export_model, verify_artifacts
from qat.export.bench import make_batch, time_interleaved
from qat.export.onnx import export_float_onnx, make_session
from qat.export.onnx.runtime import runtime_graph
from qat.export.torchscript import ENGINE, load_torchscript
from qat.export.torchscript_engine import EXACT_ENGINES
from qat.models import create_model

MODELS = ("resnet20", "mobilenetv2", "resnet18")
VARIANTS = (
    "ort_fp32",
    "qat_ort_int8",
    "ort_quantize_static",
    "torch_fp32",
    "qat_ts_int8",
    "torch_ao_fx_int8",
)


def digits_rgb(batch: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    dm = DigitsDataModule(batch_size=batch, image_size=32)
    dm.setup("fit")
    return [(x.repeat(1, 3, 1, 1).contiguous(), y) for x, y in dm.train_dataloader()]


def train_float(model: torch.nn.Module, data: list, steps: int) -> torch.nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for i in range(steps):
        x, y = data[i % len(data)]
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def quantized(model: torch.nn.Module, bits: int, calib: list[torch.Tensor]) -> torch.nn.Module:
    """A calibrated WbAb copy of ``model`` with its biases on the int32 grid."""
    recipe = {"weight": {"bits": bits}, "activation": {"bits": bits}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = qat.prepare(copy.deepcopy(model), recipe, example_inputs=calib[0][:2])
        qat.calibrate(q, calib)
    q.eval()
    qat.snap_bias(q, calib[0][:8])
    return q


def ort_quantize_static(float_onnx: Path, out: Path, calib: list[torch.Tensor]) -> Path:
    """ONNX Runtime's own post-training quantizer, as its docs configure it for x86 CPUs."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    input_name = make_session(float_onnx, threads=1).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{input_name: x.numpy()} for x in calib])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    quantize_static(
        str(float_onnx),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )
    return out


def torch_ao_fx(model: torch.nn.Module, calib: list[torch.Tensor]) -> Any:
    """torch.ao FX post-training INT8 (deprecated upstream; a peer only), traced and frozen."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "fbgemm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(
            copy.deepcopy(model).eval(), get_default_qconfig_mapping("fbgemm"), (calib[0],)
        )
        with torch.no_grad():
            for x in calib:
                prepared(x)
        converted = convert_fx(prepared)
        traced = torch.jit.trace(converted, calib[0][:1])
    return torch.jit.freeze(traced.eval())


def gemm_ceiling(threads: int, rounds: int, n: int = 1024) -> dict[str, float]:
    """ONNX Runtime u8 x s8 MatMulInteger vs FP32 MatMul at n^3: the CPU's integer ceiling."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w8 = numpy_helper.from_array(rng.integers(-127, 128, (n, n)).astype(np.int8), "w")
    w32 = numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "w")
    models = {}
    for name, a_type, w, op in (
        ("int8", TensorProto.UINT8, w8, "MatMulInteger"),
        ("fp32", TensorProto.FLOAT, w32, "MatMul"),
    ):
        out_type = TensorProto.INT32 if op == "MatMulInteger" else TensorProto.FLOAT
        graph = helper.make_graph(
            [helper.make_node(op, ["a", "w"], ["y"])],
            name,
            [helper.make_tensor_value_info("a", a_type, [n, n])],
            [helper.make_tensor_value_info("y", out_type, [n, n])],
            [w],
        )
        models[name] = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    feeds = {
        "int8": {"a": rng.integers(0, 256, (n, n)).astype(np.uint8)},
        "fp32": {"a": rng.standard_normal((n, n)).astype(np.float32)},
    }
    with tempfile.TemporaryDirectory() as tmp:
        fns = {}
        for name, model in models.items():
            path = Path(tmp) / f"{name}.onnx"
            onnx.save(model, str(path))
            sess = make_session(path, threads=threads, spinning=False)
            fns[name] = lambda s=sess, f=feeds[name]: s.run(None, f)
        t = time_interleaved(fns, rounds=rounds, min_time=0.3)
    return {"int8_ms": 1e3 * t["int8"], "fp32_ms": 1e3 * t["fp32"], "ratio": t["fp32"] / t["int8"]}


def top1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(1) == b.argmax(1)).float().mean())


def bench_model(name: str, data: list, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    float_model = create_model(name, num_classes=10, in_channels=3, image_size=32).eval()
    train_float(float_model, data, args.train_steps)
    calib = [x for x, _ in data[:4]]
    test = data[4:10]
    q = quantized(float_model, 8, calib)
    paths = export_model(q, out / "qat", calib[0][:1])
    ts_keys = _ts_keys(args.ts_engines)
    # Each TorchScript engine against the fake-quant numerics it computes (qat.export.verify).
    extra = {f"torchscript_{e}": paths["torchscript"] for e in args.ts_engines[1:]}
    parity = verify_artifacts(q, {**paths, **extra}, test)
    fp32 = export_float_onnx(float_model, out / "float.onnx", calib[0][:1])
    peer = ort_quantize_static(fp32, out / "ort_quantize_static.onnx", calib)
    fx = torch_ao_fx(float_model, calib)

    xs = torch.cat([x for x, _ in test])
    with torch.no_grad():
        ref = float_model(xs)
        peer_out = torch.from_numpy(_ort_run(make_session(peer, threads=args.threads), xs)()[0])
        fx_out = fx(xs)
    result: dict[str, Any] = {
        "parity": {k: v["agreement"] for k, v in parity["runtimes"].items()},
        "parity_max_abs_diff": {k: v["max_abs_diff"] for k, v in parity["runtimes"].items()},
        "agreement_with_float": {
            "qat_fake_quant": top1_agreement(q(xs), ref),
            "ort_quantize_static": top1_agreement(peer_out, ref),
            "torch_ao_fx_int8": top1_agreement(fx_out, ref),
        },
        "graphs": {
            "qat_ort_int8": runtime_graph(paths["onnx"]),
            "ort_quantize_static": runtime_graph(peer),
        },
        "sizes_bytes": {
            "ort_fp32": fp32.stat().st_size,
            "qat_ort_int8": paths["onnx"].stat().st_size,
            "ort_quantize_static": peer.stat().st_size,
            "qat_ts_int8": paths["torchscript"].stat().st_size,
        },
        "latency_ms": {},
    }
    torch.set_num_threads(args.threads)
    sessions = {
        "ort_fp32": make_session(fp32, threads=args.threads, spinning=False),
        "qat_ort_int8": make_session(paths["onnx"], threads=args.threads, spinning=False),
        "ort_quantize_static": make_session(peer, threads=args.threads, spinning=False),
    }
    for bs in args.batch_sizes:
        x = make_batch(calib[0], bs)
        fns = {k: _ort_run(s, x) for k, s in sessions.items()}
        for key, module in (("torch_fp32", float_model), ("torch_ao_fx_int8", fx)):
            fns[key] = _torch_run(module, x)
        for key, engine in ts_keys.items():
            # Loaded afresh per batch size: x86's oneDNN convs keep the first shape's primitive.
            ts = load_torchscript(paths["torchscript"], engine=engine)
            fns[key] = _torch_run(ts, x)
            fns[key]()
        keys = [k for k in VARIANTS if k != "qat_ts_int8"] + list(ts_keys)
        t = time_interleaved({k: fns[k] for k in keys}, rounds=args.rounds, min_time=0.3)
        result["latency_ms"][str(bs)] = {k: 1e3 * v for k, v in t.items()}
    return result


def _ts_keys(engines: list[str]) -> dict[str, str]:
    """Latency key → quantized engine: the first engine is ``qat_ts_int8``."""
    return {"qat_ts_int8" + ("" if i == 0 else f"_{e}"): e for i, e in enumerate(engines)}


def _ort_run(session: Any, x: torch.Tensor) -> Any:
    feeds = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feeds)


def _torch_run(module: Any, x: torch.Tensor) -> Any:
    def run() -> Any:
        with torch.no_grad():
            return module(x)

    return run


def ratios(lat: dict[str, float]) -> dict[str, float]:
    return {
        "qat_ort_vs_fp32": lat["ort_fp32"] / lat["qat_ort_int8"],
        "quantize_static_vs_fp32": lat["ort_fp32"] / lat["ort_quantize_static"],
        "qat_ort_vs_quantize_static": lat["ort_quantize_static"] / lat["qat_ort_int8"],
        "qat_ts_vs_torch_fp32": lat["torch_fp32"] / lat["qat_ts_int8"],
        "torch_ao_fx_vs_torch_fp32": lat["torch_fp32"] / lat["torch_ao_fx_int8"],
        "qat_ts_vs_qat_ort": lat["qat_ort_int8"] / lat["qat_ts_int8"],
        **{
            f"{k.replace('_int8', '')}_vs_qat_ort": lat["qat_ort_int8"] / lat[k]
            for k in lat
            if k.startswith("qat_ts_int8_")
        },
    }


def report(name: str, r: dict[str, Any], ceiling: float) -> None:
    print(f"\n== {name} W8A8 (3x32x32) ==")
    diffs = r["parity_max_abs_diff"]
    print(
        "parity with fake quant (top-1 agreement, max |logit diff|):",
        ", ".join(f"{k} {v:.2%} {diffs[k]:.2g}" for k, v in r["parity"].items()),
    )
    print(
        "top-1 agreement with the float model:",
        ", ".join(f"{k} {v:.2%}" for k, v in r["agreement_with_float"].items()),
    )
    for key, g in r["graphs"].items():
        print(f"{key} optimized graph: {g['ops']}; float ops: {g['float_ops'] or 'none'}")
    for bs, lat in r["latency_ms"].items():
        print(f"batch {bs}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in lat.items()))
        rt = ratios(lat)
        r.setdefault("ratios", {})[bs] = rt
        print("  ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in rt.items()))
    big = r["ratios"][max(r["latency_ms"], key=int)]
    print(
        f"  goals at the largest batch: qat ORT >= 1.1x quantize_static: "
        f"{big['qat_ort_vs_quantize_static']:.2f}x; TorchScript >= qat ORT: "
        f"{big['qat_ts_vs_qat_ort']:.2f}x; qat ORT vs FP32 = "
        f"{big['qat_ort_vs_fp32'] / ceiling:.0%} of the GEMM ceiling"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=40)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--ts-engines",
        nargs="+",
        default=[ENGINE],
        choices=EXACT_ENGINES,
        help="quantized engines to time qat's TorchScript under (the first is qat_ts_int8)",
    )
    args = parser.parse_args(argv)
    if len(set(args.ts_engines)) != len(args.ts_engines):
        parser.error(f"--ts-engines {args.ts_engines}: name each engine once")
    torch.set_num_threads(args.threads)
    data = digits_rgb()
    ceiling = gemm_ceiling(args.threads, args.rounds)
    print(
        f"{platform.processor() or platform.machine()}, {args.threads} threads, torch "
        f"{torch.__version__}; GEMM ceiling (ORT u8s8 MatMulInteger vs FP32 MatMul, 1024^3): "
        f"{ceiling['ratio']:.2f}x ({ceiling['int8_ms']:.1f} vs {ceiling['fp32_ms']:.1f} ms)"
    )
    results: dict[str, Any] = {"gemm_ceiling": ceiling, "models": {}, "threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            r = bench_model(name, data, args, Path(tmp) / name)
            report(name, r, ceiling["ratio"])
            results["models"][name] = r
    counts = Counter(
        op for r in results["models"].values() for op in r["graphs"]["qat_ort_int8"]["float_ops"]
    )
    print(f"\nfloat ops left in qat's ONNX graphs: {dict(counts) or 'none'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
