"""The application's config error: one line that names the key and says how to fix it."""

from __future__ import annotations

import errno

__all__ = ["ConfigError", "disk_full"]

#: errno values that mean "no room to write": the disk, or the user's quota.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


def disk_full(err: BaseException) -> str | None:
    """For an error caused by a full disk (or quota), one line naming the file; else None.

    Looks through the exception's causes: Lightning and torch wrap the OSError.
    """
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in _NO_SPACE:
            where = f" writing {cause.filename}" if cause.filename else ""
            return f"no space left on the device{where} ({cause.strerror or 'disk full'})"
        cause = cause.__cause__ or cause.__context__
    return None
