"""The table's layout: its models and rows, each row's config and where its run lives."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "train.py"

#: Table rows in order: (row name, method, weight bits, activation bits); the mixed rows give
#: the bits column's text instead.
ROWS = [
    ("float", "float", 32, 32),
    ("ptq_w8a8", "PTQ", 8, 8),
    ("ptq_w4a4", "PTQ", 4, 4),
    ("qat_w8a8", "QAT", 8, 8),
    ("qat_w4a8", "QAT", 4, 8),
    ("qat_w4a4", "QAT (LSQ)", 4, 4),
    ("qat_w4a4_anneal", "QAT annealed (LSQ)", 4, 4),
    ("qat_w3a3_anneal", "QAT annealed (LSQ)", 3, 3),
    ("qat_w2a2_anneal", "QAT annealed (LSQ, distilled)", 2, 2),
    # Mixed precision (quant=auto): per-layer widths from {2, 4, 8} chosen by measurement,
    # within the packed-weight size of the uniform row named in the bits column, trained as it.
    ("qat_auto_w4a4", "mixed 2/4/8 by measurement (LSQ)", "≤ W4A4 size", "mixed"),
    ("qat_auto_w2a2", "mixed 2/4/8 by measurement (LSQ, distilled)", "≤ W2A2 size", "mixed"),
]
QUANT_ROWS = [r[0] for r in ROWS if r[0] != "float"]
#: The table's models, with the overrides every run of one takes.
MODELS = {"resnet20": [], "mobilenetv2": ["model.width_mult=0.5"]}


def row_config(model: str, row: str) -> str:
    """The experiment config of ``row`` for ``model``: ``table/<model>/<row>`` where it exists
    (a model that needs a longer budget for that row), else the shared ``table/<row>``."""
    own = f"table/{model}/{row}"
    return own if (REPO / "configs" / "experiment" / f"{own}.yaml").is_file() else f"table/{row}"


def own_row_configs(models: Sequence[str]) -> list[tuple[str, str]]:
    """``(model, row)`` for every row a model runs with its own config (see :func:`row_config`)."""
    return [(m, r) for m in models for r in QUANT_ROWS if row_config(m, r) != f"table/{r}"]


def _row_dir(root: Path, model: str, row: str) -> Path:
    return root / model / ("float" if row == "float" else f"table_{row}")


def _float_ckpt(root: Path, model: str) -> Path:
    """The checkpoint of the float run under ``root`` that the model's rows start from."""
    return _row_dir(root, model, "float") / "checkpoints" / "last.ckpt"


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None
