"""Errors a user can cause, each rendered by the CLI as one line (exit code 2)."""

from __future__ import annotations


class CollapselabError(Exception):
    """Base class: a problem the user can fix, shown as one line without a traceback."""


class ConfigError(CollapselabError):
    """An invalid configuration value; the message names the field and what is allowed."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class MissingFileError(CollapselabError):
    """A required local file is absent; the message names it and says how to obtain it."""

    def __init__(self, path: str, how: str):
        self.path = str(path)
        super().__init__(f"missing file {path}: {how}")
