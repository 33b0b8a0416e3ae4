"""The run length (``trainer.*``) and the optimizer, checked before any work."""

from __future__ import annotations

import math
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from qat.lit.errors import ConfigError

__all__ = ["check_optimizer", "check_trainer"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_trainer(cfg: DictConfig) -> None:
    """The run length: finite, so the QAT and learning-rate schedules can be laid out on it."""
    trainer = cfg.get("trainer") or {}
    steps = trainer.get("max_steps", -1)
    if not _is_int(steps) or steps < -1:
        raise ConfigError(
            f"trainer.max_steps={steps!r} is invalid: expected an integer >= 0, or -1 for no "
            "step limit (then trainer.max_epochs bounds the run)"
        )
    epochs = trainer.get("max_epochs")
    if not (_is_int(epochs) and epochs >= 0) and not (epochs in (None, -1) and steps > 0):
        raise ConfigError(
            f"trainer.max_epochs={epochs!r} is invalid: expected an integer >= 0 (0: calibrate "
            "only, post-training quantization), e.g. trainer.max_epochs=8; the QAT schedule "
            "and the learning-rate schedule need a run of known length (-1 or null only with "
            "trainer.max_steps=N)"
        )
    least = trainer.get("min_epochs")
    if least is not None and not (_is_int(least) and least >= 0):
        raise ConfigError(
            f"trainer.min_epochs={least!r} is invalid: expected an integer >= 0 or null"
        )


def check_optimizer(cfg: DictConfig) -> None:
    """Numbers first (naming the key), then a dry run of the optimizer on one parameter."""
    opt = cfg.get("optimizer")
    if opt is None:
        return
    for key in ("lr", "weight_decay", "momentum"):
        value = opt.get(key)
        if key not in opt or (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and value >= 0
        ):
            continue
        example = {"lr": 0.1, "weight_decay": 5.0e-4, "momentum": 0.9}[key]
        raise ConfigError(
            f"optimizer.{key}={value!r} is invalid: expected a finite number >= 0, "
            f"e.g. optimizer.{key}={example}"
        )
    try:
        instantiate(opt)([nn.Parameter(torch.zeros(1))])
    except Exception as err:  # torch's own checks (e.g. nesterov without momentum)
        text = str(err).strip().splitlines()
        raise ConfigError(
            f"optimizer ({opt.get('_target_', '?')}): {text[0] if text else type(err).__name__}"
        ) from None
