"""The language-model page on a Hugging Face Llama of realistic shape (``lm_table.py --model hf``).

The model is a folder ``scripts/make_hf_llama.py`` wrote (33.6M parameters, BPE vocabulary of
8192, pre-trained on the Python standard library's sources). Every row starts from it and has
the same training budget (``--steps`` batches of ``--batch-size`` x ``--seq-len`` tokens, the
same data order and learning-rate schedule):

- *float, trained as long*: the float model trained those steps (``quant=float``); the PTQ rows
  (RTN, GPTQ, AWQ from ``qat.quant.ptq``) quantize it, so what QAT gains is told apart from what
  more training gains;
- QAT (``+experiment=hf_q4_0``, ``quant=lm_q4_0`` / ``lm_q4_k``), QAD (the same with
  ``module.distill_weight=1.0``: KL to the frozen float model's logits) and LoRA QAT
  (``module.lora_rank=16``, adapters merged before export) train in the app, export GGUF and
  verify it, in the run, against the fake-quant model: in PyTorch as llama.cpp's CPU graph
  (``gguf``) and in real llama.cpp (``gguf_llamacpp``, ``llama-cpp-python``).

Every perplexity is measured on the same first ``--test-batches`` test batches (the runs' own
test stage, torchmetrics' token-weighted perplexity, for the trained rows;
``qat.export.verify_lm.perplexity`` for the others). llama.cpp's decode speed is timed on the
F32, Q8_0, Q4_0 and Q4_K files of the same model, interleaved in one process.

Rows are computed in groups, in this order, each kept in ``<work>/rows`` as it finishes
(``--reuse`` skips finished ones): ``q4_0``, ``q4_k``, ``decode``, ``qad``, ``lora``.

    python scripts/make_hf_llama.py --out outputs/models/stdlib-llama-33m --steps 200 \\
        --seq-len 128 --batch-size 4 --lr 2e-3
    python scripts/lm_table.py --model hf --path outputs/models/stdlib-llama-33m [--reuse]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]

GROUPS = ("q4_0", "q4_k", "decode", "qad", "lora")
#: Row label → quant preset (``configs/quant/<preset>.yaml``), for the PTQ and QAT rows.
PRESETS = {"Q4_0": "lm_q4_0", "Q4_K": "lm_q4_k"}
KQUANT_PRESETS = {"lm_q4_k"}
REFERENCE = "float, trained as long"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["hf"], default="hf")
    parser.add_argument("--path", type=Path, required=True, help="the Hugging Face folder")
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "lm_table_hf")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "lm_results.md")
    parser.add_argument("--groups", default=",".join(GROUPS), help="comma-separated groups")
    parser.add_argument("--reuse", action="store_true", help="keep finished rows and runs")
    parser.add_argument("--steps", type=int, default=50, help="training steps of every row")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4, help="float, QAT and QAD rows")
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--test-batches", type=int, default=16)
    parser.add_argument("--verify-batches", type=int, default=8)
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--decode-rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch's and llama.cpp's")
    args = parser.parse_args(argv)
    groups = [g for g in args.groups.split(",") if g]
    bad = sorted(set(groups) - set(GROUPS))
    if bad:
        parser.error(f"--groups: unknown {bad}; choose from {', '.join(GROUPS)}")
    if not (args.path / "config.json").is_file():
        parser.error(f"--path {args.path}: no config.json (make it with scripts/make_hf_llama.py)")
    if min(args.steps, args.batch_size, args.test_batches, args.calib_batches) < 1:
        parser.error("--steps, --batch-size, --test-batches and --calib-batches must be >= 1")
    args.groups = groups
    return args


def base_overrides(args: argparse.Namespace) -> list[str]:
    """What every trained row shares: the model, data, steps, schedule and test batches."""
    return [
        "+experiment=hf_q4_0",
        f"model.path={args.path.resolve()}",
        f"data.seq_len={args.seq_len}",
        f"data.batch_size={args.batch_size}",
        "trainer.max_epochs=1",
        f"trainer.limit_train_batches={args.steps}",
        "trainer.limit_val_batches=2",
        f"trainer.limit_test_batches={args.test_batches}",
        f"optimizer.lr={args.lr}",
        "~callbacks.best_checkpoint",
    ]


def qat_overrides(args: argparse.Namespace, preset: str) -> list[str]:
    return [
        *base_overrides(args),
        f"quant={preset}",
        "export.targets=[gguf]",
        "export.bench=false",
        f"export.verify_batches={args.verify_batches}",
        "export.fail_on_parity=false",  # the page reports every parity, passing or not
        # Tested and exported in the run: no 400 MB checkpoint.
        "~callbacks.model_checkpoint",
        "+trainer.enable_checkpointing=false",
    ]


class Table:
    """The rows, each saved as ``<work>/rows/<key>.json`` when it is measured."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dir = args.work / "rows"
        self.dir.mkdir(parents=True, exist_ok=True)
        (args.work / "files").mkdir(exist_ok=True)
        if not args.reuse:  # a fresh table: no row of an earlier one on the page
            for stale in self.dir.glob("*.json"):
                stale.unlink()
        self._data: Any = None

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.dir / f"{key}.json"
        return json.loads(path.read_text()) if self.args.reuse and path.is_file() else None

    def put(self, key: str, row: dict[str, Any]) -> dict[str, Any]:
        (self.dir / f"{key}.json").write_text(json.dumps(row, indent=2, default=str))
        ppl = row.get("ppl")
        print(f"  {key}: " + (f"ppl {ppl:.4f}" if ppl else "done"), flush=True)
        return row

    def saved(self) -> dict[str, dict[str, Any]]:
        return {p.stem: json.loads(p.read_text()) for p in sorted(self.dir.glob("*.json"))}

    # The data, the test and calibration batches: built once, on first use.
    def data(self) -> tuple[Any, list[Any], list[Any]]:
        if self._data is None:
            from lm_table import compose

            from qat.lit.config import build_datamodule
            from qat.lit.train import dm_test_loader

            dm = build_datamodule(compose(base_overrides(self.args), self.args.work / "data"))
            dm.setup()
            test = [
                b for _, b in zip(range(self.args.test_batches), dm_test_loader(dm), strict=False)
            ]
            calib = [
                b
                for _, b in zip(range(self.args.calib_batches), dm.train_dataloader(), strict=False)
            ]
            self._data = (dm, test, calib)
        return self._data


def train_row(
    table: Table, key: str, label: str, method: str, overrides: list[str]
) -> dict[str, Any]:
    """A row trained and exported in the app: its test perplexity and export report."""
    from lm_table import run

    row = table.get(key)
    if row is not None:
        return row
    results = run(overrides, table.args.work / "runs" / key, reuse=table.args.reuse)
    export = results.get("export") or {}
    parity = export.get("parity") or {}
    return table.put(
        key,
        {
            "bits": label,
            "method": method,
            "ppl": results["metrics"]["test_ppl"],
            "sizes": {"gguf": (export.get("sizes_bytes") or {}).get("gguf")},
            "gguf_path": (export.get("artifacts") or {}).get("gguf"),
            "parity": parity.get("runtimes"),
            "parity_tokens": parity.get("num_tokens"),
            "train_s": results.get("wall_time_s"),
        },
    )


def float_model(args: argparse.Namespace, ckpt: Path | None = None) -> torch.nn.Module:
    """The folder's model, or a float run's last checkpoint in it."""
    from lm_table import compose

    from qat.lit.checkpoint import load_float_weights
    from qat.lit.config import build_model

    cfg = compose([*base_overrides(args), "quant=float"], args.work / "data")
    model = build_model(cfg)
    if ckpt is not None:
        load_float_weights(model, str(ckpt))
    return model.eval()


def float_rows(table: Table) -> torch.nn.Module:
    """The float row, the float-trained-as-long row; returns the latter's model (PTQ's start)."""
    from lm_table import run

    from qat.export.gguf import export_gguf
    from qat.export.verify_lm import perplexity

    args = table.args
    _, test, _ = table.data()
    if table.get("float") is None:
        base = float_model(args)
        path = export_gguf(base, args.work / "files" / "f32.gguf")
        table.put(
            "float",
            {
                "bits": "F32",
                "method": "float",
                "ppl": perplexity(base, test),
                "sizes": {"gguf": path.stat().st_size},
                "gguf_path": str(path),
            },
        )
    run_dir = args.work / "runs" / "float_longer"
    float_overrides = [*base_overrides(args), "quant=float", "export=none"]
    results = run(float_overrides, run_dir, reuse=args.reuse)
    longer = float_model(args, run_dir / "checkpoints" / "last.ckpt")
    if table.get("float_longer") is None:
        table.put(
            "float_longer",
            {
                "bits": "F32",
                "method": REFERENCE,
                "ppl": perplexity(longer, test),
                "sizes": table.saved()["float"]["sizes"],
                "train_s": results.get("wall_time_s"),
            },
        )
    return longer


def kquant_rtn(preset: str, model: torch.nn.Module, calib: list) -> torch.nn.Module:
    """Round-to-nearest on a k-quant grid: the prepared model as it is (a k-quant weight
    quantizer derives every scale from the weights at each call: ``qat.quant.kquants``)."""
    import copy

    from bench_llm import preset_recipe

    import qat

    qmodel = qat.prepare(
        copy.deepcopy(model), preset_recipe(preset), example_inputs=calib[0][0][:2]
    )
    qat.calibrate(qmodel, calib[:1], num_batches=1)
    return qmodel.eval()


def ptq_rows(table: Table, longer: torch.nn.Module, label: str) -> None:
    from lm_table import ptq

    from qat.export.gguf import export_gguf
    from qat.export.verify_lm import perplexity

    preset = PRESETS[label]
    _, test, calib = table.data()
    # qat.quant.ptq's GPTQ and AWQ take the Q4_0 / Q8_0 grids (one scale per block of 32), not
    # the k-quants' two-level scales: Q4_K has its RTN row only.
    methods = ("RTN",) if preset in KQUANT_PRESETS else ("RTN", "GPTQ", "AWQ")
    for method in methods:
        key = f"{preset}_{method.lower()}"
        if table.get(key) is not None:
            continue
        t0 = time.perf_counter()
        if preset in KQUANT_PRESETS:
            qmodel = kquant_rtn(preset, longer, calib)
        else:
            qmodel = ptq(method, preset, longer, calib)
        seconds = time.perf_counter() - t0
        path = export_gguf(qmodel, table.args.work / "files" / f"{key}.gguf")
        table.put(
            key,
            {
                "bits": label,
                "method": method,
                "ppl": perplexity(qmodel, test),
                "sizes": {"gguf": path.stat().st_size},
                "quantize_s": round(seconds),
            },
        )


def q8_0_file(table: Table, longer: torch.nn.Module) -> Path:
    """The float-trained-as-long model rounded to Q8_0 (RTN): the decode table's Q8_0 file."""
    from lm_table import ptq

    from qat.export.gguf import export_gguf

    path = table.args.work / "files" / "lm_q8_0_rtn.gguf"
    if not (table.args.reuse and path.is_file()):
        _, _, calib = table.data()
        export_gguf(ptq("RTN", "lm_q8_0", longer, calib), path)
    return path


def decode_speed(
    files: dict[str, Path], prompt: list[int], tokens: int, rounds: int, threads: int
) -> dict[str, Any]:
    """llama.cpp's greedy decode of ``tokens`` tokens after ``prompt``, per file, timed in
    interleaved rounds (round 0 warms up and is not counted); the median's tokens/s."""
    import numpy as np
    from llama_cpp import Llama

    llms = {
        name: Llama(
            model_path=str(path),
            n_ctx=len(prompt) + tokens + 8,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        for name, path in files.items()
    }
    seconds: dict[str, list[float]] = {name: [] for name in files}
    cpu: dict[str, list[float]] = {name: [] for name in files}
    outputs: dict[str, list[int]] = {}
    load = os.getloadavg()[0]
    for r in range(rounds + 1):
        for name, llm in llms.items():
            llm.reset()
            llm.eval(prompt)
            out = []
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(tokens):
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                out.append(token)
                llm.eval([token])
            if r:
                seconds[name].append(time.perf_counter() - t0)
                cpu[name].append(time.thread_time() - c0)
            outputs[name] = out
    return {
        "tokens": tokens,
        "prompt_tokens": len(prompt),
        "rounds": rounds,
        "threads": threads,
        # A shared machine: the wall clock counts other jobs' time slices; with one thread
        # llama.cpp computes in the calling thread, whose CPU time does not.
        "load_average": [round(load, 2), round(os.getloadavg()[0], 2)],
        "files": {
            name: {
                "size_bytes": files[name].stat().st_size,
                "tokens_per_s": tokens / statistics.median(seconds[name]),
                "cpu_tokens_per_s": (
                    tokens / statistics.median(cpu[name]) if threads == 1 else None
                ),
                "same_tokens_as_f32": outputs[name] == outputs.get("F32"),
            }
            for name in files
        },
    }


def meta(args: argparse.Namespace, table: Table, seconds: float) -> dict[str, Any]:
    import llama_cpp

    config = json.loads((args.path / "config.json").read_text())
    pre = args.path / "pretraining.json"
    _, test, _ = table.data()
    return {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "llama_cpp_python": llama_cpp.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "model": {
            k: config.get(k)
            for k in (
                "vocab_size",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "intermediate_size",
            )
        },
        "pretraining": json.loads(pre.read_text()) if pre.is_file() else None,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "lora_lr": args.lora_lr,
        "lora_rank": args.lora_rank,
        "calib_batches": args.calib_batches,
        "test_tokens": sum(int(y.numel()) for _, y in test),
        "wall_s": round(seconds),
    }


#: The page's row order: (row key, group).
ORDER = [
    ("float", "q4_0"),
    ("float_longer", "q4_0"),
    *[(f"lm_q4_0_{m}", "q4_0") for m in ("rtn", "gptq", "awq")],
    ("qat_q4_0", "q4_0"),
    ("qad_q4_0", "qad"),
    ("lora_q4_0", "lora"),
    *[(f"lm_q4_k_{m}", "q4_k") for m in ("rtn", "gptq", "awq")],
    ("qat_q4_k", "q4_k"),
]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    table, started = Table(args), time.perf_counter()
    longer = None
    for group in args.groups:
        print(f"group {group}", flush=True)
        if group in ("q4_0", "q4_k"):
            label = group.upper()
            # QAT first: the row the page is about lands before the baselines.
            train_row(table, f"qat_{group}", label, "QAT", qat_overrides(args, PRESETS[label]))
            longer = longer or float_rows(table)
            ptq_rows(table, longer, label)
        elif group == "qad":
            train_row(
                table,
                "qad_q4_0",
                "Q4_0",
                "QAD",
                [*qat_overrides(args, "lm_q4_0"), "module.distill_weight=1.0"],
            )
        elif group == "lora":
            overrides = qat_overrides(args, "lm_q4_0")
            overrides += [f"module.lora_rank={args.lora_rank}", f"optimizer.lr={args.lora_lr}"]
            train_row(table, "lora_q4_0", "Q4_0", "LoRA QAT", overrides)
        elif group == "decode":
            if table.get("decode") is not None:
                continue
            saved = table.saved()
            if not (saved.get("float") or {}).get("gguf_path"):
                print("  decode: skipped, no float GGUF yet (group q4_0)", flush=True)
                continue
            longer = longer or float_rows(table)
            files = {"F32": Path(saved["float"]["gguf_path"]), "Q8_0": q8_0_file(table, longer)}
            for name, key in (("Q4_0", "qat_q4_0"), ("Q4_K", "qat_q4_k")):
                path = (saved.get(key) or {}).get("gguf_path")
                if path:
                    files[name] = Path(path)
                else:
                    print(f"  decode: no {name} file yet (row {key})", flush=True)
            _, test, _ = table.data()
            prompt = test[0][0][0, :16].tolist()
            table.put(
                "decode",
                decode_speed(files, prompt, args.decode_tokens, args.decode_rounds, args.threads),
            )
    saved = table.saved()
    report = {
        "rows": [saved[k] for k, _ in ORDER if k in saved],
        "decode": saved.get("decode"),
        "meta": meta(args, table, time.perf_counter() - started),
    }
    (args.work / "lm_table_hf.json").write_text(json.dumps(report, indent=2, default=str))
    from lm_table_page import write_hf_section

    write_hf_section(report, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "scripts"))
    main()
