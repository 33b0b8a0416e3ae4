"""``results.json``: what a run measured, in one JSON-able dict, written atomically."""

from __future__ import annotations

import json
import logging
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qat.io import atomic_write_text
from qat.lit.config_parts import model_name
from qat.quant.control import quantizer_summary, uninitialized_quantizers
from qat.quant.schedule import Schedule
from qat.quant.spec import Recipe

__all__ = [
    "RESULTS_FILE",
    "build_results",
    "jsonable",
    "machine_info",
    "metrics_of",
    "optimized",
    "write_json_atomic",
]

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON atomically (:mod:`qat.io`): readers see the old file or the new one."""
    # Serialized first: an unserializable value fails before the destination is touched.
    atomic_write_text(path, json.dumps(jsonable(data), indent=2, sort_keys=False) + "\n")


def jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [jsonable(v) for v in value]
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


def metrics_of(source: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in source.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def optimized(cfg: DictConfig, metrics: Mapping[str, float]) -> float | dict[str, float] | None:
    name = cfg.get("optimized_metric")
    if not name:
        return dict(metrics)
    if name not in metrics:
        log.warning(
            "optimized_metric=%s was not logged (available: %s)", name, ", ".join(sorted(metrics))
        )
        return None
    return float(metrics[name])


def machine_info() -> dict[str, Any]:
    """The CPU the run (and its benchmark) ran on: name, torch's vector ISA, and whether it has
    VNNI int8 dot products (``None`` where ``/proc/cpuinfo`` does not say)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    names = [
        ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")
    ]
    flags = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), "").split()
    return {
        "cpu": names[0] if names else platform.processor() or platform.machine(),
        "isa": torch.backends.cpu.get_cpu_capability(),
        "vnni": ("avx512_vnni" in flags or "avx_vnni" in flags) if flags else None,
        "cores": os.cpu_count(),
    }


def build_results(
    cfg: DictConfig,
    trainer: Trainer,
    model: nn.Module,
    recipe: Recipe | None,
    schedule: Schedule,
    qat_report: Mapping[str, Any] | None,
    metrics: Mapping[str, float],
) -> dict[str, Any]:
    """The ``results.json`` dict of a finished fit / test (export figures are added after).

    ``qat_report`` is :meth:`qat.lit.QATCallback.report` (None for a float run).
    """
    ckpts = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    last_cb = next((cb for cb in ckpts if cb.monitor is None), None)
    best_cb = next((cb for cb in ckpts if cb.monitor is not None), None)
    history = list(qat_report["history"]) if qat_report else []
    float_rows = [r for r in history if r.get("phase") == "float" and "val/acc" in r]
    summary_rows = quantizer_summary(model) if recipe else []
    per_layer_bits = {r["name"]: r["bits"] for r in summary_rows}
    data_name = str(cfg.data.get("_target_", "")).rsplit(".", 1)[-1]
    return {
        "task_name": cfg.get("task_name"),
        "run_dir": str(cfg.paths.output_dir),
        "config": {
            "task": cfg.get("task", "classification"),
            "model": model_name(cfg),
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
            # Language models (task=language_model): perplexity of the final model.
            "val_ppl": metrics.get("val/ppl"),
            "test_ppl": metrics.get("test/ppl"),
            # Per-layer statistics are under "layer_stats"; the rest of what was logged here.
            "all": {k: v for k, v in metrics.items() if not _is_layer_stat(k)},
        },
        "bits": {
            "weight": qat_report["weight_bits"] if qat_report else 32,
            "activation": qat_report["act_bits"] if qat_report else 32,
            "per_layer": per_layer_bits,
        },
        "uninitialized_quantizers": uninitialized_quantizers(model) if recipe else [],
        "history": history,
        "layer_stats": qat_report["layer_stats"] if qat_report else {},
        "checkpoints": {
            "last": (last_cb.best_model_path or last_cb.last_model_path) if last_cb else None,
            "best": best_cb.best_model_path if best_cb else None,
            "best_monitor": best_cb.monitor if best_cb else None,
            "best_score": best_cb.best_model_score if best_cb else None,
        },
        "machine": machine_info(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lightning": L.__version__,
        },
    }
