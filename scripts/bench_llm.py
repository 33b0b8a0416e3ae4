"""ONNX Runtime latency of the gpt model: FP32 beside MatMulNBits 4-bit and dynamic int8.

Batch 1, one window of ``--seq`` tokens (128), every model in the same interleaved rounds
(``qat.export.bench.time_interleaved``: each round times each model once, the order rotating),
medians reported, with file sizes. The models:

- ``fp32``: the float model (``torch.onnx.export``);
- ``int4_w``: 4-bit weights per group of 32, float activations (quant=lm_w4g32): ``MatMulNBits``
  at accuracy level 0, the exact-dequantization kernel the parity checks verify;
- ``int4_q8``: the llama.cpp scheme (quant=lm_q4_0: Q4_0 weights, Q8_0 activation rounding as
  explicit float ops before each ``MatMulNBits``), what ``+experiment=gpt_int4`` exports;
- ``int4_acc4``: ``int4_w`` at accuracy level 4 (ONNX Runtime quantizes the activations to
  int8 per block itself; not the fake-quant model's arithmetic);
- ``int8_dyn``: quant=lm_w8da8, ``DynamicQuantizeLinear → MatMulInteger`` (fused into
  ``DynamicQuantizeMatMul``), what ``+experiment=gpt_w8a8`` exports;
- ``int4_q8_f32``, ``int8_dyn_f32``: the same with float32 islands (``export.float_islands=
  float32``: LayerNorm, attention and GELU in ONNX Runtime's float32 kernels; the default
  float64 islands are what makes the files bit-exact).

Timings do not depend on the weights' values, so by default the model is a fresh ``gpt``
quantized to nearest; ``--onnx NAME=PATH`` adds (or replaces) files of trained runs.

    python scripts/bench_llm.py [--rounds 9] [--threads 2] [--onnx int4_q8=<run>/export/model.onnx]
"""

from __future__ import annotations

import os

# Before torch / onnxruntime load OpenMP: idle workers sleep instead of spinning (see
# qat/export/bench.py) -- on a shared 2-core machine spinning threads steal the other runtime's.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRESETS = {"int4_w": "lm_w4g32", "int4_q8": "lm_q4_0", "int8_dyn": "lm_w8da8"}


def preset_recipe(name: str) -> dict[str, Any]:
    """``configs/quant/<name>.yaml`` as a recipe (composed by Hydra, as a run does)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"quant={name}"])
    data = OmegaConf.to_container(cfg.quant, resolve=True)
    return {k: v for k, v in data.items() if k not in ("enabled", "bits", "name")}


def build_files(out: Path, seq: int, model_kwargs: dict[str, Any]) -> dict[str, Path]:
    """The float and quantized ONNX files of a fresh gpt (weights quantized to nearest)."""
    import qat
    from qat.export.onnx.llm import build_lm_onnx, float_lm_onnx
    from qat.models import create_model
    from qat.quant.ptq import rtn

    torch.manual_seed(0)
    model = create_model("gpt", context_length=seq, **model_kwargs).eval()
    ids = torch.randint(0, model.vocab_size, (1, seq))
    files = {"fp32": out / "fp32.onnx"}
    files["fp32"].write_bytes(float_lm_onnx(model, ids))
    for name, preset in PRESETS.items():
        qmodel = qat.prepare(model, preset_recipe(preset), example_inputs=ids)
        qat.calibrate(qmodel, [ids], num_batches=1)  # the embedding tables' ranges
        rtn(qmodel)
        # (accuracy level, float islands): the default file, and the variants timed beside it.
        variants = {name: (None, None)}
        if name == "int4_w":
            variants["int4_acc4"] = (4, None)
        else:
            variants[f"{name}_f32"] = (None, "float32")
        for key, (level, islands) in variants.items():
            files[key] = out / f"{key}.onnx"
            proto = build_lm_onnx(qmodel.eval(), ids, accuracy_level=level, float_islands=islands)
            files[key].write_bytes(proto.SerializeToString())
    return files


def bench(files: dict[str, Path], seq: int, rounds: int, threads: int) -> dict[str, Any]:
    import numpy as np

    from qat.export.bench import time_interleaved
    from qat.export.onnx import make_session
    from qat.export.onnx.runtime import optimized_op_types

    ids = {"input_ids": np.random.default_rng(0).integers(0, 256, (1, seq), dtype=np.int64)}
    sessions = {n: make_session(p, threads=threads, spinning=False) for n, p in files.items()}
    fns = {n: (lambda s=s: s.run(None, ids)) for n, s in sessions.items()}
    latency = time_interleaved(fns, rounds=rounds, min_time=0.3)
    fp32 = latency.get("fp32")
    kernels = ("MatMulNBits", "DynamicQuantizeMatMul", "MatMulInteger", "MatMul")
    rows = {}
    for name, path in files.items():
        ops = optimized_op_types(path)
        rows[name] = {
            "latency_ms": latency[name] * 1000.0,
            "speedup_vs_fp32": None if fp32 is None else fp32 / latency[name],
            "size_bytes": path.stat().st_size,
            "size_fp32_vs": files["fp32"].stat().st_size / path.stat().st_size
            if "fp32" in files
            else None,
            "kernels": {k: ops[k] for k in kernels if ops.get(k)},
        }
    return {"batch": 1, "seq": seq, "rounds": rounds, "threads": threads, "models": rows}


def print_table(report: dict[str, Any]) -> None:
    print(
        f"ONNX Runtime, batch 1 x {report['seq']} tokens, {report['threads']} threads, "
        f"median of {report['rounds']} interleaved rounds"
    )
    print(f"{'model':<10} {'ms':>8} {'vs fp32':>8} {'MB':>7} {'size x':>7}  kernels")
    for name, r in report["models"].items():
        speed = f"{r['speedup_vs_fp32']:.2f}x" if r["speedup_vs_fp32"] else "-"
        ratio = f"{r['size_fp32_vs']:.2f}" if r["size_fp32_vs"] else "-"
        kernels = ", ".join(f"{k} {v}" for k, v in r["kernels"].items())
        print(
            f"{name:<10} {r['latency_ms']:>8.3f} {speed:>8} {r['size_bytes'] / 1e6:>7.3f} "
            f"{ratio:>7}  {kernels}"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--onnx", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        kwargs = {"d_model": args.d_model, "n_layers": args.layers}
        files = build_files(Path(tmp), args.seq, kwargs)
        for item in args.onnx:
            name, _, path = item.partition("=")
            if not path:
                parser.error(f"--onnx {item!r}: expected NAME=PATH")
            files[name] = Path(path)
        report = bench(files, args.seq, args.rounds, args.threads)
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
