"""Lightning checkpoints written atomically and loaded safely, and ``ckpt_path=last``.

- :class:`AtomicCheckpointIO` (wired in ``configs/trainer/default.yaml``) writes every
  checkpoint to a temporary file beside its destination, fsyncs it and renames it into place
  (:mod:`qat.io`), so a run killed at any moment leaves the previous ``last.ckpt`` whole.
  Lightning's own ``TorchCheckpointIO`` writes through an fsspec transaction that stages the
  bytes in the system temp directory and moves them with ``shutil.move``: that is a plain copy
  into the destination (a torn file if the copy is interrupted) whenever the run directory is
  on another file system than ``/tmp`` (an NFS / Lustre run dir), and nothing is fsynced.
- :func:`load_checkpoint` (used by the resume and by ``python -m qat.export``) reads with
  ``torch.load(weights_only=True)``: tensors and plain Python types only, so a crafted pickle
  cannot run code; a refused or unreadable file is a :class:`CheckpointError` naming it.
- :func:`resolve_ckpt_path` turns ``ckpt_path=last`` into ``<run dir>/checkpoints/last.ckpt``
  and refuses a file cut short (a copy or download interrupted) before any work.
- :func:`load_float_weights` loads a float model's weights for ``init_from=`` (fine-tuning, PTQ).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _MAP_LOCATION_TYPE, _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from qat.io import atomic_path
from qat.lit.errors import ConfigError

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointError",
    "check_checkpoint_fits",
    "last_checkpoint",
    "load_checkpoint",
    "load_float_weights",
    "model_weights",
    "resolve_ckpt_path",
    "state_mismatch",
]

log = logging.getLogger(__name__)

#: Where ``configs/callbacks/model_checkpoint.yaml`` keeps the rolling checkpoint of a run.
LAST_CKPT = Path("checkpoints") / "last.ckpt"

# torch's refusal: "... Unsupported global: GLOBAL posix.system was not an allowed global ..."
_UNSUPPORTED = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


class CheckpointError(ConfigError):
    """A checkpoint that cannot (or must not) be loaded; the message names the file."""


def last_checkpoint(run_dir: str | os.PathLike[str]) -> Path:
    """``<run_dir>/checkpoints/last.ckpt`` (whether or not it exists)."""
    return Path(run_dir) / LAST_CKPT


def resolve_ckpt_path(ckpt_path: Any, run_dir: str | os.PathLike[str]) -> str | None:
    """The checkpoint file a ``ckpt_path`` config value names, checked before any work.

    ``last`` means this run directory's ``checkpoints/last.ckpt`` (restart an interrupted run
    with the same ``hydra.run.dir`` and ``ckpt_path=last``). Lightning's other keywords and
    remote URLs are passed through unchanged.

    Raises:
        CheckpointError: the file does not exist (the message says where it looked).
    """
    if ckpt_path is None or str(ckpt_path) == "":
        return None
    value = str(ckpt_path)
    if value == "last":
        path = last_checkpoint(run_dir)
        if not path.is_file():
            raise CheckpointError(
                f"ckpt_path=last: no checkpoint at {path}; restart in the interrupted run's "
                "directory (hydra.run.dir=<its dir>) or pass ckpt_path=<path to a .ckpt file>"
            )
        _check_complete(path, value)
        return str(path)
    if value in ("best", "hpc") or "://" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"ckpt_path={value} is not a file; pass a Lightning checkpoint (e.g. "
            "<run dir>/checkpoints/last.ckpt) or ckpt_path=last"
        )
    _check_complete(path, value)
    return str(path)


def _check_complete(path: Path, value: str) -> None:
    """Refuse a checkpoint that is not a whole zip archive, without reading its tensors.

    ``torch.save`` writes a zip whose directory is at the very end, so a file cut short at any
    point has none; torch would only find out inside ``trainer.fit``, after the model was set
    up, with ``OSError: [Errno 22] Invalid argument``. Files in torch's legacy (pre-1.6,
    plain pickle) format are left to the loader.
    """
    try:
        with path.open("rb") as f:
            head = f.read(2)
        if head[:1] == b"\x80":  # a pickle stream: the legacy format
            return
        with zipfile.ZipFile(path):
            return
    except (OSError, zipfile.BadZipFile) as err:
        why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    what = f"ckpt_path={value}" if value == str(path) else f"ckpt_path={value} ({path})"
    raise CheckpointError(
        f"{what} is not a readable checkpoint (truncated or corrupt: {why}, "
        f"{path.stat().st_size} bytes); resume from an earlier checkpoint of the run (e.g. its "
        "checkpoints/best_*.ckpt) or drop ckpt_path to start afresh"
    )


def load_checkpoint(path: _PATH, map_location: _MAP_LOCATION_TYPE = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors that name the file.

    Raises:
        CheckpointError: the file is missing, truncated / corrupt, or holds more than tensors
            and plain Python types (unpickling it could run code, so it is refused unread).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            if head[:1] != b"\x80" and head != b"PK\x03\x04":
                # Neither a zip archive (torch.save) nor a pickle (torch's legacy format):
                # torch.load would fail with whatever its unpickler trips on (KeyError 101).
                what = "it is empty" if not head else f"it starts with {head!r}"
                raise CheckpointError(
                    f"{path} is not a PyTorch checkpoint ({what}; torch.save writes a zip archive)"
                )
            f.seek(0)
            return torch.load(f, map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except pickle.UnpicklingError as err:
        text = str(err)
        if "weights only" not in text.lower() and "weights_only" not in text:
            raise CheckpointError(
                f"{path} is not a readable checkpoint (corrupt: {_first_line(text)})"
            ) from None
        match = _UNSUPPORTED.search(text)
        what = f"it would call {match.group(1)}" if match else "it holds more than tensors"
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain-data checkpoint ({what}); checkpoints "
            "are loaded with torch.load(weights_only=True), tensors and plain Python types only. "
            "Use a checkpoint written by this project, or load it yourself with "
            "weights_only=False if you trust its source"
        ) from None
    except PermissionError as err:
        raise CheckpointError(f"checkpoint {path} cannot be read: {err.strerror}") from None
    except (EOFError, RuntimeError, OSError) as err:
        # torch: "PytorchStreamReader failed reading zip archive" for a torn file, or
        # "OSError: [Errno 22] Invalid argument" when the cut leaves a partial directory.
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt: "
            f"{_first_line(str(err)) or type(err).__name__}); use an earlier one"
        ) from None
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as err:
        # A pickle that is not torch's (torch's unpickler trips on it).
        raise CheckpointError(
            f"{path} is not a PyTorch checkpoint ({type(err).__name__}: "
            f"{_first_line(str(err))} while reading it)"
        ) from None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with atomic local writes and ``weights_only=True`` loads.

    Remote paths (``s3://`` ...) keep Lightning's behaviour. A caller that explicitly passes
    ``weights_only=False`` (``trainer.fit(..., weights_only=False)``) gets Lightning's loader.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            try:
                # Through a Python file object: a failed write (disk full) surfaces as the
                # OSError it is; torch writing to a path reports it as "unexpected pos N vs M".
                torch.save(checkpoint, f)
            except (RuntimeError, OSError) as err:
                cause = err if isinstance(err, OSError) else err.__context__
                if isinstance(cause, OSError) and cause.filename is None and cause.errno:
                    raise OSError(cause.errno, cause.strerror, str(path)) from None
                raise

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: _MAP_LOCATION_TYPE | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if weights_only is False or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().load_checkpoint(path, map_location, weights_only)
        return load_checkpoint(path, map_location=map_location)


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
    fix = (
        "give a float run's checkpoint (<run dir>/checkpoints/last.ckpt of a run with "
        "quant=float) or a state_dict saved with torch.save(model.state_dict(), path)"
    )
    try:
        state = load_checkpoint(file)
    except CheckpointError as err:
        raise ConfigError(f"init_from: {err}; {fix}") from None
    weights = model_weights(state)
    if weights is None:
        raise ConfigError(f"init_from={path} holds no state_dict ({type(state).__name__}); {fix}")
    mismatch = state_mismatch(model, weights)
    if mismatch is not None:
        if any("_quant." in str(k) for k in weights):
            raise ConfigError(
                f"init_from={path} is a quantized run's checkpoint, not a float model's: "
                f"{_quantized_hint(file)}"
            )
        raise ConfigError(
            f"init_from={path} does not fit model {type(model).__name__} (it was saved from "
            f"another model or data config: {mismatch}); {fix}"
        )
    model.load_state_dict(weights, strict=True)
    log.info("float weights loaded from %s", file)


def model_weights(state: Any) -> Mapping[str, Any] | None:
    """The network's weights in a Lightning checkpoint (``model.`` prefix dropped) or a
    plain state_dict; None when ``state`` holds neither."""
    weights = state.get("state_dict", state) if isinstance(state, Mapping) else None
    if not isinstance(weights, Mapping) or not all(isinstance(k, str) for k in weights):
        return None
    prefix = "model."
    if any(k.startswith(prefix) for k in weights):
        weights = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
    return weights


def state_mismatch(model: nn.Module, weights: Mapping[str, Any]) -> str | None:
    """How ``weights`` fail to fit ``model``, in one short line (None: they fit exactly)."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [
        f"{k}: {list(getattr(weights[k], 'shape', []))} vs {list(v.shape)}"
        for k, v in own.items()
        if k in weights
        and hasattr(weights[k], "shape")
        and tuple(weights[k].shape) != tuple(v.shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's tensors missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} tensors the model does not have (e.g. {unexpected[0]})")
    if shapes:
        parts.append(f"{len(shapes)} of another shape (e.g. {shapes[0]}, file vs model)")
    return "; ".join(parts) or None


def check_checkpoint_fits(
    state: Mapping[str, Any], model: nn.Module, recipe: Mapping[str, Any] | None, what: str
) -> None:
    """Refuse a checkpoint trained with another recipe or holding another network.

    ``model`` is the config's network prepared with its recipe (what the checkpoint is loaded
    into); ``recipe`` is the config's recipe as a dict (``Recipe.to_dict()``), compared with the
    one the QAT callback saved in the checkpoint. ``what`` names the file in the message
    (``ckpt_path=...``).

    Raises:
        CheckpointError: one line naming the difference and what to do instead.
    """
    from qat.lit.rundir import first_difference
    from qat.quant.spec import Recipe

    if not isinstance(state, Mapping):
        raise CheckpointError(f"{what} holds no state_dict ({type(state).__name__})")
    saved = (state.get("callbacks") or {}).get("QATCallback") or {}
    saved_recipe = saved.get("recipe") if isinstance(saved, Mapping) else None
    if recipe is not None and saved_recipe is not None:
        before = Recipe.from_dict(saved_recipe).to_dict()
        diff = first_difference(before, dict(recipe), "quant")
        if diff is not None:
            where, old, new = diff
            raise CheckpointError(
                f"{what} was trained with another quantization recipe ({where}: {old} in the "
                f"checkpoint, {new} in this config): use the quant settings of the run that "
                "wrote it (its .hydra/config.yaml)"
            )
    weights = model_weights(state)
    if weights is None:
        raise CheckpointError(f"{what} holds no state_dict (not a Lightning checkpoint)")
    mismatch = state_mismatch(model, weights)
    if mismatch is not None:
        raise CheckpointError(
            f"{what} does not fit the configured model {type(model).__name__} ({mismatch}): "
            "use the model, data and quant settings of the run that wrote it (its "
            ".hydra/config.yaml)"
        )


def _quantized_hint(ckpt: Path) -> str:
    """What works with a quantized run's checkpoint: resume it with its own settings."""
    overrides = ""
    for parent in ckpt.resolve().parents:
        saved = parent / ".hydra" / "overrides.yaml"
        if saved.is_file():
            import yaml

            items = yaml.safe_load(saved.read_text(encoding="utf-8")) or []
            skip = ("hydra.", "ckpt_path=", "trainer.max_epochs=", "init_from=")
            keep = [str(o) for o in items if not str(o).startswith(skip)]
            overrides = " ".join(keep) + " " if keep else ""
            break
    return (
        f"to train it further, resume it with the settings of the run that wrote it: python "
        f"train.py {overrides or '<its overrides> '}ckpt_path={ckpt} trainer.max_epochs=<more>; "
        f"to export it: python -m qat.export ckpt_path={ckpt}"
    )
