"""Atomic file writes: a reader sees the old file or the new one, never a torn one.

Each write goes to a temporary file in the destination's own directory (``os.replace`` is atomic
only within one file system), is flushed and fsynced, and then replaces the destination. If
anything fails before the replace (the writer raises, a smoke test of the new file fails, the
process is interrupted), the temporary file is removed and the previous file is untouched. A
``SIGKILL`` cannot be cleaned up after: it may leave a hidden ``.<name>.<host>-<pid>-*.tmp``
file beside the destination (never a torn destination); the next write of that destination
removes it once that process is gone.

Used for everything a run leaves behind: exported models, ``results.json`` /
``export_report.json`` and Lightning checkpoints (:class:`qat.checkpoint.AtomicCheckpointIO`).
Standard library only, so it is cheap to import anywhere.

Example:
    >>> with atomic_path("export/model.onnx") as tmp:
    ...     tmp.write_bytes(data)
    ...     check(tmp)            # raise here and export/model.onnx stays as it was
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "commit",
    "commit_dir",
    "free_dir",
    "remove_stale",
    "staged_dir",
    "staged_path",
    "write_staged",
]

_CHUNK = 1 << 20


# After ".<name>.": "<host>-<pid>-<mkstemp's random letters>.tmp".
_TMP_NAME = re.compile(r"^(?P<host>.+)-(?P<pid>\d+)-\w+\.tmp$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale(path: str | os.PathLike[str]) -> list[Path]:
    """Remove temporary files that killed writers left beside ``path``; return them.

    Only files written on this host by a process that no longer exists are removed: a live
    writer's file, or one from another host sharing the file system, is left alone.
    """
    path = Path(path)
    prefix = f".{path.name}."
    host = socket.gethostname()
    removed = []
    for tmp in path.parent.glob(glob.escape(prefix) + "*.tmp"):
        m = _TMP_NAME.match(tmp.name[len(prefix) :])
        if m is None or m["host"] != host:
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _alive(pid):
            continue
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def staged_path(path: str | os.PathLike[str]) -> Path:
    """A new, empty temporary file next to ``path`` (same directory, so the rename is atomic).

    Its name carries this host and process id, so a later write can tell a killed writer's
    leftovers from a live writer's file (:func:`remove_stale`, run here first).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    owner = f"{socket.gethostname()}-{os.getpid()}-"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{owner}", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes 0600 files: give the artifact the mode an ordinary file would get
        # (or the mode of the file it replaces).
        os.fchmod(fd, _target_mode(path))
    finally:
        os.close(fd)
    return Path(tmp)


def _target_mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    # Persist the rename itself; not every platform / file system allows opening a directory.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def commit(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """fsync ``tmp`` and atomically move it onto ``path``."""
    tmp, path = Path(tmp), Path(path)
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it vanishes."""
    path = Path(path)
    tmp = staged_path(path)
    try:
        yield tmp
        commit(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _write_all(f, data: bytes) -> None:  # type: ignore[no-untyped-def]
    view = memoryview(data)
    for start in range(0, len(view), _CHUNK):
        f.write(view[start : start + _CHUNK])


@contextlib.contextmanager
def _naming(path: str | os.PathLike[str]) -> Iterator[None]:
    """An OSError without a file name (a failed ``write``: disk full) names ``path``."""
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno is not None:
            raise OSError(err.errno, err.strerror, str(path)) from None
        raise


def write_staged(path: str | os.PathLike[str], data: bytes) -> Path:
    r"""Write ``data`` to a new temporary file next to ``path`` and return it (not committed).

    The caller tests the staged file, then :func:`commit`\ s it (or deletes it). A failed write
    removes the temporary file and re-raises.
    """
    tmp = staged_path(path)
    try:
        with _naming(path), open(tmp, "wb") as f:
            _write_all(f, data)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return tmp


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see the module docstring)."""
    with _naming(path), atomic_path(path) as tmp, open(tmp, "wb") as f:
        _write_all(f, data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see the module docstring)."""
    return atomic_write_bytes(path, text.encode(encoding))


# ---------------------------------------------------------------------- whole folders
def free_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` if it does not exist or is empty, else the first free ``<path>-2``, ``-3``, ..."""
    path = Path(path)
    candidate, n = path, 1
    while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def staged_dir(path: str | os.PathLike[str]) -> Path:
    """A new, empty hidden folder next to ``path``, to fill and then :func:`commit_dir`.

    Named like :func:`staged_path`'s files (``.<name>.<host>-<pid>-*.tmp``), so a killed
    writer's folder is recognised and removed by the next staging of the same destination.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_dirs(path)
    owner = f"{socket.gethostname()}-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{owner}", suffix=".tmp", dir=path.parent))
    # mkdtemp makes 0700 folders: give it the mode an ordinary folder would get.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


def _remove_stale_dirs(path: Path) -> None:
    prefix = f".{path.name}."
    host = socket.gethostname()
    for tmp in path.parent.glob(glob.escape(prefix) + "*.tmp"):
        m = _TMP_NAME.match(tmp.name[len(prefix) :])
        if not tmp.is_dir() or m is None or m["host"] != host:
            continue
        pid = int(m["pid"])
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def commit_dir(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """Move the filled folder ``tmp`` onto ``path``: every file fsynced, then one rename.

    A ``path`` that holds files is replaced: it is first renamed aside (hidden, beside it), the
    new folder renamed into place, and only then the old one removed, so at every moment
    ``path`` is either the whole old set or the whole new one (or, between the two renames,
    absent, with the old set beside it).
    """
    tmp, path = Path(tmp), Path(path)
    for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
        _fsync_file(file)
    _fsync_dir(tmp)
    old = None
    if path.exists():
        old = staged_dir(path)
        os.replace(path, old / path.name)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path
