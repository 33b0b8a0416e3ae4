"""Export a trained checkpoint again: ``python -m qat.export ckpt_path=<run>/checkpoints/last.ckpt``.

Reads the training run's ``.hydra/config.yaml`` (found above the checkpoint, or ``run_dir=``),
rebuilds the model, prepares it with the run's recipe, loads the checkpoint's weights and
quantizer state (:func:`qat.lit.checkpoint.load_checkpoint`, ``weights_only=True``: a file that
would run code is refused), then exports, verifies, checks parity and benchmarks exactly as the
training pipeline does. The set lands whole (:func:`qat.export.bundle.export_folder`): in
``<run dir>/export/`` (or ``export.out_dir``) when that is empty, else in a new
``export-2/``, ``export-3/``, ... (``export.replace=true`` swaps the folder instead and updates
``results.json``), with ``export_report.json`` and ``manifest.json`` (sha256 and size of every
file, the checkpoint, the parity) beside the models. A checkpoint from a float warm-up epoch is
calibrated first, as the training run does when its training ends in warm-up.

The entry point is ``qat/export/__main__.py``; the work is here, in the app, because it starts
from the training run's Hydra config. Options (Hydra overrides, composed with
``configs/export_ckpt.yaml``)::

    export.targets=[onnx,torchscript]  export.int4_packed=true  export.out_dir=...
    export.verify=false  export.bench=false  export.verify_batches=20
    export.fail_on_parity=false  export.replace=true  snap_bias=false
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from qat.export.bundle import export_folder, file_digest
from qat.export.stage import parity_failure, run_export
from qat.export.stage_lm import LM_TARGETS, run_lm_export
from qat.lit.checkpoint import check_checkpoint_fits, load_checkpoint, model_weights
from qat.lit.config import ConfigError, build_model, validate_config
from qat.lit.config_parts import example_input
from qat.lit.errors import disk_full
from qat.lit.qat_callback import QATCallback
from qat.lit.results import RESULTS_FILE, write_json_atomic
from qat.lit.targets import check_targets
from qat.lit.train import dm_test_loader, snap_model_bias
from qat.quant.control import uninitialized_quantizers
from qat.quant.prepare import prepare

__all__ = ["export_checkpoint", "find_run_dir", "load_checkpoint_model", "main_cli"]

log = logging.getLogger("qat.export")

#: The report of a re-export, in its folder beside the models.
REPORT_FILE = "export_report.json"


def find_run_dir(ckpt: Path) -> Path:
    """The nearest directory above ``ckpt`` holding ``.hydra/config.yaml``."""
    for parent in ckpt.parents:
        if (parent / ".hydra" / "config.yaml").is_file():
            return parent
    raise ConfigError(
        f"no .hydra/config.yaml above {ckpt}: pass run_dir=<the training run's directory>"
    )


def load_checkpoint_model(
    ckpt: Path, run_dir: Path, allowed: Iterable[str] = ()
) -> tuple[Any, Any, DictConfig]:
    """Rebuild the run's prepared model with the checkpoint's state; also its DataModule.

    The checkpoint is checked against the run's config (recipe, every tensor's name and shape)
    before it is loaded. A checkpoint written before quantization started (a float warm-up
    epoch: its quantizers never saw data) is calibrated as the training run calibrates a model
    whose training ended in warm-up: the schedule's final state on the run's training batches.
    """
    train_cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert isinstance(train_cfg, DictConfig)
    with open_dict(train_cfg):
        # The saved config refers to its run dir through Hydra's runtime; pin it.
        train_cfg.paths.output_dir = str(run_dir)
    # A run folder is data, not code: its _target_s must be ones the project allows.
    # Its own allowed_targets are not trusted; ``allowed`` comes from this command's line.
    check_targets(
        train_cfg,
        source=f"{run_dir}/.hydra/config.yaml",
        extra_packages=allowed,
        trust_config=False,
    )
    # First, with weights_only=True: a file that would run code is refused before any work.
    state = load_checkpoint(ckpt)
    # The schedule is history here: only the model and data are rebuilt.
    parts = validate_config(train_cfg, check_schedule=False)
    if parts.recipe is None:
        raise ConfigError(f"{run_dir} is a float run (quant.enabled=false): nothing to export")
    # The example training used: the captured graph (and its layer names) is the same.
    model = prepare(parts.model, parts.recipe, example_inputs=example_input(parts.datamodule))
    check_checkpoint_fits(state, model, parts.recipe.to_dict(), f"ckpt_path={ckpt}")
    weights = model_weights(state)
    assert weights is not None
    model.load_state_dict(weights, strict=True)
    if uninitialized_quantizers(model):
        _calibrate_untrained(model, parts, train_cfg, state, ckpt)
    return model.eval(), parts.datamodule, train_cfg


def _calibrate_untrained(
    model: nn.Module, parts: Any, train_cfg: DictConfig, state: Any, ckpt: Path
) -> None:
    """Calibrate a warm-up checkpoint's model as ``train`` does when training ends in warm-up
    (:meth:`QATCallback.quantize_untrained`), on the run's own training data."""
    saved = (state.get("callbacks") or {}).get("QATCallback") or {}
    if saved.get("calibrated"):
        return  # quantization had started: those quantizers never see data; export says which
    log.info(
        "%s is from epoch %s, before quantization started: calibrating its quantizers on the "
        "run's training data, as the run does when training ends in warm-up",
        ckpt.name,
        state.get("epoch"),
    )
    cb_cfg = next(
        (
            c
            for c in (train_cfg.get("callbacks") or {}).values()
            if c and str(c.get("_target_", "")).endswith("QATCallback")
        ),
        None,
    )
    seed = int(train_cfg.get("seed") or 0)
    if cb_cfg is not None:
        callback = instantiate(cb_cfg, recipe=parts.recipe.to_dict(), _convert_="all")
    else:
        callback = QATCallback(parts.recipe, parts.schedule, calibration_seed=seed)
    dm = parts.datamodule
    dm.setup("fit")
    # What the callback reads of a Trainer and a LightningModule here: the training batches,
    # the step (it seeds BN re-estimation) and the network.
    trainer = SimpleNamespace(
        train_dataloader=dm.train_dataloader(),
        datamodule=dm,
        global_step=int(state.get("global_step") or 0),
    )
    module = SimpleNamespace(model=model)
    callback.setup(trainer, module, "fit")  # type: ignore[arg-type]
    callback.quantize_untrained(trainer, module)  # type: ignore[arg-type]


def export_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    """The CLI's work, callable from Python with a composed ``export_ckpt`` config.

    The set goes to a new folder (``<run dir>/export-2``, ...) when the run's ``export/``
    already holds one, unless ``export.replace=true``.
    """
    ckpt = Path(str(cfg.ckpt_path)).expanduser().resolve()
    if not ckpt.is_file():
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path} is not a file; pass a checkpoint of a training run, "
            "e.g. <run dir>/checkpoints/last.ckpt"
        )
    run_dir = Path(cfg.run_dir).expanduser().resolve() if cfg.get("run_dir") else find_run_dir(ckpt)
    allowed = list(cfg.get("allowed_targets") or [])
    model, dm, train_cfg = load_checkpoint_model(ckpt, run_dir, allowed)
    lm = train_cfg.get("task", "classification") == "language_model"
    if lm:
        targets = list(cfg.export.get("targets") or [])
        if not set(targets) <= set(LM_TARGETS):
            raise ConfigError(
                f"export.targets={targets}: {run_dir} trained a language model, whose targets "
                f"are {', '.join(LM_TARGETS)}: pass export=lm (or export.targets=[gguf,onnx])"
            )
    report: dict[str, Any] = {"ckpt_path": str(ckpt), "run_dir": str(run_dir)}
    if not lm and cfg.get("snap_bias", True):
        # As the training pipeline does before its test: the checkpoint holds the unsnapped
        # model, snapping again gives the same biases.
        report["snapped_bias_layers"] = len(snap_model_bias(model, dm))

    def build(folder: Path) -> dict[str, Any]:
        stage = run_lm_export if lm else run_export
        return stage(model, dm_test_loader(dm), cfg.export, folder, build_model(train_cfg))

    source = {"from": "checkpoint", "path": str(ckpt), "sha256": file_digest(ckpt)}
    out_dir = Path(cfg.export.get("out_dir") or run_dir / "export")
    replace = bool(cfg.export.get("replace", False))
    report = export_folder(
        out_dir,
        lambda folder: {**report, **build(folder)},
        checkpoint=source,
        replace=replace,
        report_name=REPORT_FILE,
    )
    if replace:
        _update_results(run_dir, out_dir, report)
    failure = parity_failure(report)
    if failure is not None:
        if cfg.export.get("fail_on_parity", True):
            raise failure
        # As in training: the failure is recorded in the report and the command goes on.
        log.error("parity_failed (export.fail_on_parity=false): %s", failure)
        return report
    log.info("exported %s → %s", ckpt, report["out_dir"])
    for name, path in report.get("artifacts", {}).items():
        log.info("  %s: %s", name, path)
    return report


def _update_results(run_dir: Path, out_dir: Path, report: dict[str, Any]) -> None:
    """A replaced export folder that ``results.json`` describes: describe the new files."""
    path = run_dir / RESULTS_FILE
    if not path.is_file():
        return
    results = json.loads(path.read_text(encoding="utf-8"))
    old = Path(str((results.get("export") or {}).get("out_dir", "")))
    # The folder results.json names, also when the run folder was moved or copied since.
    recorded_run = Path(str(results.get("run_dir", "")))
    same = old.resolve() == out_dir.resolve() or (
        old.is_relative_to(recorded_run)
        and out_dir.resolve().is_relative_to(run_dir.resolve())
        and old.relative_to(recorded_run) == out_dir.resolve().relative_to(run_dir.resolve())
    )
    if not same:
        return
    results["export"] = report
    results["export_replaced_by"] = f"python -m qat.export ckpt_path={report['ckpt_path']}"
    write_json_atomic(path, results)


def main_cli(cfg: DictConfig) -> None:
    """The body of ``python -m qat.export``: a config mistake is one line and exit code 2."""
    try:
        export_checkpoint(cfg)
    except ConfigError as err:
        log.error("invalid config: %s", err)
        sys.exit(2)
    except Exception as err:  # a full disk, whatever wrapped the OSError; the rest re-raised
        full = disk_full(err)
        if full is None:
            raise
        # The set is staged beside the destination and renamed in whole: nothing was replaced.
        log.error(
            "export stopped: %s; no export folder was changed (the set is written whole or not "
            "at all): free some space and run the command again",
            full,
        )
        sys.exit(2)
