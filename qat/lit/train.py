"""``train(cfg)``: the whole run, from a composed Hydra config to ``results.json``.

The run is a short list of named stages, each a function of a :class:`Run`:

    setup → fit → snap biases → evaluate (test) → results → export → write results

``train.py`` is a thin ``@hydra.main`` shim around :func:`train`; tests call :func:`train` with
configs from ``hydra.compose``.

Example:
    >>> from hydra import compose, initialize_config_dir
    >>> with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
    ...     cfg = compose("train", overrides=["+experiment=quick"], return_hydra_config=True)
    >>> cfg.paths.output_dir = "/tmp/run"
    >>> val_acc = train(cfg)
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig
from torch import nn

from qat.export.bundle import export_folder
from qat.export.stage import parity_failure, run_export
from qat.export.stage_lm import run_lm_export
from qat.lit.builders import build_callbacks, build_loggers, build_module, log_hyperparameters
from qat.lit.checkpoint import (
    check_checkpoint_fits,
    load_checkpoint,
    load_float_weights,
    resolve_ckpt_path,
)
from qat.lit.classifier import ClassifierModule
from qat.lit.config import Validated, build_model, validate_config
from qat.lit.config_parts import example_input
from qat.lit.memory import peak_memory
from qat.lit.qat_callback import QATCallback
from qat.lit.quant_auto import OVERRIDES_FILE, auto_options, choose_bits
from qat.lit.results import RESULTS_FILE, build_results, metrics_of, optimized, write_json_atomic
from qat.lit.rundir import guard_run_dir
from qat.lit.targets import check_targets
from qat.lit.wandb_report import log_results_to_wandb
from qat.quant.integer_bias import snap_bias
from qat.quant.prepare import prepare

__all__ = ["Run", "dm_test_loader", "snap_model_bias", "train"]

log = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything one run builds, passed from stage to stage."""

    cfg: DictConfig
    run_dir: Path
    ckpt_path: str | None
    parts: Validated
    module: ClassifierModule
    trainer: Trainer
    qat_cb: QATCallback | None
    started: float
    metrics: dict[str, float] = field(default_factory=dict)
    snapped: list[str] | None = None
    ptq_ckpt: Path | None = None
    mixed: dict[str, Any] | None = None  # quant=auto's choice (qat.lit.quant_auto)

    @property
    def quantized(self) -> bool:
        return self.parts.recipe is not None

    @property
    def trains(self) -> bool:
        return bool(self.cfg.get("train", True))


def train(cfg: DictConfig) -> float | dict[str, float] | None:
    """Train, test, export and verify as ``cfg`` says; write ``results.json`` in the run dir.

    Returns:
        The metric named by ``cfg.optimized_metric`` (val/acc by default), for the Optuna
        sweeper; all metrics as a dict when ``optimized_metric`` is null.

    Raises:
        ConfigError: a bad config value, before any training.
        qat.export.ParityError: an exported model disagrees with the fake-quant model (after
            ``results.json`` has been written with the failing numbers).
    """
    run = setup(cfg)
    fit(run)
    if run.trains:
        snap_biases(run)
    evaluate(run)
    if not run.trainer.is_global_zero:
        return optimized(cfg, run.metrics)
    results = build_results(
        cfg,
        run.trainer,
        run.module.model,
        run.parts.recipe,
        run.parts.schedule,
        run.qat_cb.report() if run.qat_cb is not None else None,
        run.metrics,
    )
    if run.ptq_ckpt is not None:
        results["checkpoints"]["last"] = str(run.ptq_ckpt)
    if run.mixed is not None:
        results["mixed_precision"] = run.mixed
    error = export(run, results)
    write_results(run, results)
    if error is not None:
        fail_on_parity = bool(cfg.export.get("fail_on_parity", True))
        if results["status"] == "parity_failed" and not fail_on_parity:
            log.error("parity_failed (export.fail_on_parity=false: the run goes on): %s", error)
        else:
            log.error(
                "%s: results.json written to %s; the trained model is in %s (re-export it with "
                "`python -m qat.export ckpt_path=...`)",
                results["status"],
                run.run_dir,
                results["checkpoints"].get("last"),
            )
            raise error
    return optimized(cfg, run.metrics)


# ---------------------------------------------------------------------- stages
def setup(cfg: DictConfig) -> Run:
    """Validate the config (one clear error before any work), seed, build every part."""
    started = time.perf_counter()
    check_targets(cfg)
    run_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), run_dir)
    guard_run_dir(run_dir, ckpt_path, cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    parts = validate_config(cfg)
    model, recipe, schedule = parts.model, parts.recipe, parts.schedule
    if ckpt_path is not None and Path(ckpt_path).is_file():
        # Before anything is built on it: another model or recipe is one line, not Lightning's
        # 40-line state_dict error after the whole setup.
        _check_resume(ckpt_path, parts)
    if cfg.get("init_from"):
        # Fine-tune (or, with trainer.max_epochs=0, post-training-quantize) a trained float
        # model: its weights go in before the QAT callback swaps the layers.
        load_float_weights(model, cfg.init_from)
    auto = auto_options(cfg.get("quant"))
    mixed = None
    if auto is not None and recipe is not None and not (run_dir / OVERRIDES_FILE).is_file():
        # quant=auto: per-layer widths measured on the float weights, before QAT starts.
        recipe, mixed = choose_bits(
            auto, model, recipe, parts.datamodule, example_input(parts.datamodule), run_dir
        )
        parts = dataclasses.replace(parts, recipe=recipe)
    # The float model, before the QAT callback swaps its layers, is the distillation teacher.
    distill = float((cfg.get("module") or {}).get("distill_weight") or 0.0) > 0
    teacher = copy.deepcopy(model) if distill else None
    max_epochs = cfg.trainer.get("max_epochs")
    if recipe is not None and max_epochs and schedule.end_epoch() >= int(max_epochs) + 1:
        log.warning(
            "the QAT schedule ends at epoch %d but trainer.max_epochs=%s: the run stops before "
            "every scheduled step (annealing / freezing) has happened",
            schedule.end_epoch(),
            max_epochs,
        )
    module = build_module(cfg, model, teacher)
    module.example_input_array = example_input(parts.datamodule)
    loggers = build_loggers(cfg, recipe)
    callbacks = build_callbacks(cfg, recipe, schedule, have_logger=bool(loggers))
    trainer: Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, _convert_="all"
    )
    log_hyperparameters(trainer, cfg, module, recipe)
    qat_cb = next((cb for cb in callbacks if isinstance(cb, QATCallback)), None)
    return Run(cfg, run_dir, ckpt_path, parts, module, trainer, qat_cb, started, mixed=mixed)


def fit(run: Run) -> None:
    """``trainer.fit``; a run whose quantization never started is quantized post-training."""
    if not run.trains:
        return
    trainer, module, dm = run.trainer, run.module, run.parts.datamodule
    trainer.fit(module, datamodule=dm, ckpt_path=run.ckpt_path)
    run.metrics.update(metrics_of(trainer.callback_metrics))
    if run.qat_cb is None or not run.qat_cb.quantize_untrained(trainer, module):
        return
    if trainer.max_epochs == 0:
        log.info("trainer.max_epochs=0: post-training quantization (calibration only)")
    else:
        schedule = run.parts.schedule
        warnings.warn(
            f"training ended before quantization started (schedule.warmup_epochs="
            f"{schedule.warmup_epochs}, trainer.max_epochs={trainer.max_epochs}, fast_dev_run="
            f"{trainer.fast_dev_run}); calibrated ranges post-training so test and export see "
            "the quantized model",
            stacklevel=2,
        )
    if trainer.max_epochs == 0 and not trainer.fast_dev_run:
        # No epoch ran, so validate the calibrated model here (val/acc is what sweeps and the
        # summary read), and save it: no checkpoint callback did, and `python -m qat.export
        # ckpt_path=...` and `ckpt_path=` fine-tuning need it.
        trainer.validate(module, datamodule=dm, verbose=False)
        run.metrics.update(metrics_of(trainer.callback_metrics))
        run.ptq_ckpt = run.run_dir / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(run.ptq_ckpt)


def snap_biases(run: Run) -> None:
    """Round the biases onto the runtimes' int32 grid (``snap_bias: true``), before the test.

    The test then measures the model the integer runtimes compute, whether or not this run
    exports it.
    """
    if run.quantized and run.cfg.get("snap_bias", True) and not _is_lm(run.cfg):
        run.snapped = snap_model_bias(run.module.model, run.parts.datamodule)


def evaluate(run: Run) -> None:
    """``trainer.test`` of the final model (not the best-val checkpoint: see
    configs/callbacks/model_checkpoint.yaml), or of ``ckpt_path`` when ``train=false``."""
    if not run.cfg.get("test", True):
        return
    ckpt = None if run.trains else run.ckpt_path
    run.trainer.test(run.module, datamodule=run.parts.datamodule, ckpt_path=ckpt)
    run.metrics.update(metrics_of(run.trainer.callback_metrics))


def export(run: Run, results: dict[str, Any]) -> Exception | None:
    """The export stage (:func:`qat.export.run_export`) into ``results["export"]``.

    Returns the error to raise after ``results.json`` is written (the training results are
    worth keeping whatever went wrong in the export); sets ``results["status"]``.
    """
    results["status"] = "ok"
    options = run.cfg.get("export")
    if options is None or not options.get("enabled", False):
        return None
    if not run.quantized:
        log.info("export skipped: quant is disabled (a float run has no integer model)")
        results["export"] = {"skipped": "float run"}
        return None
    out_dir = Path(options.get("out_dir") or run.run_dir / "export")
    dm = run.parts.datamodule
    lm = _is_lm(run.cfg)
    if not lm and run.snapped is None and run.cfg.get("snap_bias", True):
        run.snapped = snap_model_bias(run.module.model, dm)

    def build(folder: Path) -> dict[str, Any]:
        # No int32 bias grid to snap to for a language model: the LM kernels add float biases.
        stage = run_lm_export if lm else run_export
        return stage(run.module.model, dm_test_loader(dm), options, folder, build_model(run.cfg))

    source = {
        "from": "training run (its final model)",
        "run_dir": str(run.run_dir),
        "last_checkpoint": results.get("checkpoints", {}).get("last"),
        "epoch": run.trainer.current_epoch,
        "global_step": run.trainer.global_step,
    }
    try:
        report = export_folder(
            out_dir, build, checkpoint=source, replace=bool(options.get("replace", False))
        )
    except Exception as err:
        results["status"] = "export_failed"
        results["export"] = {"error": f"{type(err).__name__}: {err}"}
        return err
    report["snapped_bias_layers"] = len(run.snapped or [])
    results["export"] = report
    failure = parity_failure(report)
    if failure is not None:
        results["status"] = "parity_failed"
    return failure


def write_results(run: Run, results: dict[str, Any]) -> None:
    """``results.json`` (atomically), W&B, and the summary table."""
    results["wall_time_s"] = round(time.perf_counter() - run.started, 2)
    results["peak_memory"] = peak_memory()
    write_json_atomic(run.run_dir / RESULTS_FILE, results)
    log_results_to_wandb(run.trainer, results)
    _print_summary(results)


# ---------------------------------------------------------------------- helpers
def _is_lm(cfg: DictConfig) -> bool:
    return cfg.get("task", "classification") == "language_model"


def dm_test_loader(dm: Any) -> Any:
    """The DataModule's test loader (set up first if needed)."""
    if getattr(dm, "test_set", None) is None:
        dm.setup("test")
    return dm.test_dataloader()


def snap_model_bias(model: nn.Module, dm: Any) -> list[str]:
    """:func:`qat.snap_bias` on the final model, with 8 images of the first test batch."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    example = next(iter(dm_test_loader(dm)))[0][:8].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return list(snap_bias(model, example))
    finally:
        model.train(was_training)


def _check_resume(ckpt_path: str, parts: Validated) -> None:
    """The checkpoint to resume from was trained with this config's model and recipe."""
    model = copy.deepcopy(parts.model)
    if parts.recipe is not None:
        model = prepare(model, parts.recipe, example_inputs=example_input(parts.datamodule))
    state = load_checkpoint(ckpt_path)
    recipe = parts.recipe.to_dict() if parts.recipe is not None else None
    check_checkpoint_fits(state, model, recipe, f"ckpt_path={ckpt_path}")


@rank_zero_only
def _print_summary(results: dict[str, Any]) -> None:
    from qat.lit.summary import print_summary

    try:
        print_summary(results)
    except Exception as err:  # the table is a nicety; never fail a finished run over it
        log.warning("could not print the summary table: %s", err)
