"""``train(cfg)``: the whole run, from a composed Hydra config to ``results.json``.

validate → seed → DataModule, model, ClassifierModule, callbacks, loggers, Trainer → fit →
test (fake-quant model) → export → verify → parity check → benchmark → ``results.json`` →
summary table. ``train.py`` is a thin ``@hydra.main`` shim around :func:`train`; tests call
:func:`train` with configs from ``hydra.compose``.

Example:
    >>> from hydra import compose, initialize_config_dir
    >>> with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
    ...     cfg = compose("train", overrides=["+experiment=quick"], return_hydra_config=True)
    >>> cfg.paths.output_dir = "/tmp/run"
    >>> val_acc = train(cfg)
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import netrc
import os
import platform
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.seed import isolate_rng
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qat.callbacks import QATCallback
from qat.checkpoint import CheckpointError, load_checkpoint, resolve_ckpt_path
from qat.config import ConfigError, build_model, validate_config
from qat.io import atomic_write_text
from qat.lit_module import ClassifierModule
from qat.prepare import quantizer_summary
from qat.quantizers import iter_quantizers, uninitialized_quantizers
from qat.schedule import Schedule
from qat.spec import Recipe

__all__ = ["run_export", "train", "write_json_atomic"]

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


# ---------------------------------------------------------------------- small helpers
def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON atomically (:mod:`qat.io`): readers see the old file or the new one."""
    # Serialized first: an unserializable value fails before the destination is touched.
    atomic_write_text(path, json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "item"):
        try:
            return value.item()
        except (TypeError, ValueError):
            pass
    return str(value)


def _is_layer_stat(key: str) -> bool:
    return key.startswith("quant/") and key.count("/") >= 2


def _is_rank_zero() -> bool:
    # Before the Trainer exists: DDP children launched by Lightning (or torchrun / Slurm) carry
    # their rank in the environment.
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        value = os.environ.get(var)
        if value not in (None, "", "0"):
            return False
    return True


def _metrics(source: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in source.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


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


# ---------------------------------------------------------------------- builders
def build_module(
    cfg: DictConfig, model: nn.Module, teacher: nn.Module | None = None
) -> ClassifierModule:
    """The LightningModule from ``cfg.optimizer`` / ``cfg.scheduler`` / ``cfg.module``;
    ``teacher`` is the network to distil from when ``module.distill_weight > 0``."""
    optimizer = instantiate(cfg.optimizer) if cfg.get("optimizer") else None
    scheduler_cfg = cfg.get("scheduler")
    scheduler = (
        instantiate(scheduler_cfg) if scheduler_cfg and "_target_" in scheduler_cfg else None
    )
    options = OmegaConf.to_container(cfg.get("module") or {}, resolve=True)
    assert isinstance(options, dict)
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
            callbacks.append(instantiate(cb_cfg, recipe=recipe.to_dict(), _convert_="all"))
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
            loggers.append(_build_wandb(cfg, lg_cfg, recipe))
        else:
            loggers.append(instantiate(lg_cfg, _convert_="all"))
        log.debug("logger %s: %s", name, type(loggers[-1]).__name__)
    return loggers


def _build_wandb(cfg: DictConfig, lg_cfg: DictConfig, recipe: Recipe | None) -> Logger:
    mode = os.environ.get("WANDB_MODE")
    offline = bool(lg_cfg.get("offline")) or mode in ("offline", "dryrun")
    if not offline and mode is None and not _wandb_key_configured():
        # Not logged in: record offline (sync later with `wandb sync <run dir>/wandb/...`).
        os.environ["WANDB_MODE"] = "offline"
        offline = True
        log.info("W&B: no API key configured, logging offline")
    group = lg_cfg.get("group") or _wandb_group(cfg)
    tags = list(lg_cfg.get("tags") or [])
    auto = [_bits_tag(recipe), str(cfg.model.get("name", "")), str(cfg.get("task_name", ""))]
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


def _log_hyperparameters(
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


# ---------------------------------------------------------------------- the run
def load_float_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a float model's weights (a Lightning checkpoint or a state_dict file) into ``model``.

    Loaded with ``weights_only=True``: a file that would run code is refused.

    Raises:
        ConfigError: the file is missing, unsafe, or holds another model's weights.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(
            f"init_from={path} is not a file: give a float run's checkpoint "
            "(<run dir>/checkpoints/last.ckpt) or a saved state_dict"
        )
    try:
        state = load_checkpoint(file)
    except CheckpointError as err:
        raise ConfigError(f"init_from: {err}") from None
    weights = state.get("state_dict", state) if isinstance(state, Mapping) else None
    if not isinstance(weights, Mapping):
        raise ConfigError(f"init_from={path} holds no state_dict")
    prefix = "model."
    if any(str(k).startswith(prefix) for k in weights):
        weights = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        quantized = any("_quant." in str(k) for k in weights)
        hint = (
            "it is a quantized run's checkpoint; resume it with ckpt_path=... instead"
            if quantized
            else "it was saved from another model or data config"
        )
        raise ConfigError(
            f"init_from={path} does not fit model {type(model).__name__} ({hint}): "
            f"{str(err).splitlines()[0]}"
        ) from None
    log.info("float weights loaded from %s", file)


def _find(callbacks: Iterable[Callback], kind: type) -> Any:
    return next((cb for cb in callbacks if isinstance(cb, kind)), None)


def _guard_run_dir(run_dir: Path, ckpt_path: str | None = None) -> None:
    """Refuse a run dir that holds another run; a restart of its own unfinished run is fine."""
    if not _is_rank_zero():
        return
    if (run_dir / RESULTS_FILE).exists():
        raise ConfigError(
            f"{run_dir} already holds a finished run ({RESULTS_FILE}); runs never share a "
            "directory: drop the hydra.run.dir override or pick a new one (to train it further, "
            "start a new run with ckpt_path=<its checkpoints/last.ckpt>)"
        )
    ckpt_dir = run_dir / "checkpoints"
    own = ckpt_path is not None and Path(ckpt_path).resolve().parent == ckpt_dir.resolve()
    if not own and any(ckpt_dir.glob("*.ckpt")):
        # A fresh run here would overwrite the interrupted run's checkpoints.
        raise ConfigError(
            f"{run_dir} holds an unfinished run ({ckpt_dir.name}/*.ckpt, no {RESULTS_FILE}): "
            "resume it with ckpt_path=last, or pick a new hydra.run.dir"
        )


def train(cfg: DictConfig) -> float | dict[str, float] | None:
    """Train, test, export and verify as ``cfg`` says; write ``results.json`` in the run dir.

    Returns:
        The metric named by ``cfg.optimized_metric`` (val/acc by default), for the Optuna
        sweeper; all metrics as a dict when ``optimized_metric`` is null.

    Raises:
        ConfigError: a bad config value, before any training.
        qat.export.ParityError: an exported model disagrees with the fake-quant model (after
            ``results.json`` has been written with the failing numbers).
    """
    started = time.perf_counter()
    run_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), run_dir)
    _guard_run_dir(run_dir, ckpt_path)
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    parts = validate_config(cfg)
    dm, model, recipe, schedule = parts.datamodule, parts.model, parts.recipe, parts.schedule
    if cfg.get("init_from"):
        # Fine-tune (or, with trainer.max_epochs=0, post-training-quantize) a trained float
        # model: its weights go in before the QAT callback swaps the layers.
        load_float_weights(model, cfg.init_from)
    # The float model, before the QAT callback swaps its layers, is the distillation teacher.
    distill = float((cfg.get("module") or {}).get("distill_weight") or 0.0) > 0
    teacher = copy.deepcopy(model) if distill else None
    max_epochs = cfg.trainer.get("max_epochs")
    if recipe is not None and max_epochs and schedule.end_epoch() >= int(max_epochs) + 1:
        log.warning(
            "the QAT schedule ends at epoch %d but trainer.max_epochs=%s: the run stops before "
            "every scheduled step (annealing / freezing) has happened",
            schedule.end_epoch(),
            max_epochs,
        )

    module = build_module(cfg, model, teacher)
    loggers = build_loggers(cfg, recipe)
    callbacks = build_callbacks(cfg, recipe, schedule, have_logger=bool(loggers))
    trainer: Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, _convert_="all"
    )
    _log_hyperparameters(trainer, cfg, module, recipe)
    qat_cb: QATCallback | None = _find(callbacks, QATCallback)

    fit_metrics: dict[str, float] = {}
    ptq_ckpt: Path | None = None
    if cfg.get("train", True):
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        fit_metrics = _metrics(trainer.callback_metrics)
    if qat_cb is not None and cfg.get("train", True) and not qat_cb.calibrated:
        _late_calibration(trainer, module, qat_cb, schedule)
        if trainer.max_epochs == 0 and not trainer.fast_dev_run:
            # Post-training quantization: no epoch ran, so validate the calibrated model here
            # (val/acc is what sweeps and the summary read).
            trainer.validate(module, datamodule=dm, verbose=False)
            fit_metrics.update(_metrics(trainer.callback_metrics))
            # No epoch ended, so no checkpoint callback saved the calibrated model: save it,
            # so `python -m qat.export ckpt_path=...` and `ckpt_path=` fine-tuning can use it.
            ptq_ckpt = run_dir / "checkpoints" / "last.ckpt"
            trainer.save_checkpoint(ptq_ckpt)

    export_cfg = cfg.get("export")
    exporting = recipe is not None and export_cfg is not None and export_cfg.get("enabled", False)
    snapped: list[str] | None = None
    if exporting and export_cfg.get("snap_bias", True) and cfg.get("train", True):
        # Before the test: the integer runtimes add the bias as int32 at s_in·s_w; snapping the
        # float bias onto that grid makes the tested fake-quant model the exported one.
        snapped = _snap_bias(module.model, dm)

    test_metrics: dict[str, float] = {}
    if cfg.get("test", True):
        # The final model, not the best-val checkpoint: see configs/callbacks/model_checkpoint.
        ckpt = None if cfg.get("train", True) else ckpt_path
        trainer.test(module, datamodule=dm, ckpt_path=ckpt)
        test_metrics = _metrics(trainer.callback_metrics)
    metrics = {**fit_metrics, **test_metrics}

    if not trainer.is_global_zero:
        return _optimized(cfg, metrics)

    results = _results(cfg, trainer, module, recipe, schedule, qat_cb, metrics)
    if ptq_ckpt is not None:
        results["checkpoints"]["last"] = str(ptq_ckpt)
    export_error: Exception | None = None
    status = "ok"
    if export_cfg is not None and export_cfg.get("enabled", False):
        if recipe is None:
            log.info("export skipped: quant is disabled (a float run has no integer model)")
            results["export"] = {"skipped": "float run"}
        else:
            out_dir = Path(export_cfg.get("out_dir") or run_dir / "export")
            float_model = build_model(cfg)
            try:
                if snapped is None and export_cfg.get("snap_bias", True):
                    snapped = _snap_bias(module.model, dm)
                results["export"] = run_export(module.model, dm, export_cfg, out_dir, float_model)
                results["export"]["snapped_bias_layers"] = len(snapped or [])
            except Exception as err:
                # The training results are worth keeping whatever went wrong in the export:
                # write them (with the failure) first, then fail the run.
                export_error = err
                parity = type(err).__name__ == "ParityError"
                status = "parity_failed" if parity else "export_failed"
                results["export"] = getattr(
                    err, "qat_export_results", {"error": f"{type(err).__name__}: {err}"}
                )
    results["wall_time_s"] = round(time.perf_counter() - started, 2)
    results["status"] = status
    write_json_atomic(run_dir / RESULTS_FILE, results)
    _log_to_wandb(trainer, results)
    _print_summary(results)
    if export_error is not None and not (
        status == "parity_failed" and not export_cfg.get("fail_on_parity", True)
    ):
        log.error(
            "%s: results.json written to %s; the trained model is in %s (re-export it with "
            "`python -m qat.export ckpt_path=...`)",
            status,
            run_dir,
            results["checkpoints"].get("last"),
        )
        raise export_error
    if export_error is not None:
        log.error("%s (export.fail_on_parity=false: the run goes on): %s", status, export_error)
    return _optimized(cfg, metrics)


def _optimized(cfg: DictConfig, metrics: Mapping[str, float]) -> float | dict[str, float] | None:
    name = cfg.get("optimized_metric")
    if not name:
        return dict(metrics)
    if name not in metrics:
        log.warning(
            "optimized_metric=%s was not logged (available: %s)", name, ", ".join(sorted(metrics))
        )
        return None
    return float(metrics[name])


def _late_calibration(
    trainer: Trainer, module: ClassifierModule, qat_cb: QATCallback, schedule: Schedule
) -> None:
    """Training ended before quantization started: calibrate post-training (PTQ) instead."""
    if trainer.max_epochs == 0:
        log.info("trainer.max_epochs=0: post-training quantization (calibration only)")
    else:
        warnings.warn(
            f"training ended before quantization started (schedule.warmup_epochs="
            f"{schedule.warmup_epochs}, trainer.max_epochs={trainer.max_epochs}, fast_dev_run="
            f"{trainer.fast_dev_run}); calibrating ranges post-training so test and export see "
            "the quantized model",
            stacklevel=2,
        )
    with isolate_rng():
        qat_cb.apply_schedule(trainer, module, schedule.end_epoch())
    # A post-training model: ranges stay where calibration put them.
    for _, q in iter_quantizers(module.model):
        q.enable_observer(False)


def _results(
    cfg: DictConfig,
    trainer: Trainer,
    module: ClassifierModule,
    recipe: Recipe | None,
    schedule: Schedule,
    qat_cb: QATCallback | None,
    metrics: Mapping[str, float],
) -> dict[str, Any]:
    ckpts = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    last_cb = next((cb for cb in ckpts if cb.monitor is None), None)
    best_cb = next((cb for cb in ckpts if cb.monitor is not None), None)
    history = list(qat_cb.history) if qat_cb else []
    float_rows = [r for r in history if r.get("phase") == "float" and "val/acc" in r]
    summary_rows = quantizer_summary(module.model) if recipe else []
    per_layer_bits = {r["name"]: r["bits"] for r in summary_rows}
    data_name = str(cfg.data.get("_target_", "")).rsplit(".", 1)[-1]
    return {
        "task_name": cfg.get("task_name"),
        "run_dir": str(cfg.paths.output_dir),
        "config": {
            "model": cfg.model.get("name"),
            "data": data_name,
            "image_size": cfg.data.get("image_size"),
            "batch_size": cfg.data.get("batch_size"),
            "quant_bits": cfg.quant.get("bits") if cfg.get("quant") is not None else None,
            "quant_enabled": recipe is not None,
            "max_epochs": trainer.max_epochs,
            "epochs_run": trainer.current_epoch,
            "global_step": trainer.global_step,
            "seed": cfg.get("seed"),
            "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True)
            if cfg.get("optimizer")
            else None,
            "devices": trainer.num_devices,
            "strategy": type(trainer.strategy).__name__,
        },
        "recipe": recipe.to_dict() if recipe else None,
        "schedule": schedule.to_dict() if recipe else None,
        "metrics": {
            "float_val_acc": float_rows[-1]["val/acc"] if float_rows else None,
            "val_acc": metrics.get("val/acc"),
            "val_loss": metrics.get("val/loss"),
            "test_acc": metrics.get("test/acc"),
            "test_loss": metrics.get("test/loss"),
            "train_acc": metrics.get("train/acc"),
            # Per-layer statistics are under "layer_stats"; the rest of what was logged here.
            "all": {k: v for k, v in metrics.items() if not _is_layer_stat(k)},
        },
        "bits": {
            "weight": qat_cb.current_bits("weight") if qat_cb else 32,
            "activation": qat_cb.current_bits("activation") if qat_cb else 32,
            "per_layer": per_layer_bits,
        },
        "uninitialized_quantizers": uninitialized_quantizers(module.model) if recipe else [],
        "history": history,
        "layer_stats": qat_cb.layer_stats if qat_cb else {},
        "checkpoints": {
            "last": (last_cb.best_model_path or last_cb.last_model_path) if last_cb else None,
            "best": best_cb.best_model_path if best_cb else None,
            "best_monitor": best_cb.monitor if best_cb else None,
            "best_score": best_cb.best_model_score if best_cb else None,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lightning": L.__version__,
        },
    }


# ---------------------------------------------------------------------- export stage
def _snap_bias(model: nn.Module, dm: Any) -> list[str]:
    """``qat.export.snap_bias`` on the final model, with the first test batch as example."""
    from qat.export import snap_bias

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    example = _test_batches(dm, 1)[0][0][:8].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return list(snap_bias(model, example))
    finally:
        model.train(was_training)


def _test_batches(dm: Any, limit: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if getattr(dm, "test_set", None) is None:
        dm.setup("test")
    batches = dm.test_dataloader()
    if limit is not None:
        batches = itertools.islice(batches, int(limit))
    return [(b[0], b[1]) for b in batches]


def run_export(
    model: nn.Module,
    dm: Any,
    export_cfg: Mapping[str, Any],
    out_dir: Path,
    float_model: nn.Module | None = None,
) -> dict[str, Any]:
    """Export ``model`` → verify on the test set → check parity → benchmark.

    Returns a JSON-able report. On a parity failure the ``ParityError`` is raised with the
    report attached as ``err.qat_export_results``, so the caller can still write it (with
    ``export_cfg.fail_on_parity`` false, after the benchmark, which the report then holds).
    """
    # Imported here: the exporters pull in onnx / onnxruntime, needed only for this stage.
    from qat.export import (
        ParityError,
        benchmark_artifacts,
        check_parity,
        export_model,
        verify_artifacts,
    )

    model = model.cpu().eval()
    parity_error: ParityError | None = None
    missing = uninitialized_quantizers(model)
    if missing:
        # Their scale is a placeholder: exporting would bake a garbage grid into the model.
        shown = ", ".join(missing[:10]) + (
            f", ... ({len(missing) - 10} more)" if len(missing) > 10 else ""
        )
        layers = sorted({n.rsplit(".", 1)[0] for n in missing if "." in n}) or missing
        raise RuntimeError(
            f"cannot export: {len(missing)} quantizer(s) never saw data, so their scales are "
            f"placeholders: {shown}. The forward pass never reached them during calibration or "
            "training: calibrate on batches that reach them (schedule.calibration_batches, "
            "qat.calibrate), or leave those layers in float with an entry "
            f"{{pattern: {layers[0]}, skip: true}} in quant.overrides"
        )
    batches = _test_batches(dm, export_cfg.get("verify_batches"))
    example = batches[0][0][:1].contiguous()
    targets = tuple(export_cfg.get("targets") or ("torchscript", "onnx"))
    t0 = time.perf_counter()
    artifacts = export_model(
        model,
        out_dir,
        example,
        targets=targets,
        int4_packed=bool(export_cfg.get("int4_packed")),
        fused_add=bool(export_cfg.get("fused_add")),
    )
    report: dict[str, Any] = {
        "out_dir": str(out_dir),
        "artifacts": {k: str(v) for k, v in artifacts.items()},
        "sizes_bytes": {
            k: Path(v).stat().st_size for k, v in artifacts.items() if Path(v).is_file()
        },
        "export_time_s": round(time.perf_counter() - t0, 2),
    }
    if export_cfg.get("verify", True):
        parity = verify_artifacts(model, artifacts, batches)
        report["parity"] = parity
        thresholds = dict(export_cfg.get("parity") or {})
        try:
            check_parity(parity, **thresholds)
            report["parity_ok"] = True
        except ParityError as err:
            report["parity_ok"] = False
            report["parity_error"] = str(err)
            err.qat_export_results = report  # type: ignore[attr-defined]
            if export_cfg.get("fail_on_parity", True):
                raise
            # A recorded failure, not a crash: the models are still benchmarked (a results
            # table shows their size and speed too); the caller gets the error afterwards.
            parity_error = err
    if export_cfg.get("bench", True):
        sizes = tuple(int(b) for b in export_cfg.get("bench_batch_sizes") or (1, 64))
        reference = float_model.cpu().eval() if float_model is not None else None
        report["bench"] = benchmark_artifacts(artifacts, reference, example, batch_sizes=sizes)
    if parity_error is not None:
        raise parity_error
    return report


# ---------------------------------------------------------------------- reporting
@rank_zero_only
def _log_to_wandb(trainer: Trainer, results: Mapping[str, Any]) -> None:
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
    run.summary.update(_jsonable(summary))
    files = [Path(p) for p in (export.get("artifacts") or {}).values()] if export else []
    results_file = Path(results["run_dir"]) / RESULTS_FILE
    artifact = wandb.Artifact(
        name=f"{results.get('task_name') or 'qat'}-model", type="model", metadata=_jsonable(summary)
    )
    for path in [*files, results_file]:
        if path.is_file():
            artifact.add_file(str(path))
    run.log_artifact(artifact)
    wandb.finish()


@rank_zero_only
def _print_summary(results: Mapping[str, Any]) -> None:
    from qat.summary import print_summary

    try:
        print_summary(results)
    except Exception as err:  # the table is a nicety; never fail a finished run over it
        log.warning("could not print the summary table: %s", err)
