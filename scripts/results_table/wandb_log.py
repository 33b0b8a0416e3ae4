"""Logging the table to W&B."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .rows import REPO


def log_wandb(items: list[dict[str, Any]], plots: Sequence[Path]) -> None:
    """The table and the plots as one W&B run (offline unless logged in)."""
    import wandb

    keys = sorted({k for i in items for k in i})
    run = wandb.init(project="qat", job_type="results", group="results-table", dir=str(REPO))
    table = wandb.Table(columns=keys, data=[[i.get(k) for k in keys] for i in items])
    run.log({"results/table": table, **{f"results/{p.stem}": wandb.Image(str(p)) for p in plots}})
    run.finish()
