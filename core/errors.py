"""User-facing errors. The CLI prints them as one line each and exits with code 2."""
from __future__ import annotations


class FtkError(Exception):
    """Bad input from the user (recipe, data, plugin choice). Printed without a traceback."""

    exit_code = 2

    def __init__(self, message: str | list[str]):
        self.messages = [message] if isinstance(message, str) else list(message)
        super().__init__("\n".join(self.messages))


class DataError(FtkError):
    """A problem with a data file or record; the message names file and record/line."""


class PluginError(FtkError):
    """A recipe uses a plugin component that is broken, duplicated or missing."""


class RunError(FtkError):
    """A run stopped for a reason the user must act on (NaN loss, output dir in use, ...)."""

    exit_code = 1
