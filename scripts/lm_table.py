"""The language-model section of the results: float / RTN / GPTQ / AWQ / QAT, W4 g32 and W8.

One float GPT (``+experiment=gpt_float``) is the starting point of every row:

- PTQ rows quantize it with ``qat.quant.ptq`` (rtn, gptq, awq) under the same recipes the QAT
  rows train with: W4 g32 = ``quant=lm_q4_0`` (GGUF Q4_0 weights, Q8_0 activation rounding: what
  llama.cpp computes), W8 = ``quant=lm_w8da8`` (int8 per-channel weights, per-token dynamic
  int8 activations: ONNX Runtime's MatMulInteger);
- QAT rows fine-tune it (``+experiment=gpt_int4`` / ``gpt_w8a8`` with ``init_from=``) and export
  and verify GGUF / ONNX in the run;
- "float, trained as long" continues the float model for the QAT rows' steps (the same
  optimizer, learning rate and batches); the PTQ rows quantize it, so every quantized row has
  had the same training, and what QAT gains is told apart from what more training gains.

Every perplexity is measured by one function (``qat.export.verify_lm.perplexity``) on the whole
test split. The page is written to ``docs/lm_results.md``; runs go to ``outputs/lm_table/``
(``--reuse`` keeps finished ones; ``--reexport`` with it exports and verifies the finished
QAT runs again with the current exporter, as ``python -m qat.export`` does, instead of reading
the exports they made when they trained). About 25 minutes on 2 cores.

    python scripts/lm_table.py [--reuse [--reexport]] [--out docs/lm_results.md]

``--model hf --path <folder>``: the page's section on a Hugging Face Llama of realistic shape
instead (``scripts/lm_table_hf.py``); each mode rewrites its own section of the page.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see bench.py)

import argparse
import copy
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

QAT_STEPS = ["schedule.warmup_epochs=0", "trainer.max_epochs=2", "optimizer.lr=3e-4"]
# The page reports every export's parity, passing or not (its goals section checks it).
PARITY = ["export.fail_on_parity=false"]
PRESETS = {"W4 g32": "lm_q4_0", "W8": "lm_w8da8"}
QAT_EXPERIMENTS = {"W4 g32": "gpt_int4", "W8": "gpt_w8a8"}
QUIET = ["trainer.enable_progress_bar=false", "~callbacks.rich_progress_bar"]


def compose(overrides: list[str], run_dir: Path) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        cfg.paths.log_dir = str(run_dir)
    return cfg


def run(overrides: list[str], run_dir: Path, reuse: bool) -> dict[str, Any]:
    """``train(cfg)`` into ``run_dir`` (or its finished results with ``reuse``)."""
    from qat.lit.train import train

    results = run_dir / "results.json"
    if not (reuse and results.is_file()):
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        t0 = time.perf_counter()
        cfg = compose([*overrides, *QUIET], run_dir)
        train(cfg)
        save_run_config(cfg, run_dir)
        print(f"  {run_dir.name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(results.read_text())


def reexport(run_dir: Path) -> dict[str, Any]:
    """Export ``run_dir``'s last checkpoint again, to its targets, into ``<run_dir>/export``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from qat.lit.reexport import export_checkpoint

    trained = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    targets = ",".join(trained.export.targets)
    overrides = [
        f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
        "export=lm",
        "export.bench=false",  # the page times the files with bench_llm
        "export.replace=true",  # into <run_dir>/export (swapped whole), not export-2
        f"export.targets=[{targets}]",
        *PARITY,
    ]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = hydra_compose("export_ckpt", overrides=overrides)
    print(f"  {run_dir.name}: exported again ({targets})", flush=True)
    return export_checkpoint(cfg)


def save_run_config(cfg: Any, run_dir: Path) -> None:
    """``.hydra/config.yaml`` as ``python train.py`` leaves it (``python -m qat.export`` and
    :func:`qat_model` rebuild the model from it)."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(plain), run_dir / ".hydra" / "config.yaml")


def float_model(run_dir: Path) -> torch.nn.Module:
    from qat.lit.checkpoint import load_float_weights
    from qat.lit.config import build_model

    model = build_model(compose(["+experiment=gpt_float"], run_dir))
    load_float_weights(model, str(run_dir / "checkpoints" / "last.ckpt"))
    return model.eval()


def qat_model(run_dir: Path) -> torch.nn.Module:
    from qat.lit.reexport import load_checkpoint_model

    model, _, _ = load_checkpoint_model(run_dir / "checkpoints" / "last.ckpt", run_dir)
    return model


def sizes(model: torch.nn.Module, ids: torch.Tensor, out: Path, gguf: bool) -> dict[str, int]:
    from qat.export.gguf import export_gguf
    from qat.export.onnx.llm import build_lm_onnx, float_lm_onnx
    from qat.quant.control import is_prepared

    out.mkdir(parents=True, exist_ok=True)
    result = {}
    onnx_path = out / "model.onnx"
    if is_prepared(model):
        onnx_path.write_bytes(build_lm_onnx(model, ids).SerializeToString())
    else:
        onnx_path.write_bytes(float_lm_onnx(model, ids))
    result["onnx"] = onnx_path.stat().st_size
    if gguf:
        result["gguf"] = export_gguf(model, out / "model.gguf").stat().st_size
    return result


def ptq(method: str, preset: str, model: torch.nn.Module, calib: list) -> torch.nn.Module:
    from bench_llm import preset_recipe

    import qat
    from qat.quant.ptq import awq, gptq, rtn

    qmodel = qat.prepare(
        copy.deepcopy(model), preset_recipe(preset), example_inputs=calib[0][0][:2]
    )
    qat.calibrate(qmodel, calib[:1], num_batches=1)  # embedding tables (observed once)
    if method == "RTN":
        rtn(qmodel)
    elif method == "GPTQ":
        gptq(qmodel, calib)
    else:
        awq(qmodel, calib)
    return qmodel.eval()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    which = argparse.ArgumentParser(add_help=False)
    which.add_argument("--model", choices=["gpt", "hf"], default="gpt")
    known, _ = which.parse_known_args(argv)
    if known.model == "hf":  # the Hugging Face Llama's section: scripts/lm_table_hf.py
        from lm_table_hf import main as hf_main

        hf_main(argv)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["gpt", "hf"], default="gpt", help="hf: see lm_table_hf")
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "lm_table")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "lm_results.md")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs")
    parser.add_argument(
        "--reexport", action="store_true", help="export the finished QAT runs again (--reuse)"
    )
    parser.add_argument("--calib-batches", type=int, default=16)
    parser.add_argument("--bench-rounds", type=int, default=15)
    args = parser.parse_args(argv)
    from qat.export.verify_lm import perplexity
    from qat.lit.train import dm_test_loader

    work, started = args.work, time.perf_counter()
    print("float model", flush=True)
    float_run = run(["+experiment=gpt_float"], work / "float", args.reuse)
    ckpt = work / "float" / "checkpoints" / "last.ckpt"
    init = [f"init_from={ckpt}", *QAT_STEPS]
    from qat.lit.config import build_datamodule

    dm = build_datamodule(compose(["+experiment=gpt_float"], work / "float"))
    dm.setup()
    test = list(dm_test_loader(dm))
    calib = [b for _, b in zip(range(args.calib_batches), dm.train_dataloader(), strict=False)]
    ids = test[0][0][:1]
    base = float_model(work / "float")
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    rows.append(
        {
            "bits": "fp32",
            "method": "float",
            "ppl": perplexity(base, test),
            "sizes": sizes(base, ids, work / "files" / "float", gguf=True),
        }
    )
    print(f"  float ppl {rows[-1]['ppl']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    run(["+experiment=gpt_float", *init], work / "float_longer", args.reuse)
    # The PTQ rows quantize this one: every quantized row has had the same training steps.
    longer = float_model(work / "float_longer")
    rows.append(
        {
            "bits": "fp32",
            "method": "float, trained as long as QAT",
            "ppl": perplexity(longer, test),
            "sizes": rows[0]["sizes"],
        }
    )
    for bits, preset in PRESETS.items():
        for method in ("RTN", "GPTQ", "AWQ"):
            t0 = time.perf_counter()
            qmodel = ptq(method, preset, longer, calib)
            seconds = time.perf_counter() - t0
            key = f"{preset}_{method.lower()}"
            files = sizes(qmodel, ids, work / "files" / key, gguf=preset == "lm_q4_0")
            rows.append(
                {
                    "bits": bits,
                    "method": method,
                    "ppl": perplexity(qmodel, test),
                    "sizes": files,
                    "quantize_s": seconds,
                }
            )
            print(f"  {bits} {method}: ppl {rows[-1]['ppl']:.4f} ({seconds:.0f} s)", flush=True)
        exp = QAT_EXPERIMENTS[bits]
        print(f"{exp} (QAT)", flush=True)
        results = run([f"+experiment={exp}", *init, *PARITY], work / exp, args.reuse)
        export = results.get("export") or {}
        if args.reuse and args.reexport:
            export = reexport(work / exp)
        rows.append(
            {
                "bits": bits,
                "method": "QAT",
                "ppl": perplexity(qat_model(work / exp), test),
                "sizes": export.get("sizes_bytes", {}),
                "parity": (export.get("parity") or {}).get("runtimes"),
                "parity_tokens": (export.get("parity") or {}).get("num_tokens"),
                "train_s": results.get("wall_time_s"),
            }
        )
        print(f"  {bits} QAT: ppl {rows[-1]['ppl']:.4f}", flush=True)
    from bench_llm import main as bench_main

    onnx = {"int4_q8": work / "gpt_int4" / "export" / "model.onnx"}
    onnx["int8_dyn"] = work / "gpt_w8a8" / "export" / "model.onnx"
    bench_args = [f"--onnx={k}={v}" for k, v in onnx.items()]
    bench_args += ["--rounds", str(args.bench_rounds), "--json", str(work / "bench.json")]
    bench = bench_main(bench_args)
    bench_one = bench_main(["--seq", "1", "--rounds", str(args.bench_rounds)])
    report = {
        "rows": rows,
        "float_run": float_run["metrics"],
        "bench": bench,
        "bench_one_token": bench_one,
        "meta": meta(dm, float_run, time.perf_counter() - started),
    }
    (work / "lm_table.json").write_text(json.dumps(report, indent=2, default=str))
    from lm_table_page import write_page

    write_page(report, args.out)
    print(f"wrote {args.out}")


def meta(dm: Any, float_run: dict[str, Any], seconds: float) -> dict[str, Any]:
    import onnxruntime

    return {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "tokens": {
            "train": len(dm.train_set) * dm.seq_len,
            "val": len(dm.val_set) * dm.seq_len,
            "test": len(dm.test_set) * dm.seq_len,
        },
        "float_steps": float_run["config"]["global_step"],
        "wall_s": round(seconds),
    }


if __name__ == "__main__":
    main()
