"""Export a trained checkpoint again: ``python -m qat.export ckpt_path=<run>/checkpoints/last.ckpt``.

Reads the training run's ``.hydra/config.yaml`` (found above the checkpoint, or ``run_dir=``),
rebuilds the model, prepares it with the run's recipe, loads the checkpoint's weights and
quantizer state (:func:`qat.checkpoint.load_checkpoint`, ``weights_only=True``: a file that
would run code is refused), then exports, verifies, checks parity and benchmarks exactly as the
training pipeline does, into ``<run dir>/export/`` (or ``export.out_dir``), with
``export_report.json`` beside the models.

Options (Hydra overrides, composed with ``configs/export_ckpt.yaml``)::

    export.targets=[onnx,torchscript]  export.int4_packed=true  export.out_dir=...
    export.verify=false  export.bench=false  export.verify_batches=20
    export.fused_add=true  export.fail_on_parity=false
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger("qat.export")

CONFIG_PATH = "../../configs"


def find_run_dir(ckpt: Path) -> Path:
    """The nearest directory above ``ckpt`` holding ``.hydra/config.yaml``."""
    for parent in ckpt.parents:
        if (parent / ".hydra" / "config.yaml").is_file():
            return parent
    from qat.config import ConfigError

    raise ConfigError(
        f"no .hydra/config.yaml above {ckpt}: pass run_dir=<the training run's directory>"
    )


def load_checkpoint_model(ckpt: Path, run_dir: Path) -> tuple[Any, Any, DictConfig]:
    """Rebuild the run's prepared model with the checkpoint's state; also its DataModule."""
    from qat.checkpoint import load_checkpoint
    from qat.config import ConfigError, validate_config
    from qat.prepare import prepare

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
    model = prepare(parts.model, parts.recipe)
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
    from qat.config import ConfigError

    ckpt = Path(str(cfg.ckpt_path)).expanduser().resolve()
    if not ckpt.is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} is not a file")
    from qat.config import build_model
    from qat.pipeline import _snap_bias, run_export, write_json_atomic

    run_dir = Path(cfg.run_dir).expanduser().resolve() if cfg.get("run_dir") else find_run_dir(ckpt)
    model, dm, train_cfg = load_checkpoint_model(ckpt, run_dir)
    out_dir = Path(cfg.export.get("out_dir") or run_dir / "export")
    report_path = out_dir / "export_report.json"
    report: dict[str, Any] = {"ckpt_path": str(ckpt), "run_dir": str(run_dir)}
    try:
        if cfg.export.get("snap_bias", True):
            # As the training pipeline does before its test: the checkpoint holds the unsnapped
            # model, snapping again gives the same biases.
            report["snapped_bias_layers"] = len(_snap_bias(model, dm))
        report.update(run_export(model, dm, cfg.export, out_dir, build_model(train_cfg)))
    except Exception as err:
        if type(err).__name__ != "ParityError":
            raise
        report.update(getattr(err, "qat_export_results", {"error": str(err)}))
        write_json_atomic(report_path, report)
        if cfg.export.get("fail_on_parity", True):
            raise
        # As in training: the failure is recorded in the report and the command goes on.
        log.error("parity_failed (export.fail_on_parity=false): %s", err)
        return report
    write_json_atomic(report_path, report)
    log.info("exported %s → %s", ckpt, out_dir)
    for name, path in report.get("artifacts", {}).items():
        log.info("  %s: %s", name, path)
    return report


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export_ckpt")
def main(cfg: DictConfig) -> None:
    from qat.config import ConfigError

    try:
        export_checkpoint(cfg)
    except ConfigError as err:
        log.error("invalid config: %s", err)
        sys.exit(2)


if __name__ == "__main__":
    os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[2]))
    main()
