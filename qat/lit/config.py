"""Config validation for the application: one clear error before any training starts.

:func:`validate_config` builds (cheaply) everything a bad override can break, in the order a
user would want to hear about it: the quantization recipe and schedule, the run length and
the optimizer, the DataModule and its files, the model, and whether model and data fit
together. Every failure is a :class:`ConfigError` whose message names the config key and says
how to fix it.

Example:
    >>> from hydra import compose, initialize_config_dir
    >>> with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
    ...     cfg = compose("train", overrides=["quant.bits=1"])
    >>> validate_config(cfg)
    Traceback (most recent call last):
    ConfigError: quant.bits=1 is invalid: allowed 2–8 (integer grid) or 16/32 (keep float) ...
"""

from __future__ import annotations

import copy
import inspect
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from qat.quant.control import iter_quantizers
from qat.quant.prepare import prepare
from qat.quant.schedule import ROLES, Schedule
from qat.quant.spec import (
    FLOAT_BITS,
    QUANT_BITS,
    QuantSpec,
    Recipe,
    default_activation_spec,
    default_weight_spec,
)

__all__ = [
    "CONFIG_DIR",
    "QUANT_KEYS",
    "ConfigError",
    "Validated",
    "build_datamodule",
    "build_model",
    "build_recipe",
    "validate_config",
]

#: The repository's Hydra configs (a source checkout / editable install).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

#: Keys of the ``quant`` group that are not Recipe fields.
QUANT_KEYS = ("enabled", "bits", "name")

#: Keys of the ``data`` group that describe the images (read by the model config through
#: ``${data.*}``); passed to the DataModule only when its constructor takes them.
DATA_INFO_KEYS = ("num_classes", "in_channels", "image_size")

EXPORT_TARGETS = ("torchscript", "onnx")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


@dataclass
class Validated:
    """What validation built, reused by the pipeline (nothing is built twice)."""

    datamodule: Any
    model: nn.Module
    recipe: Recipe | None
    schedule: Schedule


def _container(node: Any) -> Any:
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def build_recipe(quant: Any) -> Recipe | None:
    """The :class:`qat.Recipe` of a ``quant`` config group (None when ``enabled: false``).

    ``quant.bits`` is the sweep shortcut (the presets interpolate it into the weight and/or
    activation bits); it is checked first so ``quant.bits=1`` fails with its own name.
    """
    if quant is None:
        return None
    data = _container(quant)
    if not isinstance(data, dict):
        raise ConfigError(f"quant must be a mapping (a quant preset), got {data!r}")
    if not data.get("enabled", True):
        return None
    bits = data.get("bits")
    if bits is not None and (
        isinstance(bits, bool) or not isinstance(bits, int) or bits not in QUANT_BITS + FLOAT_BITS
    ):
        raise ConfigError(
            f"quant.bits={bits!r} is invalid: allowed 2–8 (integer grid) or 16/32 (keep float), "
            "e.g. quant.bits=4; for a float run use quant=float"
        )
    fields = {k: v for k, v in data.items() if k not in QUANT_KEYS}
    try:
        return Recipe.from_dict(fields)
    except ValueError as err:
        raise _recipe_error(fields, err) from None


def _renamed(message: str, key: str) -> str:
    # The dataclasses name themselves ("QuantSpec.bits=12"); the user typed a config key.
    return re.sub(r"\b(QuantSpec|Recipe)\b", key, message)


def _recipe_error(fields: dict[str, Any], err: ValueError) -> ConfigError:
    """``err`` from ``Recipe.from_dict(fields)``, re-worded with the config key at fault.

    The recipe is rebuilt piece by piece (specs, then the recipe without overrides, then one
    override more at a time) to find which key the error belongs to.
    """
    specs = (("weight", default_weight_spec), ("activation", default_activation_spec))
    for role, base in specs:
        value = fields.get(role)
        if value is None:
            continue
        if not isinstance(value, Mapping):
            return ConfigError(
                f"quant.{role}={value!r} is invalid: expected a mapping of QuantSpec fields"
            )
        try:
            QuantSpec.from_dict(value, base=base())
        except ValueError as spec_err:
            return ConfigError(_renamed(str(spec_err), f"quant.{role}"))
    head = {k: v for k, v in fields.items() if k != "overrides"}
    try:
        Recipe.from_dict(head)
    except ValueError as head_err:
        return ConfigError(_renamed(str(head_err), "quant"))
    overrides = fields.get("overrides")
    if isinstance(overrides, list):
        for i, ov in enumerate(overrides):
            key = f"quant.overrides[{i}]"
            for role in ("weight", "activation"):
                value = ov.get(role) if isinstance(ov, Mapping) else None
                if isinstance(value, Mapping):
                    try:
                        QuantSpec.from_dict(value)
                    except ValueError as spec_err:
                        return ConfigError(_renamed(str(spec_err), f"{key}.{role}"))
            try:
                Recipe.from_dict({**head, "overrides": overrides[: i + 1]})
            except ValueError as ov_err:
                message = re.sub(r"\bLayerOverride\b", key, str(ov_err))
                message = re.sub(r"\bRecipe\b", "quant", message)
                return ConfigError(message if message.startswith(key) else f"{key}: {message}")
    return ConfigError(f"quant: {err}")


def _info_value(cfg: DictConfig, key: str) -> Any:
    """``cfg.data.<key>`` or None when absent / unresolvable / ``???``."""
    if key not in cfg.data or OmegaConf.is_missing(cfg.data, key):
        return None
    return cfg.data[key]


def build_datamodule(cfg: DictConfig, check: bool = True) -> Any:
    """Instantiate ``cfg.data`` (dropping the image-description keys its class does not take).

    With ``check``, locate its files (``DataModule.check()``) and reconcile
    ``data.num_classes`` / ``in_channels`` / ``image_size`` with what the DataModule yields:
    missing values are filled in (so ``${data.num_classes}`` works for ImageFolder), wrong ones
    are an error.
    """
    data = cfg.get("data")
    if data is None or "_target_" not in data:
        raise ConfigError("data: no DataModule configured (pick one: data=fashion_mnist, ...)")
    try:
        cls = get_class(data._target_)
    except Exception as err:  # hydra raises ImportError / ValueError variants
        raise ConfigError(f"data._target_={data._target_!r} cannot be imported: {err}") from None
    takes = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {}
    for key in data:
        if key == "_target_" or (key in DATA_INFO_KEYS and key not in takes):
            continue
        if OmegaConf.is_missing(data, key):
            raise ConfigError(f"data.{key} is required: set data.{key}=...")
        value = data[key]  # resolves interpolations like ${paths.data_dir} against cfg
        kwargs[key] = _container(value)
    try:
        dm = cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(_data_arg_error(str(err), kwargs, cls.__name__)) from None
    if not check:
        return dm
    try:
        dm.check()
    except FileNotFoundError as err:
        raise ConfigError(
            f"data: {err} (data.data_dir={getattr(dm, 'data_dir', None)}; set "
            "data.data_dir=... or paths.data_dir=...)"
        ) from None
    except ValueError as err:  # files that are there but unreadable (e.g. a corrupt image)
        raise ConfigError(f"data: {err}") from None
    with open_dict(cfg):
        for key in DATA_INFO_KEYS:
            actual = getattr(dm, key, None)
            declared = _info_value(cfg, key)
            if declared is None and actual is not None:
                cfg.data[key] = actual
            elif actual is not None and declared != actual:
                raise ConfigError(
                    f"data.{key}={declared} does not match the data: {cls.__name__} yields "
                    f"{key}={actual}; drop the override (or set data.{key}={actual})"
                )
    return dm


# The DataModules' argument checks say "batch_size must be an int >= 1, got 0".
_ARG_ERROR = re.compile(r"^(\w+) must be (.+), got (.+)$")


def _data_arg_error(message: str, kwargs: Mapping[str, Any], name: str) -> str:
    """A DataModule's refusal of one argument, re-worded with its config key."""
    match = _ARG_ERROR.match(message)
    if match and match.group(1) in kwargs:
        key, allowed, value = match.groups()
        return f"data.{key}={value} is invalid: expected {allowed} ({name})"
    key = message.split(" ", 1)[0]
    if key in kwargs:
        return f"data.{message} ({name})"
    return f"data: cannot build {name}: {message}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_trainer(cfg: DictConfig) -> None:
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


def _check_optimizer(cfg: DictConfig) -> None:
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


def build_model(cfg: DictConfig) -> nn.Module:
    """Instantiate ``cfg.model`` (``qat.models.create_model``), with config-level errors."""
    model_cfg = cfg.get("model")
    if model_cfg is None:
        raise ConfigError("model: no model configured (pick one: model=resnet20, ...)")
    try:
        return instantiate(model_cfg)
    except Exception as err:
        cause = err.__cause__ or err
        name = model_cfg.get("name", "?")
        raise ConfigError(f"model (model.name={name!r}): {cause}") from None


def _check_fit(cfg: DictConfig, dm: Any, model: nn.Module) -> None:
    for key in DATA_INFO_KEYS:
        want, got = getattr(dm, key, None), getattr(model, key, None)
        if want is None or got is None or want == got:
            continue
        if key == "image_size" and not _needs_exact_size(model):
            continue
        raise ConfigError(
            f"model.{key}={got} does not match the data ({type(dm).__name__}: {key}={want}); "
            f"drop the model.{key} override or set data to one with {key}={got}"
        )
    # One tiny float forward catches what the attributes cannot (e.g. a size that is too small).
    size = getattr(dm, "image_size", None)
    channels = getattr(dm, "in_channels", None)
    if size and channels:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(torch.zeros(2, channels, size, size))
        except Exception as err:
            raise ConfigError(
                f"model {cfg.model.get('name', '?')!r} cannot run on the data's "
                f"{channels}x{size}x{size} images: {err}"
            ) from None
        finally:
            model.train(was_training)
        classes = getattr(dm, "num_classes", None)
        if classes and out.shape[-1] != classes:
            raise ConfigError(
                f"model outputs {out.shape[-1]} classes, the data has {classes}; "
                "set model.num_classes=${data.num_classes}"
            )


def _needs_exact_size(model: nn.Module) -> bool:
    # Models without global pooling size a Linear layer from image_size (LeNet-5).
    return not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules())


def _check_schedule(cfg: DictConfig, schedule: Schedule, qmodel: nn.Module) -> None:
    """The bit-width annealing must go down to the recipe's targets, within the run."""
    trainer = cfg.get("trainer") or {}
    max_epochs = trainer.get("max_epochs")
    # fast_dev_run runs one batch whatever max_epochs says; a run without training (test or
    # export only) or one that ends before quantization starts (post-training calibration to
    # the final state) never stops mid-anneal.
    bounded = (
        bool(cfg.get("train", True))
        and not trainer.get("fast_dev_run")
        and isinstance(max_epochs, int)
        and not isinstance(max_epochs, bool)
        and max_epochs >= 1
    )
    for role in ROLES:
        name = "weight_anneal" if role == "weight" else "act_anneal"
        anneal = schedule.anneal_for(role)
        bits = [q.spec.bits for _, q in iter_quantizers(qmodel, role) if q.spec.enabled]
        if not bits:
            continue
        target = min(bits)
        if anneal.epochs > 0 and anneal.start_bits < target:
            raise ConfigError(
                f"schedule.{name}.start_bits={anneal.start_bits} is below the {role} target of "
                f"{target} bits (annealing only lowers the bit width): allowed {target}–8, or "
                f"schedule.{name}.epochs=0 for no annealing"
            )
        if not bounded or schedule.start_of(role) >= max_epochs:
            continue
        end_bits = schedule.bits(role, target, max_epochs - 1, 1.0)
        if end_bits > target:
            first = schedule.start_of(role) if anneal.start_epoch is None else anneal.start_epoch
            raise ConfigError(
                f"schedule.{name} (epochs={anneal.epochs} from epoch {first}) ends after "
                f"trainer.max_epochs={max_epochs}: the run would stop at {end_bits}-bit {role}s, "
                f"above the target {target}; set trainer.max_epochs>={first + anneal.epochs} or "
                f"shorten schedule.{name}.epochs"
            )


def validate_config(
    cfg: DictConfig, check_data: bool = True, check_schedule: bool = True
) -> Validated:
    """Check ``cfg`` and build the DataModule, float model, recipe and schedule.

    Args:
        cfg: the composed ``train`` config.
        check_data: locate the data files and check the model fits the data.
        check_schedule: check the bit-width annealing reaches the recipe's targets within
            ``trainer.max_epochs`` (off when only the model is rebuilt, e.g. to re-export).

    Raises:
        ConfigError: the first problem found, with the key and how to fix it.
    """
    recipe = build_recipe(cfg.get("quant"))
    try:
        schedule = Schedule.from_dict(cfg.get("schedule"))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    export = cfg.get("export")
    if export is not None and export.get("enabled", False):
        targets = list(export.get("targets") or [])
        bad = [t for t in targets if t not in EXPORT_TARGETS]
        if bad or not targets:
            raise ConfigError(
                f"export.targets={targets} is invalid: choose from {', '.join(EXPORT_TARGETS)}"
            )
    distill = (cfg.get("module") or {}).get("distill_weight")
    if distill and not cfg.get("init_from"):
        raise ConfigError(
            f"module.distill_weight={distill} distils from the float model given as "
            "init_from=<float checkpoint>, and none is given: add init_from= or set "
            "module.distill_weight=0"
        )
    metric = cfg.get("optimized_metric")
    if metric is not None and not isinstance(metric, str):
        raise ConfigError(f"optimized_metric={metric!r} must be a metric name like val/acc")
    _check_trainer(cfg)
    _check_optimizer(cfg)
    dm = build_datamodule(cfg, check=check_data)
    model = build_model(cfg)
    if check_data:
        _check_fit(cfg, dm, model)
    if recipe is not None:
        try:
            # A dry run on a copy: override patterns that match no layer fail here.
            qmodel = prepare(copy.deepcopy(model), recipe)
        except ValueError as err:
            message = str(err)
            raise ConfigError(
                f"quant.{message}" if message.startswith("overrides[") else f"quant: {message}"
            ) from None
        if check_schedule:
            _check_schedule(cfg, schedule, qmodel)
    return Validated(datamodule=dm, model=model, recipe=recipe, schedule=schedule)
