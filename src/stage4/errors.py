"""The errors stage4 reports to its users.

Every error a user can cause or meet is a Stage4Error: the CLI prints its message as one line and
exits with its exit code, without a traceback.
"""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class Stage4Error(Exception):
    """A failure with a message meant for the user."""

    exit_code = EXIT_FAILURE


class InputError(Stage4Error):
    """Bad input: a config value, an argument or a file that cannot be used as given."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(InputError):
    """A value in a config file is wrong; the message names the file, the key and the value."""

    def __init__(self, source: str, key: str, value: object, problem: str):
        self.source, self.key, self.value, self.problem = source, key, value, problem
        shown = "" if value is _MISSING else f" = {value!r}"
        super().__init__(f"{source}: {key}{shown}: {problem}")


_MISSING = object()
MISSING = _MISSING


class StepFailed(Stage4Error):
    """An external command or a build step failed."""

    def __init__(self, step: str, detail: str, log_path: object = None):
        self.step = step
        where = f" (log: {log_path})" if log_path else ""
        super().__init__(f"{step} failed: {detail}{where}")


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; unwinds the build so every cleanup runs.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` swallows it.
    """

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by signal {signum}")
