"""Errors that the CLI turns into one `error:` line plus a `hint:` line.

Library code raises these with a problem statement and, where one exists, the command or flag that
fixes it. `cli.py` maps them to exit codes: 2 for bad usage or bad input, 1 for runtime failures.
"""

from __future__ import annotations


class LlmctlError(Exception):
    """A failure the user can act on; exit code 1 unless a subclass says otherwise."""

    exit_code = 1

    def __init__(self, problem: str, hint: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.hint = hint


class InputError(LlmctlError):
    """The input is missing, empty, malformed or of the wrong kind (exit code 2)."""

    exit_code = 2


class ConfigError(LlmctlError):
    """A flag or config value is out of range or inconsistent (exit code 2)."""

    exit_code = 2


class TrainingError(LlmctlError):
    """Training cannot go on, e.g. the loss became non-finite (exit code 1)."""
