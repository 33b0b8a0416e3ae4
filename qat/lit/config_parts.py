"""Build the DataModule and the float model from the config, and check that they fit."""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import get_class, get_object, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from qat.lit.config_recipe import container
from qat.lit.errors import ConfigError

__all__ = [
    "DATA_INFO_KEYS",
    "MODEL_DATA_ARGS",
    "build_datamodule",
    "build_model",
    "check_fit",
    "model_name",
]

#: Keys of the ``data`` group that describe the images or tokens (read by the model config
#: through ``${data.*}``); passed to the DataModule only when its constructor takes them.
DATA_INFO_KEYS = ("num_classes", "in_channels", "image_size", "vocab_size")


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
        kwargs[key] = container(value)
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


#: Constructor arguments of a model of your own that are filled in from the data when the
#: constructor takes them and the config does not set them (timm spells some differently).
MODEL_DATA_ARGS = {
    "num_classes": "num_classes",
    "in_channels": "in_channels",
    "in_chans": "in_channels",
    "image_size": "image_size",
    "img_size": "image_size",
}


def example_input(dm: Any) -> torch.Tensor | None:
    """Two random images of the data's shape (fixed seed), or None when the shape is unknown:
    what graph capture traces and checks, in validation and in training alike. For text data
    (a ``vocab_size``), two random windows of token ids."""
    vocab, seq_len = getattr(dm, "vocab_size", None), getattr(dm, "seq_len", None)
    if vocab and seq_len:
        return torch.randint(0, vocab, (2, seq_len), generator=torch.Generator().manual_seed(0))
    channels, size = getattr(dm, "in_channels", None), getattr(dm, "image_size", None)
    if not channels or not size:
        return None
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(0))


def model_name(cfg: DictConfig) -> str:
    """``model.name`` of a registry model, ``hf:<folder name>`` of ``model=hf``, else the class
    name of ``model._target_``."""
    model_cfg = cfg.get("model") or {}
    if str(model_cfg.get("_target_", "")).endswith("load_hf_causal_lm"):
        missing = isinstance(model_cfg, DictConfig) and OmegaConf.is_missing(model_cfg, "path")
        path = None if missing else model_cfg.get("path")
        return f"hf:{str(path).rstrip('/').rsplit('/', 1)[-1]}" if path else "hf"
    return str(model_cfg.get("name") or str(model_cfg.get("_target_", "?")).rsplit(".", 1)[-1])


def build_model(cfg: DictConfig) -> nn.Module:
    """Instantiate ``cfg.model``: a registry model (``qat.models.create_model``) or any
    ``model._target_=your_package.YourNet``, with config-level errors."""
    model_cfg = cfg.get("model")
    if model_cfg is None:
        raise ConfigError("model: no model configured (pick one: model=resnet20, ...)")
    target = model_cfg.get("_target_")
    if target is None or OmegaConf.is_missing(model_cfg, "_target_"):
        raise ConfigError(
            "model._target_ is required: model=custom model._target_=your_package.YourNet"
        )
    extra = {}
    if target != "qat.models.create_model":
        try:
            params = inspect.signature(get_object(target)).parameters
        except Exception as err:  # hydra raises ImportError / ValueError variants
            raise ConfigError(f"model._target_={target!r} cannot be imported: {err}") from None
        data = cfg.get("data") or {}
        for arg, key in MODEL_DATA_ARGS.items():
            if arg in params and arg not in model_cfg and data.get(key) is not None:
                extra[arg] = data[key]
    try:
        return instantiate(model_cfg, **extra)
    except Exception as err:
        cause = err.__cause__ or err
        raise ConfigError(f"model ({model_name(cfg)}): {cause}") from None


def _check_lm_fit(cfg: DictConfig, dm: Any, model: nn.Module) -> None:
    """A language model must cover the data's vocabulary and window length."""
    vocab, seq_len = dm.vocab_size, dm.seq_len
    model_vocab = getattr(model, "vocab_size", None) or getattr(
        getattr(model, "config", None), "vocab_size", None
    )
    if model_vocab is not None and model_vocab < vocab:
        raise ConfigError(
            f"model.vocab_size={model_vocab} is smaller than the data's {vocab} tokens; set "
            "model.vocab_size=${data.vocab_size}"
        )
    context = getattr(model, "context_length", None)
    if context is not None and context < seq_len:
        raise ConfigError(
            f"model.context_length={context} is shorter than data.seq_len={seq_len}; set "
            "model.context_length=${data.seq_len} (or a smaller data.seq_len)"
        )
    from qat.export.lm_io import logits_of

    ids = example_input(dm)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits_of(model, ids)
    except Exception as err:
        raise ConfigError(
            f"model {model_name(cfg)!r} cannot run on token ids of shape {tuple(ids.shape)}: {err}"
        ) from None
    finally:
        model.train(was_training)


def check_fit(cfg: DictConfig, dm: Any, model: nn.Module) -> None:
    if getattr(dm, "vocab_size", None):
        _check_lm_fit(cfg, dm, model)
        return
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
                f"model {model_name(cfg)!r} cannot run on the data's "
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
