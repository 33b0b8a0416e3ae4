"""Build the parts of a run from its config: the LightningModule, callbacks, loggers.

Everything is instantiated with ``hydra.utils.instantiate`` from the composed config; the
network itself comes from :func:`qat.lit.config.build_model` (validated first).
"""

from __future__ import annotations

import logging
from typing import Any

from hydra.utils import instantiate
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qat.lit.classifier import ClassifierModule
from qat.lit.lm import LanguageModelModule
from qat.lit.qat_callback import QATCallback
from qat.lit.wandb_report import build_wandb_logger
from qat.quant.schedule import Schedule
from qat.quant.spec import Recipe

__all__ = ["build_callbacks", "build_loggers", "build_module", "log_hyperparameters"]

log = logging.getLogger(__name__)


def build_module(
    cfg: DictConfig, model: nn.Module, teacher: nn.Module | None = None
) -> LightningModule:
    """The LightningModule (``ClassifierModule``, or ``LanguageModelModule`` for
    ``task: language_model``) from ``cfg.optimizer`` / ``cfg.scheduler`` / ``cfg.module``;
    ``teacher`` is the network to distil from when ``module.distill_weight > 0``."""
    optimizer = instantiate(cfg.optimizer) if cfg.get("optimizer") else None
    scheduler_cfg = cfg.get("scheduler")
    scheduler = (
        instantiate(scheduler_cfg) if scheduler_cfg and "_target_" in scheduler_cfg else None
    )
    options = OmegaConf.to_container(cfg.get("module") or {}, resolve=True)
    assert isinstance(options, dict)
    if cfg.get("task", "classification") == "language_model":
        # channels_last is for images only.
        keys = (
            "scheduler_interval",
            "label_smoothing",
            "distill_weight",
            "distill_temperature",
            "lora_rank",
            "lora_alpha",
            "lora_targets",
        )
        return LanguageModelModule(
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            teacher=teacher,
            **{k: v for k, v in options.items() if k in keys},
        )
    return ClassifierModule(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        num_classes=int(cfg.data.num_classes),
        teacher=teacher,
        **options,
    )


def build_callbacks(
    cfg: DictConfig, recipe: Recipe | None, schedule: Schedule, have_logger: bool = True
) -> list[Callback]:
    """Instantiate ``cfg.callbacks``; the QAT callback gets the recipe (or is dropped for float).

    Callbacks that need a logger (the LR monitor) are left out when there is none.
    """
    callbacks: list[Callback] = []
    have_qat = False
    no_bar_ok = (cfg.get("trainer") or {}).get("enable_progress_bar", True) is not False
    for name, cb_cfg in (cfg.get("callbacks") or {}).items():
        if not cb_cfg or "_target_" not in cb_cfg:
            continue
        if cb_cfg._target_.endswith("QATCallback"):
            if recipe is None:
                continue
            # The validated recipe and schedule (the schedule fitted to the run's length), not
            # the config's ${schedule}.
            callbacks.append(
                instantiate(
                    cb_cfg, recipe=recipe.to_dict(), schedule=schedule.to_dict(), _convert_="all"
                )
            )
            have_qat = True
        elif cb_cfg._target_.endswith("LearningRateMonitor") and not have_logger:
            log.info("callback %s left out: it needs a logger (logger=none)", name)
            continue
        elif cb_cfg._target_.endswith("ProgressBar") and not no_bar_ok:
            continue  # trainer.enable_progress_bar=false
        else:
            callbacks.append(instantiate(cb_cfg, _convert_="all"))
        log.debug("callback %s: %s", name, type(callbacks[-1]).__name__)
    if recipe is not None and not have_qat:
        # A quantized run without the QAT callback would silently train in float.
        callbacks.append(QATCallback(recipe, schedule, calibration_seed=int(cfg.get("seed") or 0)))
    return callbacks


def build_loggers(cfg: DictConfig, recipe: Recipe | None) -> list[Logger]:
    loggers: list[Logger] = []
    for name, lg_cfg in (cfg.get("logger") or {}).items():
        if not lg_cfg or "_target_" not in lg_cfg:
            continue
        if lg_cfg._target_.endswith("WandbLogger"):
            loggers.append(build_wandb_logger(cfg, lg_cfg, recipe))
        else:
            loggers.append(instantiate(lg_cfg, _convert_="all"))
        log.debug("logger %s: %s", name, type(loggers[-1]).__name__)
    return loggers


def log_hyperparameters(
    trainer: Trainer, cfg: DictConfig, module: LightningModule, recipe: Recipe | None
) -> None:
    if not trainer.loggers:
        return
    resolved = _resolved(cfg)
    params = sum(p.numel() for p in module.model.parameters())
    resolved["model/params"] = params
    resolved["quant/recipe"] = recipe.to_dict() if recipe else None
    for lg in trainer.loggers:
        lg.log_hyperparams(resolved)


def _resolved(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain data, without Hydra's own node (present in composed test configs)."""
    out: dict[str, Any] = {}
    for key in cfg:
        if key == "hydra":
            continue
        value = cfg[key]
        out[str(key)] = (
            OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        )
    return out
