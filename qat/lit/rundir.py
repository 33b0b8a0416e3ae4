"""Run directories a run may use, checked before Hydra writes anything into them.

Hydra writes ``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml`` into the run
directory *before* the task function runs, so a check inside ``train()`` comes too late: a run
refused there has already overwritten the finished run's config, and that run's own re-export
then rebuilds the wrong model. :class:`RunDirGuard` (a Hydra callback, wired in
``configs/hydra/default.yaml``) runs the same check in ``on_run_start``, before Hydra's
``run_job`` touches the directory; ``train()`` repeats it for configs composed in Python.

A directory is refused when it holds

- a finished run (``results.json``): runs never share a directory;
- an unfinished run's checkpoints, unless this run resumes that run (``ckpt_path=last`` or a
  checkpoint of that directory);
- a run being resumed with another model, task, data or quantization recipe than its own
  ``.hydra/config.yaml`` records (the checkpoint would not fit, and the run's config would be
  overwritten by one that does not describe its checkpoints).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from qat.lit.errors import ConfigError
from qat.lit.results import RESULTS_FILE

__all__ = ["RunDirGuard", "first_difference", "guard_run_dir", "is_rank_zero"]

#: The config keys a resumed run must share with the run it resumes.
_RESUME_KEYS = ("task", "model", "quant", "data._target_")


def is_rank_zero() -> bool:
    """False in DDP children launched by Lightning (or torchrun / Slurm), before any Trainer."""
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        value = os.environ.get(var)
        if value not in (None, "", "0"):
            return False
    return True


def guard_run_dir(
    run_dir: Path, ckpt_path: str | None = None, cfg: DictConfig | None = None
) -> None:
    """Refuse a run dir that holds another run; a restart of its own unfinished run is fine.

    Args:
        run_dir: the directory the run will write into.
        ckpt_path: the resolved checkpoint the run resumes from (None: a fresh run).
        cfg: the run's composed config; a resume in ``run_dir`` is compared with the run's
            saved ``.hydra/config.yaml`` (model, task, data, quantization recipe).

    Raises:
        ConfigError: the directory must not be used, with what to do instead.
    """
    if not is_rank_zero():
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
    saved = run_dir / ".hydra" / "config.yaml"
    if own and cfg is not None and saved.is_file():
        _check_same_run(cfg, saved)


def _select(cfg: Any, key: str) -> Any:
    value = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
    return OmegaConf.to_container(value, resolve=False) if OmegaConf.is_config(value) else value


def _check_same_run(cfg: DictConfig, saved_path: Path) -> None:
    saved = OmegaConf.load(saved_path)
    for key in _RESUME_KEYS:
        diff = first_difference(_select(saved, key), _select(cfg, key), key)
        if diff is None:
            continue
        where, before, now = diff
        top = where.split(".")[0]
        raise ConfigError(
            f"ckpt_path resumes the run in {saved_path.parent.parent}, trained with {where}="
            f"{before}, but this config has {where}={now}: resume with the run's own settings "
            f"(drop the {top}= / {top}.* override), or start a new run in a new directory"
        )


def first_difference(before: Any, now: Any, where: str) -> tuple[str, str, str] | None:
    """The first key under ``where`` whose value differs, with both values (short)."""
    if before == now:
        return None
    if isinstance(before, dict) and isinstance(now, dict):
        for key in list(before) + [k for k in now if k not in before]:
            diff = first_difference(
                before.get(key, "<unset>"), now.get(key, "<unset>"), f"{where}.{key}"
            )
            if diff is not None:
                return diff
    return where, _short(before), _short(now)


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


class RunDirGuard(Callback):
    """Hydra callback: :func:`guard_run_dir` before Hydra writes ``.hydra/`` into the run dir.

    A refusal is one line on stderr and exit code 2, as for any config mistake.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            from qat.lit.targets import check_targets

            # Before Hydra creates the run dir: a refused target leaves nothing behind.
            check_targets(config)
            run_dir = Path(str(OmegaConf.select(config, "hydra.run.dir")))
            ckpt = config.get("ckpt_path")
            resolved = None
            if ckpt not in (None, ""):
                from qat.lit.checkpoint import resolve_ckpt_path

                resolved = resolve_ckpt_path(ckpt, run_dir)
            guard_run_dir(run_dir, resolved, config)
        except ConfigError as err:
            print(f"invalid config: {err}", file=sys.stderr)
            sys.exit(2)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A sweep into a folder that already holds runs would rewrite their ``.hydra/``."""
        try:
            from qat.lit.targets import check_targets

            check_targets(config)
            sweep = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
            taken = sorted(
                p.name
                for p in (sweep.iterdir() if sweep.is_dir() else [])
                if (p / RESULTS_FILE).exists() or any((p / "checkpoints").glob("*.ckpt"))
            )
            if taken:
                raise ConfigError(
                    f"hydra.sweep.dir={sweep} already holds runs ({', '.join(taken[:5])}); "
                    "a sweep never shares a folder: drop the hydra.sweep.dir override or pick "
                    "a new one"
                )
        except ConfigError as err:
            print(f"invalid config: {err}", file=sys.stderr)
            sys.exit(2)
