"""An export folder as one unit: a complete, described set of files, or nothing.

:func:`export_folder` fills a hidden staging folder beside the destination (the models, the
report, and ``manifest.json`` naming every file with its sha256 and size, the checkpoint it came
from and its parity), then renames it into place in one step (:func:`qat.io.commit_dir`). A
failure or a kill before that rename leaves the destination as it was; a file from another
export never ends up beside these. A destination that already holds an export is not written
into: the set goes to the next free ``<name>-2``, ``-3``, ... unless ``replace`` is asked for,
which swaps the whole folder.

Example:
    >>> report = export_folder(run_dir / "export", lambda tmp: run_export(model, b, opts, tmp))
    >>> report["out_dir"]          # where the set landed
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from qat.io import commit_dir, free_dir, staged_dir

__all__ = ["MANIFEST", "export_folder", "file_digest", "read_manifest"]

#: The file in every export folder that describes the others.
MANIFEST = "manifest.json"


def file_digest(path: str | Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _retarget(value: Any, old: str, new: str) -> Any:
    """``value`` with every string path under ``old`` moved under ``new``."""
    if isinstance(value, str):
        return new + value[len(old) :] if value == old or value.startswith(old + "/") else value
    if isinstance(value, Mapping):
        return {k: _retarget(v, old, new) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_retarget(v, old, new) for v in value]
    return value


def _parity_summary(report: Mapping[str, Any]) -> dict[str, Any]:
    if "parity_ok" not in report:
        return {"checked": False}
    out: dict[str, Any] = {"checked": True, "ok": bool(report["parity_ok"])}
    if report.get("parity_error"):
        out["error"] = report["parity_error"]
    parity = report.get("parity")
    if isinstance(parity, Mapping):
        # The scalar figures: the fake-quant model's and each runtime's (classification and
        # language-model reports nest them alike).
        def scalars(row: Any) -> dict[str, Any]:
            if not isinstance(row, Mapping):
                return {}
            return {k: v for k, v in row.items() if isinstance(v, int | float | bool | str)}

        out["reference"] = scalars(parity.get("fake_quant"))
        out["runtimes"] = {k: scalars(v) for k, v in (parity.get("runtimes") or {}).items()}
    return out


def export_folder(
    out_dir: str | Path,
    build: Callable[[Path], dict[str, Any]],
    checkpoint: Mapping[str, Any] | None = None,
    replace: bool = False,
    report_name: str | None = None,
) -> dict[str, Any]:
    """Run ``build(staging folder)`` and move the complete set into ``out_dir`` (or a new one).

    Args:
        out_dir: where the set should go. If it already holds files, the set goes to the next
            free ``<out_dir>-N`` instead, unless ``replace`` (then the old folder is swapped out
            whole).
        build: writes the models into the folder it is given and returns its report (paths
            under that folder are rewritten to the final folder).
        checkpoint: what the models came from (path, sha256, epoch, ...), for the manifest.
        replace: replace an ``out_dir`` that holds a previous export.
        report_name: also write the report into the folder under this name (e.g.
            ``export_report.json``); the manifest names it with the models.

    Returns:
        The report, with ``out_dir`` the folder the set landed in and ``manifest`` its path.
    """
    wanted = Path(out_dir).expanduser().absolute()  # "." has no name to number
    final = wanted if replace else free_dir(wanted)
    tmp = staged_dir(final)
    try:
        try:
            report = _retarget(build(tmp), str(tmp), str(final))
        except OSError as err:
            # A failed write (disk full) names the file it was for, not the staging folder.
            if err.errno is not None and isinstance(err.filename, str):
                raise OSError(
                    err.errno, err.strerror, _retarget(err.filename, str(tmp), str(final))
                ) from None
            raise
        report["out_dir"] = str(final)
        report["manifest"] = str(final / MANIFEST)
        if final != wanted:
            report["out_dir_note"] = f"{wanted} holds an earlier export; this one is in {final}"
        if report_name is not None:
            text = json.dumps(report, indent=2, default=str)
            (tmp / report_name).write_text(text + "\n", encoding="utf-8")
        files = {
            str(p.relative_to(tmp)): {"sha256": file_digest(p), "size_bytes": p.stat().st_size}
            for p in sorted(tmp.rglob("*"))
            if p.is_file()
        }
        manifest = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "checkpoint": dict(checkpoint or {}),
            "files": files,
            "parity": _parity_summary(report),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        commit_dir(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    return report


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """``manifest.json`` of an export folder, checked against the files there.

    Raises:
        ValueError: a file the manifest names is missing or differs from its recorded sha256.
    """
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file() or file_digest(path) != entry["sha256"]:
            raise ValueError(f"{path} is missing or differs from {folder / MANIFEST}")
    return manifest
