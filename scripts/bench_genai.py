"""Generation speed and fidelity of onnxruntime-genai folders: qat's beside the model builder's.

One Hugging Face Llama (``scripts/make_hf_llama.py``'s 33.6M model) becomes these folders, all
run by ``onnxruntime-genai`` (CPU, KV cache, batch 1):

- ``fp32``: the builder's fp32 file of the float model;
- ``builder_int4`` / ``builder_int8``: the builder's RTN quantization of the float model
  (``MatMulNBits`` 4 / 8-bit, blocks of 32, accuracy level 4: int8 activations);
- ``qat_int4``: quant=lm_q4_0 (llama.cpp's scheme: Q4_0 weights, Q8_0 activations) after
  ``--qat-steps`` QAT steps, exported by ``export.targets=[genai]``: ``MatMulNBits`` at
  accuracy level 4 (ONNX Runtime's int8 kernel, which rounds its input to int8 blocks of 32);
- ``qat_w4a8``: quant=lm_w4a8 (4-bit weights per group of 32, int8 activation blocks with a
  float32 scale: the kernel's own input grid) after the same steps: ``MatMulNBits`` at
  accuracy level 4 with no op before it, the builder's int4 layout (4-bit output layer too);
- ``qat_int4_q8ops``: the same model with the fake-quant model's Q8_0 rounding as float ops
  before each kernel (``build_genai_folder(..., q8_ops=True)``: exact up to summation order);
- ``qat_int4_head4``: ``qat_int4`` with a 4-bit output layer too (``quant.overrides=[]``:
  lm_q4_0 keeps the lm_head on Q8_0; the builder quantizes it to 4 bits);
- ``qat_int4_w``: quant=lm_w4g32 (4-bit weights per group of 32, float activations) after the
  same steps: ``MatMulNBits`` at accuracy level 0 (float32 on the exact trained weights);
- ``qat_int4_w_acc4``: the same file at accuracy level 4 (``export.accuracy_level=4``: the
  builder's kernel; the activations are quantized, which the weight-only model never saw);
- ``qat_int8``: quant=lm_w8da8 (8-bit weights, per-token int8 activations) after the same
  steps: ``MatMulInteger``.

Speed: every folder in the same interleaved rounds (each round runs each once, the order
rotating), medians: ``prompt`` = ms to process a ``--prompt`` token prompt (128),
``decode`` = tokens/s generating ``--decode`` tokens after it. Fidelity: each file's logits on
the test split of the model's text (data=text, windows of ``--seq``) against the fake-quant
model it was exported from (the builder's files: against the qat model of the same bits, the
model that was trained): next-token top-1 agreement, mean KL, perplexity.

    python scripts/bench_genai.py --model outputs/models/stdlib-llama-33m [--rounds 7]
"""

from __future__ import annotations

import os

# Before torch / onnxruntime load OpenMP: idle workers sleep instead of spinning (see
# qat/export/bench.py) -- on a shared 2-core machine spinning threads steal the other runtime's.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: Folder name → (the qat model its fidelity is measured against, builder precision or None).
ROWS = {
    "fp32": ("float", "fp32"),
    "builder_int8": ("qat_int8", "int8"),
    "builder_int4": ("qat_int4", "int4"),
    "qat_int8": ("qat_int8", None),
    "qat_int4": ("qat_int4", None),
    "qat_w4a8": ("qat_w4a8", None),
    "qat_int4_q8ops": ("qat_int4", None),
    "qat_int4_head4": ("qat_int4_head4", None),
    "qat_int4_w": ("qat_int4_w", None),
    "qat_int4_w_acc4": ("qat_int4_w", None),
}
#: qat model → (preset, recipe keys replaced).
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "qat_int4": ("lm_q4_0", {}),
    "qat_w4a8": ("lm_w4a8", {}),
    "qat_int4_head4": ("lm_q4_0", {"overrides": []}),
    "qat_int4_w": ("lm_w4g32", {}),
    "qat_int8": ("lm_w8da8", {}),
}


def preset_recipe(name: str) -> dict[str, Any]:
    """``configs/quant/<name>.yaml`` as a recipe (composed by Hydra, as a run does)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"quant={name}"])
    data = OmegaConf.to_container(cfg.quant, resolve=True)
    return {k: v for k, v in data.items() if k not in ("enabled", "bits", "name")}


def qat_model(
    folder: Path, preset: tuple[str, dict[str, Any]], train: Any, steps: int, lr: float
) -> torch.nn.Module:
    """The model of ``folder`` prepared with ``preset`` (a preset name and the recipe keys it
    replaces), calibrated, and QAT-trained ``steps``."""
    import warnings

    import qat
    from qat.export.lm_io import logits_of
    from qat.models.hf import load_hf_causal_lm

    torch.manual_seed(0)
    model = load_hf_causal_lm(str(folder))
    batches = list(itertools.islice(train, steps + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the module-swap fallback warning
        recipe = {**preset_recipe(preset[0]), **preset[1]}
        qmodel = qat.prepare(model, recipe, example_inputs=batches[0][0][:1])
    qat.calibrate(qmodel, [batches[0][0]], num_batches=1)
    opt = torch.optim.AdamW(qmodel.parameters(), lr=lr, weight_decay=0.0)
    qmodel.train()
    for x, y in batches[1:]:
        loss = torch.nn.functional.cross_entropy(logits_of(qmodel, x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return qmodel.eval()


def _threads(folder: Path, threads: int) -> None:
    """Pin onnxruntime-genai's session to ``threads`` intra-op threads."""
    path = folder / "genai_config.json"
    cfg = json.loads(path.read_text())
    options = cfg["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"] = threads
    options["inter_op_num_threads"] = 1
    path.write_text(json.dumps(cfg, indent=4))


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("model.onnx*"))


def time_generation(
    folders: dict[str, Path], prompt: list[int], decode: int, rounds: int
) -> dict[str, dict[str, float]]:
    """Median prompt ms and decode tokens/s of each folder, interleaved rounds."""
    import numpy as np
    import onnxruntime_genai as og

    models = {}
    for name, folder in folders.items():
        config = og.Config(str(folder))
        config.clear_providers()
        models[name] = og.Model(config)
    tokens = np.asarray([prompt], dtype=np.int32)
    total = len(prompt) + decode

    def once(model: Any) -> tuple[float, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=1)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(tokens)
        t1 = time.perf_counter()
        for _ in range(decode):
            gen.generate_next_token()
        t2 = time.perf_counter()
        return t1 - t0, (t2 - t1) / decode

    names = list(models)
    for name in names:  # warm-up: weight pre-packing, thread pools, allocations
        once(models[name])
    samples: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(once(models[name]))
    out = {}
    for name, s in samples.items():
        prompt_s = statistics.median(p for p, _ in s)
        token_s = statistics.median(d for _, d in s)
        out[name] = {"prompt_ms": prompt_s * 1000, "decode_tok_s": 1.0 / token_s}
    return out


def print_table(report: dict[str, Any]) -> None:
    timing, fid = report["timing"], report["fidelity"]
    base = timing["fp32"]
    print(
        f"\nonnxruntime-genai {report['genai_version']}, {report['threads']} threads, batch 1, "
        f"{report['prompt_tokens']}-token prompt, {report['decode_tokens']} decoded tokens, "
        f"{report['rounds']} interleaved rounds (medians); fidelity on "
        f"{report['test_tokens']} test tokens\n"
    )
    print(
        "| file | MB | prompt ms | prompt vs fp32 | decode tok/s | decode vs fp32 "
        "| vs model | top-1 agreement | mean KL | ppl | model ppl |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for name, t in timing.items():
        f = fid[name]
        print(
            f"| {name} | {report['sizes_bytes'][name] / 1e6:.1f} | {t['prompt_ms']:.1f} "
            f"| {base['prompt_ms'] / t['prompt_ms']:.2f}x | {t['decode_tok_s']:.1f} "
            f"| {t['decode_tok_s'] / base['decode_tok_s']:.2f}x | {ROWS[name][0]} "
            f"| {f['agreement']:.2%} | {f['mean_kl']:.2e} | {f['perplexity']:.3f} "
            f"| {f['reference_perplexity']:.3f} |"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a Hugging Face Llama folder")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--decode", type=int, default=64, help="decoded tokens per round")
    parser.add_argument("--qat-steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seq", type=int, default=256, help="test window for fidelity")
    parser.add_argument("--test-batches", type=int, default=4, help="of 4 windows")
    parser.add_argument("--max-bytes", type=int, default=4_000_000, help="data=text's max_bytes")
    parser.add_argument("--work", help="where the folders go (default: a temporary folder)")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--rows", help=f"a comma-separated subset of {','.join(ROWS)}")
    args = parser.parse_args(argv)
    folder = Path(args.model)
    if not (folder / "config.json").is_file() or not (folder / "tokenizer.json").is_file():
        parser.error(f"--model {folder}: not a Hugging Face folder with config.json and tokenizer")
    if args.rows and not set(args.rows.split(",")) <= set(ROWS) | {"fp32"}:
        parser.error(f"--rows {args.rows}: choose from {','.join(ROWS)}")
    if args.rows and "fp32" not in args.rows.split(","):
        args.rows = "fp32," + args.rows  # the baseline of every ratio
    if args.rounds < 1 or args.prompt < 1 or args.decode < 1 or args.qat_steps < 0:
        parser.error("--rounds, --prompt and --decode >= 1 and --qat-steps >= 0, please")

    import onnxruntime_genai as og

    import qat  # noqa: F401  # first: lets transformers import beside a CUDA-built torchvision
    from qat.data import TextDataModule
    from qat.export.onnx.genai import build_genai_folder
    from qat.export.onnx.genai_builder import builder_folder
    from qat.export.onnx.genai_runtime import verify_genai
    from qat.models.hf import load_hf_causal_lm

    torch.set_num_threads(args.threads)
    data = TextDataModule(
        tokenizer=str(folder), max_bytes=args.max_bytes, seq_len=args.seq, batch_size=4, seed=0
    )
    data.setup()
    test = list(itertools.islice(data.test_dataloader(), args.test_batches))
    prompt = test[0][0][0, : args.prompt].tolist()
    if len(prompt) < args.prompt:
        parser.error(f"--prompt {args.prompt} > --seq {args.seq}")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_genai_"))
    t0 = time.perf_counter()
    refs = {"float": load_hf_causal_lm(str(folder)).eval()}
    rows = {n: ROWS[n] for n in (args.rows.split(",") if args.rows else ROWS)}
    for name, preset in PRESETS.items():
        if not any(ref == name for ref, _ in rows.values()):
            continue
        refs[name] = qat_model(
            folder, preset, iter(data.train_dataloader()), args.qat_steps, args.lr
        )
    print(f"models: {time.perf_counter() - t0:.0f} s", flush=True)
    folders: dict[str, Path] = {}
    for name, (_, precision) in rows.items():
        out = work / name
        if precision is not None:
            builder_folder(folder, out, precision)
        else:
            model = refs[ROWS[name][0]]
            level = 4 if name.endswith("_acc4") else None
            q8_ops = name.endswith("_q8ops")
            build_genai_folder(model, out, folder, accuracy_level=level, q8_ops=q8_ops)
        _threads(out, args.threads)
        folders[name] = out
    print(f"folders in {work}: {time.perf_counter() - t0:.0f} s", flush=True)
    fidelity = {
        name: verify_genai(refs[ROWS[name][0]], path, test, threads=args.threads)
        for name, path in folders.items()
    }
    timing = time_generation(folders, prompt, args.decode, args.rounds)
    report = {
        "model": str(folder),
        "genai_version": og.__version__,
        "threads": args.threads,
        "rounds": args.rounds,
        "prompt_tokens": args.prompt,
        "decode_tokens": args.decode,
        "qat_steps": args.qat_steps,
        "test_tokens": sum(y.numel() for _, y in test),
        "sizes_bytes": {n: _size(p) for n, p in folders.items()},
        "timing": timing,
        "fidelity": fidelity,
    }
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    assert all(math.isfinite(f["perplexity"]) for f in fidelity.values())
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
