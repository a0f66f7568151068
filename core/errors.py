"""User-facing errors. The CLI prints them as one line each and exits with ``exit_code`` (2 unless a
class says otherwise)."""
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


class PluginFailure(PluginError):
    """Plugin code raised while ftk called it (a factory, a loader's examples, a metric's compute, a
    callback, a command). The message names the plugin, its package and version, the component, the
    phase and the exception; the original exception is ``__cause__`` (the CLI prints its traceback
    with ``FTK_DEBUG=1``). Exit code 1: a bug in a plugin, not bad input from the user."""

    exit_code = 1

    def __init__(self, message: str | list[str], *, plugin: str = "", package: str = "", version: str = "",
                 component: str = "", phase: str = ""):
        super().__init__(message)
        self.plugin, self.package, self.version = plugin, package, version
        self.component, self.phase = component, phase


class RunError(FtkError):
    """A run stopped for a reason the user must act on (NaN loss, output dir in use, ...)."""

    exit_code = 1
