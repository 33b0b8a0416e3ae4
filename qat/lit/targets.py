"""Which ``_target_`` a config may instantiate: the project's, and packages the user names.

``hydra.utils.instantiate`` calls whatever dotted path a config names, so a config is code. A
run folder's ``.hydra/config.yaml`` is rebuilt by ``python -m qat.export`` and a copied one
could name ``os.makedirs`` as its model; on the command line ``builtins.print`` would run too
(Hydra's own blocklist stops only ``os.system`` and a few others). :func:`check_targets` walks
the config before anything is built and allows only

- the project's own classes and registry (``qat.*``);
- what the stock configs use: torch optimizers and schedulers, Lightning's Trainer, callbacks,
  loggers, strategies and plugins, Hugging Face ``transformers.Auto*`` classes;
- packages the user names: ``allowed_targets: [my_pkg]`` (a top-level key, in a config file or
  as ``+allowed_targets=[my_pkg]`` on the command line);
- with ``model=custom``, the package of the ``model._target_`` given on the command line
  (README: ``model=custom model._target_=my_pkg.Net``).

The standard library (``os``, ``builtins``, ``subprocess``, ...) is never allowed.

A run folder's own ``allowed_targets`` is not trusted (the folder is what is checked): re-export
honours only the packages named on its own command line. Anything else is one line, naming the
key, and nothing is built.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from qat.lit.errors import ConfigError

__all__ = ["ALLOWED_PREFIXES", "allowed_packages", "check_targets", "iter_targets"]

#: Dotted-path prefixes any config may instantiate.
ALLOWED_PREFIXES = (
    "qat.",
    "torch.optim.",
    "lightning.pytorch.Trainer",
    "lightning.pytorch.callbacks.",
    "lightning.pytorch.loggers.",
    "lightning.pytorch.strategies.",
    "lightning.pytorch.plugins.",
    "lightning.pytorch.profilers.",
    "pytorch_lightning.callbacks.",
    "pytorch_lightning.loggers.",
    "transformers.Auto",
)


def iter_targets(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(key, value)`` of every ``_target_`` under ``node`` (Hydra's own node left out)."""
    if isinstance(node, DictConfig):
        for key in node:
            if not path and key == "hydra":
                continue
            where = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                yield where, OmegaConf.select(node, "_target_", throw_on_resolution_failure=False)
                continue
            try:
                child = node._get_node(key)
            except Exception:
                continue
            if isinstance(child, DictConfig | ListConfig):
                yield from iter_targets(child, where)
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            child = node._get_node(i)
            if isinstance(child, DictConfig | ListConfig):
                yield from iter_targets(child, f"{path}[{i}]")


def _packages(values: Any) -> set[str]:
    if values is None:
        return set()
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, Iterable):
        raise ConfigError(f"allowed_targets={values!r} must be a list of package names")
    return {str(v).strip().rstrip(".") for v in values if str(v).strip()}


def _top(target: str) -> str:
    return target.split(".", 1)[0]


def _is_stdlib(package: str) -> bool:
    return package in sys.stdlib_module_names or package in ("builtins", "__main__")


def _custom_model_target(cfg: DictConfig) -> str | None:
    """``model._target_`` when the user chose ``model=custom`` and named it on the command line."""
    hydra = cfg.get("hydra") if "hydra" in cfg else None
    if hydra is None:
        # The task function's config has no hydra node: Hydra keeps it in HydraConfig.
        from hydra.core.hydra_config import HydraConfig

        hydra = HydraConfig.get() if HydraConfig.initialized() else None
    if hydra is None:
        return None
    choices = OmegaConf.select(hydra, "runtime.choices", throw_on_resolution_failure=False)
    model_choice = choices.get("model") if isinstance(choices, DictConfig) else None
    overrides = OmegaConf.select(hydra, "overrides.task", throw_on_resolution_failure=False)
    if model_choice != "custom" or overrides is None:
        return None
    for item in overrides:
        key, _, value = str(item).lstrip("+~").partition("=")
        if key == "model._target_" and value:
            return value.strip("'\"")
    return None


def allowed_packages(cfg: DictConfig, trust_config: bool = True) -> set[str]:
    """The packages the user named: ``allowed_targets`` (if the config is trusted) and a
    ``model=custom`` model's package."""
    named = _packages(cfg.get("allowed_targets")) if trust_config else set()
    custom = _custom_model_target(cfg) if trust_config else None
    if custom is not None and not _is_stdlib(_top(custom)):
        named.add(_top(custom))
    return named


def check_targets(
    cfg: DictConfig,
    source: str = "the config",
    extra_packages: Iterable[str] = (),
    trust_config: bool = True,
) -> None:
    """Refuse any ``_target_`` in ``cfg`` that the project does not allow (module docstring).

    Args:
        cfg: the composed config (or a run folder's saved one).
        source: what the config is, for the message (e.g. the run folder's config path).
        extra_packages: packages allowed besides the project's (e.g. those named on the
            re-export command line).
        trust_config: honour the config's own ``allowed_targets`` and ``model=custom``;
            false for a saved run folder.

    Raises:
        ConfigError: the first target not allowed, naming its key and how to allow it.
    """
    packages = allowed_packages(cfg, trust_config) | _packages(list(extra_packages))
    for key, target in iter_targets(cfg):
        if target is None:
            continue
        if not isinstance(target, str):
            raise ConfigError(f"{key}={target!r} in {source} must be a dotted path string")
        package = _top(target)
        stdlib = _is_stdlib(package)
        if target.startswith(ALLOWED_PREFIXES) or (package in packages and not stdlib):
            continue
        if stdlib:
            why = "the standard library is never instantiated from a config"
        elif trust_config:
            why = f"if it is your own code, add +allowed_targets=[{package}] on the command line"
        else:
            why = f"if you trust that run folder, add allowed_targets=[{package}] to this command"
        raise ConfigError(
            f"{key}={target} in {source} is refused: configs may instantiate only the project's "
            "classes (qat.*), torch optimizers and schedulers, Lightning callbacks / loggers, "
            f"transformers.Auto* and packages you name; {why}"
        )
