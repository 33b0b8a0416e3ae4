"""Rows carried over from the saved table, and the float weights they were fine-tuned from.

The page saves its figures beside it (``results.json``) and the float weights of each model
(``results_float_<model>.pt``); a row is only carried over beside rows fine-tuned from the
same float weights, which a hash of them tells.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from .rows import _load

#: The table's figures, saved beside it (rows missing under --root are carried over from it).
SAVED = "results.json"


def float_weights(path: Path) -> dict[str, Any]:
    """The float model's weights in a Lightning checkpoint or a saved state_dict."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    if any(k.startswith("model.") for k in state):
        state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    return state


def weights_sha(path: Path) -> str | None:
    """Short hash of the float weights in ``path`` (checkpoint or state_dict; None if absent)."""
    import torch

    if not path.is_file():
        return None
    h = hashlib.sha256()
    for key, value in sorted(float_weights(path).items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def keep_float(ckpt: Path, out: Path, model: str) -> Path:
    """Save the float weights of ``ckpt`` beside the table (see :func:`saved_float`)."""
    import torch

    path = saved_float(out, model)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(float_weights(ckpt), tmp)
    os.replace(tmp, path)
    return path


def saved_float(out: Path, model: str) -> Path:
    """Where the page keeps the float weights its ``model`` rows were fine-tuned from."""
    return out / f"results_float_{model}.pt"


def load_saved(out: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """The rows of the table saved in ``out`` by an earlier :func:`render` (empty if none)."""
    saved = _load(out / SAVED)
    if saved is None:
        return {}
    return {(i["model"], i["row"]): i for i in saved["items"] if i.get("done")}
