"""ONNX Runtime prompt latency of a language model: FP32 beside dynamic int8 and 4-bit.

Batch 1, one prompt of ``--seq`` tokens (128), every file in the same interleaved rounds
(``qat.export.bench.time_interleaved``: each round times each file once, the order rotating),
medians reported, with file sizes and the kernels ONNX Runtime ran; beside the wall clock at
``--threads``, the thread CPU time of a single-threaded session (:func:`cpu_times`), which a
machine shared with other jobs disturbs far less. The files, each the
fast export of its preset (:func:`qat.export.onnx.llm.build_lm_onnx` with
``float_islands="float32"``: fused float32 islands):

- ``fp32``: the float model (``torch.onnx.export``);
- ``int8_dyn``: quant=lm_w8da8, per-token int8 codes → ``MatMulInteger`` (u8 × s8), what
  ``+experiment=gpt_w8a8`` exports;
- ``int4_a8``: quant=lm_w4a8 (4-bit groups, int8 activation blocks: ``MatMulNBits`` at accuracy
  level 4 with nothing before it), what ``+experiment=hf_w4a8_ort`` exports;
- ``int4_q8``: the llama.cpp scheme (quant=lm_q4_0: Q4_0 weights, Q8_0 activations quantized
  by ``MatMulNBits``' int8 kernel, accuracy level 4), what ``+experiment=gpt_int4`` exports;
- ``int4_w``: 4-bit weights per group of 32, float activations (quant=lm_w4g32): ``MatMulNBits``
  at accuracy level 0;
- with ``--exact``, also ``int8_dyn_f64`` and ``int4_q8_f64``: the bit-exact opt-in files of
  the dynamic presets (``export.float_islands=float64``: float64 islands, explicit Q8_0
  rounding).

The model: ``--model gpt`` (a fresh ``gpt``, ``--d-model`` / ``--layers``) or ``--model hf
--path <folder>`` (a Hugging Face causal LM saved with ``save_pretrained``, e.g. the Llama of
``scripts/make_hf_llama.py``). Timings do not depend on the weights' values, so the weights are
quantized to nearest; ``--onnx NAME=PATH`` adds (or replaces) files of trained runs.

The report is a list of sections, each a table of rows with the same columns
(:func:`table`); a new measurement adds a section. Generation with a KV cache (decode
tokens/s) and onnxruntime-genai's builder files beside qat's: ``scripts/bench_genai.py``.

    python scripts/bench_llm.py [--model hf --path models/stdlib-llama-33m] [--rounds 9]
        [--threads 2] [--exact] [--onnx int4_q8=<run>/export/model.onnx]
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: File name → the quant preset it is the default (fast) export of.
PRESETS = {"int8_dyn": "lm_w8da8", "int4_a8": "lm_w4a8", "int4_q8": "lm_q4_0", "int4_w": "lm_w4g32"}
#: With ``--exact``: the bit-exact (float64) files of the presets with dynamic activations.
EXACT = {"int8_dyn_f64": "lm_w8da8", "int4_q8_f64": "lm_q4_0"}
#: The weight kernels a table names (ONNX Runtime's names after its graph optimizations).
KERNELS = (
    "MatMulNBits",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
    "MatMulInteger",
    "MatMul",
)
#: A table's columns: (header, row key, format, width); a row without the key shows "-".
COLUMNS = (
    ("ms", "latency_ms", "{:.3f}", 9),
    ("vs fp32", "speedup_vs_fp32", "{:.2f}x", 8),
    ("cpu ms 1t", "cpu_ms_1t", "{:.3f}", 10),
    ("vs fp32", "cpu_speedup_vs_fp32", "{:.2f}x", 8),
    ("MB", "size_bytes", "{:.3f}", 8),
    ("size x", "size_fp32_vs", "{:.2f}", 7),
)


def preset_recipe(name: str) -> dict[str, Any]:
    """``configs/quant/<name>.yaml`` as a recipe (composed by Hydra, as a run does)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"quant={name}"])
    data = OmegaConf.to_container(cfg.quant, resolve=True)
    return {k: v for k, v in data.items() if k not in ("enabled", "bits", "name")}


def float_model(model: str, seq: int, path: str | None, d_model: int, layers: int) -> Any:
    """The float model to quantize: a fresh ``gpt`` or a Hugging Face folder's."""
    if model == "hf":
        from qat.models.hf import load_hf_causal_lm

        return load_hf_causal_lm(str(path)).eval()
    from qat.models import create_model

    torch.manual_seed(0)
    return create_model("gpt", context_length=seq, d_model=d_model, n_layers=layers).eval()


def vocab_size(model: Any) -> int:
    config = getattr(model, "config", None)
    return int(config.vocab_size if config is not None else model.vocab_size)


def build_files(out: Path, model: Any, seq: int, exact: bool = False) -> dict[str, Path]:
    """The float and quantized ONNX files of ``model`` (weights quantized to nearest)."""
    import qat
    from qat.export.onnx.llm import build_lm_onnx, float_lm_onnx
    from qat.quant.ptq import rtn

    ids = torch.randint(0, vocab_size(model), (1, seq), generator=torch.Generator().manual_seed(0))
    files = {"fp32": out / "fp32.onnx"}
    files["fp32"].write_bytes(float_lm_onnx(model, ids))
    variants = [(name, preset, "float32") for name, preset in PRESETS.items()]
    variants += [(name, preset, "float64") for name, preset in EXACT.items()] if exact else []
    quantized: dict[str, Any] = {}
    for name, preset, islands in variants:
        if preset not in quantized:
            qmodel = qat.prepare(model, preset_recipe(preset), example_inputs=ids)
            qat.calibrate(qmodel, [ids], num_batches=1)  # the embedding tables' ranges
            rtn(qmodel)
            quantized[preset] = qmodel.eval()
        files[name] = out / f"{name}.onnx"
        proto = build_lm_onnx(quantized[preset], ids, float_islands=islands)
        files[name].write_bytes(proto.SerializeToString())
    return files


def cpu_times(fns: dict[str, Any], rounds: int) -> dict[str, float]:
    """Median thread CPU seconds per call, interleaved: the work a call does, which other
    processes on a shared machine disturb far less than the wall clock (single-threaded
    sessions: the calling thread does all of it)."""
    import statistics
    import time

    for fn in fns.values():
        fn()  # warm up (lazy weight packing)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.thread_time()
            fns[name]()
            samples[name].append(time.thread_time() - t0)
    return {name: statistics.median(v) for name, v in samples.items()}


def prompt_section(
    files: dict[str, Path], seq: int, vocab: int, rounds: int, threads: int
) -> dict[str, Any]:
    """Prompt processing: one call on ``(1, seq)`` token ids per file, interleaved rounds."""
    import numpy as np

    from qat.export.bench import time_interleaved
    from qat.export.onnx import make_session
    from qat.export.onnx.runtime import optimized_op_types

    ids = {"input_ids": np.random.default_rng(0).integers(0, vocab, (1, seq), dtype=np.int64)}
    sessions = {n: make_session(p, threads=threads, spinning=False) for n, p in files.items()}
    fns = {n: (lambda s=s: s.run(None, ids)) for n, s in sessions.items()}
    latency = time_interleaved(fns, rounds=rounds, min_time=0.3)
    single = {n: make_session(p, threads=1, spinning=False) for n, p in files.items()}
    cpu = cpu_times({n: (lambda s=s: s.run(None, ids)) for n, s in single.items()}, 3 * rounds)
    fp32, fp32_cpu = latency.get("fp32"), cpu.get("fp32")
    rows = {}
    for name, path in files.items():
        ops = optimized_op_types(path, "all")
        size = path.stat().st_size
        rows[name] = {
            "latency_ms": latency[name] * 1000.0,
            "speedup_vs_fp32": None if fp32 is None else fp32 / latency[name],
            "cpu_ms_1t": cpu[name] * 1000.0,
            "cpu_speedup_vs_fp32": None if fp32_cpu is None else fp32_cpu / cpu[name],
            "size_bytes": size,
            "size_fp32_vs": files["fp32"].stat().st_size / size if "fp32" in files else None,
            "kernels": {k: ops[k] for k in KERNELS if ops.get(k)},
        }
    title = f"prompt: batch 1 x {seq} tokens"
    return {"title": title, "batch": 1, "seq": seq, "models": rows}


def table(section: dict[str, Any]) -> list[str]:
    """A section as text lines: one row per file, :data:`COLUMNS` then the kernels."""
    heads = "".join(f" {h:>{w}}" for h, _, _, w in COLUMNS)
    lines = [f"{'model':<14}{heads}  kernels"]
    for name, row in section["models"].items():
        cells = ""
        for _, key, fmt, width in COLUMNS:
            value = row.get(key)
            value = value / 1e6 if key == "size_bytes" and value is not None else value
            cells += f" {'-' if value is None else fmt.format(value):>{width}}"
        kernels = ", ".join(f"{k} {v}" for k, v in (row.get("kernels") or {}).items())
        lines.append(f"{name:<14}{cells}  {kernels}")
    return lines


def print_report(report: dict[str, Any]) -> None:
    print(
        f"ONNX Runtime {report['onnxruntime']}, {report['model']}, {report['threads']} threads, "
        f"median of {report['rounds']} interleaved rounds"
    )
    for section in report["sections"]:
        print(f"\n{section['title']}")
        print("\n".join(table(section)))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("gpt", "hf"), default="gpt")
    parser.add_argument("--path", default=None, help="--model hf: the saved folder")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--exact", action="store_true", help="also time the float64 files")
    parser.add_argument("--onnx", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args(argv)
    if args.model == "hf" and not args.path:
        parser.error("--model hf needs --path <folder saved with save_pretrained>")
    extra = {}
    for item in args.onnx:
        name, _, path = item.partition("=")
        if not path or not Path(path).is_file():
            parser.error(f"--onnx {item!r}: expected NAME=PATH of an existing .onnx file")
        extra[name] = Path(path)
    if args.model == "hf":
        from qat.models.hf import check_hf_folder

        try:
            check_hf_folder(args.path, need_tokenizer=False)
        except ValueError as err:
            parser.error(str(err))
    import onnxruntime

    model = float_model(args.model, args.seq, args.path, args.d_model, args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        files = {**build_files(Path(tmp), model, args.seq, args.exact), **extra}
        prompt = prompt_section(files, args.seq, vocab_size(model), args.rounds, args.threads)
    params = sum(p.numel() for p in model.parameters())
    report = {
        "model": f"{args.model} ({type(model).__name__}, {params / 1e6:.1f}M parameters)",
        "onnxruntime": onnxruntime.__version__,
        "threads": args.threads,
        "rounds": args.rounds,
        "sections": [prompt],
        # The prompt section's fields at the top level, as scripts/lm_table.py reads them.
        **{k: prompt[k] for k in ("batch", "seq", "models")},
    }
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
