"""Export a trained checkpoint again: ``python -m qat.export ckpt_path=<run>/checkpoints/last.ckpt``.

Reads the training run's ``.hydra/config.yaml`` (found above the checkpoint, or ``run_dir=``),
rebuilds the model, prepares it with the run's recipe, loads the checkpoint's weights and
quantizer state (:func:`qat.lit.checkpoint.load_checkpoint`, ``weights_only=True``: a file that
would run code is refused), then exports, verifies, checks parity and benchmarks exactly as the
training pipeline does, into ``<run dir>/export/`` (or ``export.out_dir``), with
``export_report.json`` beside the models.

The entry point is ``qat/export/__main__.py``; the work is here, in the app, because it starts
from the training run's Hydra config. Options (Hydra overrides, composed with
``configs/export_ckpt.yaml``)::

    export.targets=[onnx,torchscript]  export.int4_packed=true  export.out_dir=...
    export.verify=false  export.bench=false  export.verify_batches=20
    export.fail_on_parity=false  snap_bias=false
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from qat.export.stage import parity_failure, run_export
from qat.export.stage_lm import LM_TARGETS, run_lm_export
from qat.lit.checkpoint import load_checkpoint
from qat.lit.config import ConfigError, build_model, validate_config
from qat.lit.config_parts import example_input
from qat.lit.results import write_json_atomic
from qat.lit.train import dm_test_loader, snap_model_bias
from qat.quant.prepare import prepare

__all__ = ["export_checkpoint", "find_run_dir", "load_checkpoint_model", "main_cli"]

log = logging.getLogger("qat.export")


def find_run_dir(ckpt: Path) -> Path:
    """The nearest directory above ``ckpt`` holding ``.hydra/config.yaml``."""
    for parent in ckpt.parents:
        if (parent / ".hydra" / "config.yaml").is_file():
            return parent
    raise ConfigError(
        f"no .hydra/config.yaml above {ckpt}: pass run_dir=<the training run's directory>"
    )


def load_checkpoint_model(ckpt: Path, run_dir: Path) -> tuple[Any, Any, DictConfig]:
    """Rebuild the run's prepared model with the checkpoint's state; also its DataModule."""
    train_cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert isinstance(train_cfg, DictConfig)
    with open_dict(train_cfg):
        # The saved config refers to its run dir through Hydra's runtime; pin it.
        train_cfg.paths.output_dir = str(run_dir)
    # First, with weights_only=True: a file that would run code is refused before any work.
    state = load_checkpoint(ckpt)
    # The schedule is history here: only the model and data are rebuilt.
    parts = validate_config(train_cfg, check_schedule=False)
    if parts.recipe is None:
        raise ConfigError(f"{run_dir} is a float run (quant.enabled=false): nothing to export")
    # The example training used: the captured graph (and its layer names) is the same.
    model = prepare(parts.model, parts.recipe, example_inputs=example_input(parts.datamodule))
    weights = state.get("state_dict", state) if isinstance(state, dict) else state
    prefix = "model."
    if any(k.startswith(prefix) for k in weights):
        weights = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise ConfigError(
            f"{ckpt} does not fit the model of {run_dir}/.hydra/config.yaml: {err}"
        ) from None
    return model.eval(), parts.datamodule, train_cfg


def export_checkpoint(cfg: DictConfig) -> dict[str, Any]:
    """The CLI's work, callable from Python with a composed ``export_ckpt`` config."""
    ckpt = Path(str(cfg.ckpt_path)).expanduser().resolve()
    if not ckpt.is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} is not a file")
    run_dir = Path(cfg.run_dir).expanduser().resolve() if cfg.get("run_dir") else find_run_dir(ckpt)
    model, dm, train_cfg = load_checkpoint_model(ckpt, run_dir)
    out_dir = Path(cfg.export.get("out_dir") or run_dir / "export")
    report_path = out_dir / "export_report.json"
    report: dict[str, Any] = {"ckpt_path": str(ckpt), "run_dir": str(run_dir)}
    if train_cfg.get("task", "classification") == "language_model":
        targets = list(cfg.export.get("targets") or [])
        if not set(targets) <= set(LM_TARGETS):
            raise ConfigError(
                f"export.targets={targets}: {run_dir} trained a language model, whose targets "
                f"are {', '.join(LM_TARGETS)}: pass export=lm (or export.targets=[gguf,onnx])"
            )
        report.update(
            run_lm_export(model, dm_test_loader(dm), cfg.export, out_dir, build_model(train_cfg))
        )
    elif cfg.get("snap_bias", True):
        # As the training pipeline does before its test: the checkpoint holds the unsnapped
        # model, snapping again gives the same biases.
        report["snapped_bias_layers"] = len(snap_model_bias(model, dm))
    if "artifacts" not in report:
        report.update(
            run_export(model, dm_test_loader(dm), cfg.export, out_dir, build_model(train_cfg))
        )
    write_json_atomic(report_path, report)
    failure = parity_failure(report)
    if failure is not None:
        if cfg.export.get("fail_on_parity", True):
            raise failure
        # As in training: the failure is recorded in the report and the command goes on.
        log.error("parity_failed (export.fail_on_parity=false): %s", failure)
        return report
    log.info("exported %s → %s", ckpt, out_dir)
    for name, path in report.get("artifacts", {}).items():
        log.info("  %s: %s", name, path)
    return report


def main_cli(cfg: DictConfig) -> None:
    """The body of ``python -m qat.export``: a config mistake is one line and exit code 2."""
    try:
        export_checkpoint(cfg)
    except ConfigError as err:
        log.error("invalid config: %s", err)
        sys.exit(2)
