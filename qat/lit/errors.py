"""The application's config error: one line that names the key and says how to fix it."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""
