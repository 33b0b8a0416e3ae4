"""The accuracy / size / speed table: float, PTQ and QAT rows on Fashion-MNIST, with plots.

For each model: train the float model (``+experiment=table/float``), then one Hydra multirun
over the rows in ``configs/experiment/table/`` (PTQ at W8A8 and W4A4; QAT at W8A8, W4A8, W4A4
direct, W4A4 annealed 8 → 4, W3A3 and W2A2 annealed), each starting from the float checkpoint
(``init_from=``). A model that needs a longer budget for a row has a config of its own,
``configs/experiment/table/<model>/<row>.yaml``, used instead of the shared one. Every row
exports TorchScript and ONNX, verifies them on the 10,000 test images and benchmarks them
(the pipeline's ``results.json``). This script then writes ``docs/results.md`` (the table,
the machine, the versions, the budget) and PNG plots beside it.

Finished runs are kept: running the script again skips every row whose ``results.json``
exists, so an interrupted table resumes where it stopped (``--render-only`` just rewrites the
table from what is there). The figures of every row are also saved beside the table
(``docs/results.json``); a row with no run directory under ``--root`` (a fresh clone) is
carried over from there, marked † with when and where it ran, as long as it was fine-tuned from
the same float model as the model's other rows: the float run's checkpoint (hashed), or, when
the float run is carried over too, the one it saved. A new float run therefore means new rows:
rows from another float model show as "not run" rather than being compared with this one.
The float weights are saved beside the table too (``docs/results_float_<model>.pt``): without a
float run under ``--root``, new rows start from them, beside the carried-over rows, instead of
from a float model trained again.

The pieces are in ``scripts/results_table/``, one concept a module (see its ``__init__``).

Usage::

    python scripts/results.py                              # both models, ~6 h on 2 cores
    python scripts/results.py --models resnet20 --float-epochs 2
    python scripts/results.py -- logger=wandb              # also log every run (and the table)
    python scripts/results.py --render-only
    python scripts/results.py --models resnet20 --rows qat_w2a2_anneal  # one row, same float
    python scripts/results.py --reexport   # after an exporter change: export every row again
"""

# ruff: noqa: E402 (the package beside this script is imported once sys.path names it)

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

# `python scripts/results.py` puts scripts/ on sys.path; a caller loading this file by path
# (the tests) does not.
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from results_table import running
from results_table.carry import keep_float, load_saved, weights_sha
from results_table.collect import collect
from results_table.machine import _machine
from results_table.render import render
from results_table.rows import (
    MODELS,
    QUANT_ROWS,
    REPO,
    ROWS,
    TRAIN,
    _float_ckpt,
    _row_dir,
    own_row_configs,
    row_config,
)
from results_table.running import reexport_rows, run_model
from results_table.wandb_log import log_wandb

# What tests/scripts/test_results_table.py reaches through this script, besides main.
__all__ = [
    "MODELS",
    "QUANT_ROWS",
    "REPO",
    "ROWS",
    "TRAIN",
    "_float_ckpt",
    "_machine",
    "_row_dir",
    "collect",
    "main",
    "own_row_configs",
    "render",
    "row_config",
    "run_model",
    "running",
    "weights_sha",
]


SHORT_SAVED = "results_short.json"
#: Overrides every short row runs with (the budget, the float model, no benchmark); others a
#: row ran with are listed under the short table.
SHORT_SHARED = (
    "+experiment",
    "model",
    "model.width_mult",
    "~callbacks.rich_progress_bar",
    "trainer.enable_progress_bar",
    "init_from",
    "export.fail_on_parity",
    "trainer.max_epochs",
    "trainer.limit_train_batches",
    "trainer.limit_val_batches",
    "schedule.bn_reestimate_batches",
    "export.bench",
)


def _extra_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides of a short row beyond :data:`SHORT_SHARED` (a long value
    elided: its run's .hydra/overrides.yaml has it)."""
    import yaml

    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    extra = []
    for o in yaml.safe_load(path.read_text()) or []:
        key = str(o).split("=", 1)[0]
        if key not in SHORT_SHARED:
            extra.append(str(o) if len(str(o)) <= 60 else f"{key}=…")
    return extra


def short_rows(
    root: Path | None, models: Sequence[str], items: list[dict], out: Path
) -> list[dict]:
    """The finished rows under ``root`` (a shorter matched budget), saved beside the page; or
    the saved ones when no root is given. Each gets the page's float accuracy of its model."""
    saved = out / SHORT_SAVED
    if root is None:
        return json.loads(saved.read_text())["items"] if saved.is_file() else []
    rows = [
        i for i in collect(root.resolve(), list(models), {}) if i["done"] and i["row"] != "float"
    ]
    floats = {i["model"]: i.get("acc") for i in items if i["row"] == "float" and i["done"]}
    for i in rows:
        i["float_acc"] = floats.get(i["model"])
        i["extra"] = _extra_overrides(_row_dir(root.resolve(), i["model"], i["row"]))
    saved.write_text(json.dumps({"items": rows}, indent=1) + "\n")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--root", type=Path, default=REPO / "outputs" / "results")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    parser.add_argument("--float-epochs", type=int, default=4)
    parser.add_argument(
        "--rows", nargs="+", default=QUANT_ROWS, choices=QUANT_ROWS, help="quantized rows to run"
    )
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument(
        "--reexport",
        action="store_true",
        help="export the finished --rows again with the current exporter (no training)",
    )
    parser.add_argument(
        "--short-root",
        type=Path,
        help="finished uniform / mixed rows trained on a shorter matched budget under this "
        "root (<root>/<model>/table_<row>): shown in a section of their own (saved beside the "
        "page in results_short.json, which later renders keep)",
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args(argv)
    if args.float_epochs < 1:
        parser.error("--float-epochs must be at least 1")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"overrides must look like key=value, got {bad}")
    if args.reexport and args.render_only:
        parser.error("--reexport and --render-only exclude each other")
    if args.reexport:
        exports = [o for o in args.overrides if o.startswith("export.")]
        for m in args.models:
            reexport_rows(args.root.resolve(), m, args.rows, exports)
    elif not args.render_only:
        for m in args.models:
            run_model(
                m, args.root.resolve(), args.float_epochs, args.overrides, args.rows, args.out
            )
    saved = load_saved(args.out)
    # Models run earlier and not named by --models stay on the page (carried over).
    models = [m for m in MODELS if m in args.models or any(k[0] == m for k in saved)]
    items = collect(args.root.resolve(), models, saved)
    short = short_rows(args.short_root, models, items, args.out)
    path = render(items, args.out, {"float_epochs": args.float_epochs}, short)
    for m in models:
        # The page's float weights, so a later run can add rows beside these (run_model).
        ckpt = _float_ckpt(args.root.resolve(), m)
        if ckpt.is_file():
            keep_float(ckpt, args.out, m)
    print(path.read_text())
    if any(o.startswith("logger=wandb") for o in args.overrides):
        log_wandb(items, [args.out / "results_accuracy.png", args.out / "results_size_latency.png"])


if __name__ == "__main__":
    main()
