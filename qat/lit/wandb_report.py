"""Weights & Biases: the logger (offline unless logged in), tags and groups, the final results.

Runs of one sweep share a group (task name + sweep directory), so the W&B table and parallel
coordinates compare them directly; the exported models and ``results.json`` are logged as an
artifact when the run ends.
"""

from __future__ import annotations

import logging
import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from qat.lit.config_parts import model_name
from qat.lit.results import RESULTS_FILE, jsonable
from qat.quant.spec import Recipe

__all__ = ["build_wandb_logger", "log_results_to_wandb"]

log = logging.getLogger(__name__)


def _wandb_key_configured() -> bool:
    """True when W&B can sync online: an API key in the environment or from `wandb login`."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _bits_tag(recipe: Recipe | None) -> str:
    if recipe is None:
        return "float"
    return f"w{recipe.weight.bits}a{recipe.activation.bits}"


def build_wandb_logger(cfg: DictConfig, lg_cfg: DictConfig, recipe: Recipe | None) -> Logger:
    mode = os.environ.get("WANDB_MODE")
    offline = bool(lg_cfg.get("offline")) or mode in ("offline", "dryrun")
    if not offline and mode is None and not _wandb_key_configured():
        # Not logged in: record offline (sync later with `wandb sync <run dir>/wandb/...`).
        os.environ["WANDB_MODE"] = "offline"
        offline = True
        log.info("W&B: no API key configured, logging offline")
    group = lg_cfg.get("group") or _wandb_group(cfg)
    tags = list(lg_cfg.get("tags") or [])
    auto = [_bits_tag(recipe), model_name(cfg), str(cfg.get("task_name", ""))]
    if cfg.get("quant") is not None and cfg.quant.get("bits") is not None:
        auto.append(f"bits{cfg.quant.bits}")
    tags += [t for t in auto if t and t not in tags]
    Path(lg_cfg.save_dir).mkdir(parents=True, exist_ok=True)
    return instantiate(lg_cfg, offline=offline, group=group, tags=tags, _convert_="all")


def _wandb_group(cfg: DictConfig) -> str:
    group = str(cfg.get("task_name") or "qat")
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            hc = HydraConfig.get()
            if str(hc.mode) == "RunMode.MULTIRUN":
                # One group per sweep: its directory name (date_time) identifies it.
                group = f"{group}-{Path(hc.sweep.dir).name}"
    except Exception:  # pragma: no cover - outside Hydra
        pass
    return group


@rank_zero_only
def log_results_to_wandb(trainer: Trainer, results: Mapping[str, Any]) -> None:
    wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
    if not wandb_loggers:
        return
    import wandb

    run = wandb_loggers[0].experiment
    summary = {f"results/{k}": v for k, v in results["metrics"].items() if k != "all"}
    summary["results/weight_bits"] = results["bits"]["weight"]
    summary["results/act_bits"] = results["bits"]["activation"]
    export = results.get("export") or {}
    if isinstance(export, Mapping):
        for name, size in (export.get("sizes_bytes") or {}).items():
            summary[f"export/{name}_bytes"] = size
        if "parity_ok" in export:
            summary["export/parity_ok"] = export["parity_ok"]
        for target, share in (
            (export.get("placement") or {}).get("integer_mac_share") or {}
        ).items():
            summary[f"export/integer_mac_share_{target}"] = share
    run.summary.update(jsonable(summary))
    mixed = results.get("mixed_precision")
    if isinstance(mixed, Mapping) and mixed.get("layers"):
        # quant=auto's choice: one row per layer, and the sensitivity plot.
        columns = ["layer", "bits", "weights", "macs", "loss_delta_chosen"]
        table = wandb.Table(
            columns=columns, data=[[row[c] for c in columns] for row in mixed["layers"]]
        )
        logged: dict[str, Any] = {"mixed_precision/bits": table}
        if mixed.get("plot") and Path(mixed["plot"]).is_file():
            logged["mixed_precision/sensitivity"] = wandb.Image(str(mixed["plot"]))
        run.log(logged)
    files = [Path(p) for p in (export.get("artifacts") or {}).values()] if export else []
    results_file = Path(results["run_dir"]) / RESULTS_FILE
    artifact = wandb.Artifact(
        name=f"{results.get('task_name') or 'qat'}-model", type="model", metadata=jsonable(summary)
    )
    for path in [*files, results_file]:
        if path.is_file():
            artifact.add_file(str(path))
    run.log_artifact(artifact)
    wandb.finish()
