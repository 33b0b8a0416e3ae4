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
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from torch import nn

from qat.lit.config_parts import (
    DATA_INFO_KEYS,
    build_datamodule,
    build_model,
    check_fit,
    example_input,
)
from qat.lit.config_recipe import QUANT_KEYS, build_recipe
from qat.lit.config_run import check_optimizer, check_trainer
from qat.lit.errors import ConfigError
from qat.lit.quant_auto import auto_options, check_budget, saved_recipe
from qat.quant.control import iter_quantizers
from qat.quant.prepare import prepare
from qat.quant.runtime_matmul import int8_activations, int8_blocks
from qat.quant.schedule import ROLES, Schedule
from qat.quant.spec import Recipe

log = logging.getLogger(__name__)

__all__ = [
    "CONFIG_DIR",
    "DATA_INFO_KEYS",
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

EXPORT_TARGETS = ("torchscript", "onnx")
#: What ``task`` may be, and the export targets of each.
TASK_TARGETS = {
    "classification": EXPORT_TARGETS,
    "language_model": ("gguf", "onnx", "hf", "genai"),
}


@dataclass
class Validated:
    """What validation built, reused by the pipeline (nothing is built twice)."""

    datamodule: Any
    model: nn.Module
    recipe: Recipe | None
    schedule: Schedule


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
        fixed = [n for n, q in iter_quantizers(qmodel, role) if q.spec.grid != "affine"]
        if anneal.epochs > 0 and fixed:
            raise ConfigError(
                f"schedule.{name}.epochs={anneal.epochs}: {fixed[0]} is on a GGUF grid, whose bit "
                f"width is fixed; set schedule.{name}.epochs=0"
            )
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


def fit_schedule(cfg: DictConfig, schedule: Schedule) -> Schedule:
    """The schedule scaled onto ``trainer.max_epochs`` when it is longer (:meth:`Schedule.fitted`),
    said in the log; a run of unknown length, or one that does not train, keeps it."""
    max_epochs = (cfg.get("trainer") or {}).get("max_epochs")
    if (
        not cfg.get("train", True)
        or isinstance(max_epochs, bool)
        or not isinstance(max_epochs, int)
    ):
        return schedule
    fitted = schedule.fitted(max_epochs)
    if fitted != schedule:
        log.warning(
            "the QAT schedule needs %d epochs and trainer.max_epochs=%d: scaled onto the run (%s; "
            "schedule.fit_to_run=false keeps it as written)",
            schedule.last_change_epoch() + 1,
            max_epochs,
            schedule.describe_change(fitted),
        )
    return fitted


def _check_task_recipe(task: str, recipe: Recipe | None, export: Any) -> None:
    """Static activation grids are for the classification exporters; dynamic and weight-only
    schemes for the language-model ones."""
    if recipe is None:
        return
    act = recipe.activation
    static = act.enabled and act.dynamic == "none"
    if task == "language_model" and static:
        raise ConfigError(
            f"quant.activation (bits={act.bits}, dynamic=none): language models take weight-only "
            "or dynamic activations: quant=lm_q4_0 (llama.cpp), lm_q8_0, lm_w8da8 (ONNX int8), "
            "lm_8da4w or lm_w4g32"
        )
    exporting = export is not None and export.get("enabled", False)
    if task == "classification" and act.dynamic != "none" and exporting:
        raise ConfigError(
            f"quant.activation.dynamic={act.dynamic}: the classification exporters (torchscript, "
            "onnx QDQ) need static activation grids: set quant.activation.dynamic=none, or "
            "export.enabled=false"
        )


def _check_lm_export(export: Any) -> None:
    """The ONNX language-model exporter's options, before training."""
    level = export.get("accuracy_level")
    if level is not None and (isinstance(level, bool) or level not in (0, 1, 2, 3, 4)):
        raise ConfigError(
            f"export.accuracy_level={level!r} is invalid: null (per layer), or MatMulNBits' "
            "0 (float32), 1, 2, 3 or 4 (int8)"
        )
    q8_ops = export.get("genai_q8_ops", False)
    if not isinstance(q8_ops, bool):
        raise ConfigError(
            f"export.genai_q8_ops={q8_ops!r} is invalid: true (the genai folder rounds inputs "
            "to Q8_0 with the fake-quant model's ops: exact, slower) or false"
        )
    islands = export.get("float_islands")
    if islands not in (None, "float64", "float32"):
        raise ConfigError(
            f"export.float_islands={islands!r} is invalid: null or float32 (the default: ONNX "
            "Runtime's fused float32 kernels), or float64 (the bit-exact file, 2-3x slower)"
        )


def _check_hf_target(targets: list[str], recipe: Recipe | None, model: nn.Module) -> None:
    """``export.targets=[hf]`` writes transformers checkpoints, whose activation rounding is
    compressed-tensors' (affine int8): refuse what it cannot reproduce, before training."""
    if "hf" not in targets:
        return
    from qat.export.lm_io import is_hf_model

    if not is_hf_model(model):
        raise ConfigError(
            f"export.targets={targets}: hf writes Hugging Face checkpoints and the model is "
            f"{type(model).__name__}: use model=hf model.path=<folder>, or drop hf"
        )
    act = recipe.activation if recipe is not None else None
    if act is None or not act.enabled or act.bits >= 32:
        return
    if act.grid != "affine":
        why = f"quant.activation.grid={act.grid} (llama.cpp's rounding)"
    elif act.symmetric:
        # compressed-tensors divides a symmetric range by 127.5 where qat (and ONNX Runtime,
        # llama.cpp) divide by 127: other activation codes.
        why = "symmetric dynamic activations (compressed-tensors scales them by amax/127.5)"
    elif act.dynamic != "tensor":
        # Measured: per-token asymmetric codes differ from compressed-tensors' now and then.
        why = f"quant.activation.dynamic={act.dynamic} (only per-tensor rounds as qat does)"
    else:
        return
    raise ConfigError(
        f"export.targets={targets}: {why} has no exact compressed-tensors form; export it "
        "as gguf / onnx, or train for hf with +experiment=hf_w4g32 (int4 weight-only) or "
        "hf_w8a8 (W8A8 with per-tensor asymmetric activations)"
    )


def _check_genai_target(targets: list[str], recipe: Recipe | None, model: nn.Module) -> None:
    """``export.targets=[genai]`` fills onnxruntime-genai's builder graph of a Hugging Face
    model: refuse other models, and activation grids its kernels cannot reproduce, before
    training (:mod:`qat.export.onnx.genai`)."""
    if "genai" not in targets:
        return
    from qat.export.lm_io import is_hf_model

    if not is_hf_model(model):
        raise ConfigError(
            f"export.targets={targets}: genai builds on a Hugging Face model and the model is "
            f"{type(model).__name__}: use model=hf model.path=<folder>, or drop genai"
        )
    act = recipe.activation if recipe is not None else None
    if act is None or not act.enabled or act.bits >= 32:
        return
    if act.grid == "q8_0" or int8_activations(act) or int8_blocks(act, recipe.weight.group_size):
        return
    raise ConfigError(
        f"export.targets={targets}: quant.activation.dynamic={act.dynamic} (grid {act.grid}) "
        "has no kernel in the genai graph: train with quant=lm_w4g32 (int4 weight-only), "
        "lm_w4a8 (int4, int8 blocks), lm_q4_0 (int4, Q8_0 activations) or lm_w8da8 (int8), "
        "or drop genai"
    )


def _output_dir(cfg: DictConfig) -> Path | None:
    """``paths.output_dir``, or None where it does not resolve (a config composed outside a
    Hydra run)."""
    try:
        out = (cfg.get("paths") or {}).get("output_dir")
    except Exception:  # an unresolved ${hydra:...} interpolation
        return None
    return Path(out) if out else None


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
    auto = auto_options(cfg.get("quant"))
    if auto is not None and recipe is not None:
        # A resumed or re-exported quant=auto run: the widths it chose, not new ones.
        run_dir = _output_dir(cfg)
        recipe = (saved_recipe(run_dir, recipe) if run_dir else None) or recipe
    try:
        schedule = Schedule.from_dict(cfg.get("schedule"))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if recipe is not None:
        schedule = fit_schedule(cfg, schedule)
    task = cfg.get("task", "classification")
    if task not in TASK_TARGETS:
        raise ConfigError(
            f"task={task!r} is invalid: allowed: {', '.join(TASK_TARGETS)} (language_model with "
            "data=text model=gpt quant=lm_q4_0, or +experiment=gpt_int4)"
        )
    export = cfg.get("export")
    if export is not None and export.get("enabled", False):
        targets = list(export.get("targets") or [])
        allowed = TASK_TARGETS[task]
        bad = [t for t in targets if t not in allowed]
        if bad or not targets:
            other = next(
                (k for k, v in TASK_TARGETS.items() if k != task and set(bad) <= set(v)), None
            )
            hint = f" ({', '.join(bad)}: for task={other})" if bad and other else ""
            raise ConfigError(
                f"export.targets={targets} is invalid for task={task}: choose from "
                f"{', '.join(allowed)}{hint}"
            )
    _check_task_recipe(task, recipe, export)
    if task == "language_model" and export is not None and export.get("enabled", False):
        _check_lm_export(export)
    distill = (cfg.get("module") or {}).get("distill_weight")
    # model=hf loads pretrained weights: the float model built is the teacher.
    pretrained = str((cfg.get("model") or {}).get("_target_", "")).endswith("load_hf_causal_lm")
    if distill and not cfg.get("init_from") and not pretrained:
        raise ConfigError(
            f"module.distill_weight={distill} distils from the float model given as "
            "init_from=<float checkpoint> (or a pretrained model=hf), and none is given: add "
            "init_from= or set module.distill_weight=0"
        )
    metric = cfg.get("optimized_metric")
    if metric is not None and not isinstance(metric, str):
        raise ConfigError(f"optimized_metric={metric!r} must be a metric name like val/acc")
    check_trainer(cfg)
    check_optimizer(cfg)
    dm = build_datamodule(cfg, check=check_data)
    text = getattr(dm, "vocab_size", None) is not None
    if text != (task == "language_model"):
        raise ConfigError(
            f"task={task} with data {type(dm).__name__} ({'token ids' if text else 'images'}): "
            + (
                "set task=language_model (model=gpt, quant=lm_*) for text"
                if text
                else "a language model needs token data: data=text"
            )
        )
    model = build_model(cfg)
    if check_data:
        check_fit(cfg, dm, model)
    if export is not None and export.get("enabled", False):
        _check_hf_target(list(export.get("targets") or []), recipe, model)
        _check_genai_target(list(export.get("targets") or []), recipe, model)
    if recipe is not None:
        try:
            # A dry run on a copy: override patterns that match no layer fail here.
            qmodel = prepare(copy.deepcopy(model), recipe, example_inputs=example_input(dm))
        except ValueError as err:
            message = str(err)
            raise ConfigError(
                f"quant.{message}" if message.startswith("overrides[") else f"quant: {message}"
            ) from None
        if check_schedule:
            _check_schedule(cfg, schedule, qmodel)
        if auto is not None:
            check_budget(auto, qmodel, example_input(dm))
    return Validated(datamodule=dm, model=model, recipe=recipe, schedule=schedule)
