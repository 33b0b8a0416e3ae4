"""A timm-style model registry: ``@register_model`` on a builder, ``create_model(name, **kw)``.

Builders are plain functions returning a float ``nn.Module``; the registry knows nothing of
quantization. Hydra configs build models by name::

    model:
      _target_: qat.models.create_model
      name: resnet20
      num_classes: 10

Example:
    >>> from qat.models import create_model, list_models
    >>> "resnet20" in list_models()
    True
    >>> model = create_model("resnet20", num_classes=10)
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from typing import TypeVar, overload

from torch import nn

__all__ = ["create_model", "list_models", "register_model"]

_F = TypeVar("_F", bound=Callable[..., nn.Module])
_MODELS: dict[str, Callable[..., nn.Module]] = {}


@overload
def register_model(fn: _F, *, name: str | None = None) -> _F: ...
@overload
def register_model(fn: None = None, *, name: str | None = None) -> Callable[[_F], _F]: ...
def register_model(fn: _F | None = None, *, name: str | None = None) -> _F | Callable[[_F], _F]:
    """Register a model builder under ``name`` (default: the function's name).

    Use bare (``@register_model``) or with a name (``@register_model(name="my_net")``).

    Raises:
        ValueError: if the name is already taken (two builders would silently shadow each other).
    """

    def decorator(builder: _F) -> _F:
        key = name or builder.__name__
        if key in _MODELS and _MODELS[key] is not builder:
            raise ValueError(
                f"model name {key!r} is already registered (by {_MODELS[key].__module__}); "
                "pass register_model(name=...) a different name"
            )
        _MODELS[key] = builder
        return builder

    return decorator(fn) if fn is not None else decorator


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted names of the registered models, optionally filtered by a shell-style pattern.

    Example:
        >>> list_models("resnet*")
        ['resnet18', 'resnet20', 'resnet32', 'resnet56']
    """
    names = sorted(_MODELS)
    return names if pattern is None else fnmatch.filter(names, pattern)


def create_model(name: str, **kwargs: object) -> nn.Module:
    """Build the registered model ``name`` with keyword arguments ``kwargs``.

    Every model accepts ``num_classes``, ``in_channels`` and ``image_size``; families add their
    own (``width_mult``, ``base_width``, ...). Bad values raise ``ValueError`` naming the argument.

    Raises:
        ValueError: unknown model name.
        TypeError: keyword argument the model does not take (the message lists the ones it does).
    """
    if name not in _MODELS:
        raise ValueError(
            f"unknown model {name!r}; available: {', '.join(list_models())} "
            "(pick one of these, or register yours with @qat.models.register_model)"
        )
    builder = _MODELS[name]
    params = inspect.signature(builder).parameters
    takes_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(set(kwargs) - set(params))
    if unknown and not takes_var_kw:
        raise TypeError(
            f"model {name!r} got unexpected argument(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(params)}"
        )
    return builder(**kwargs)
