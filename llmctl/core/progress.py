"""Progress reporting as a protocol: library code calls these methods; the default does nothing.

The rich implementation lives in `cli.py` (the only module that imports rich), so tests and
notebooks that call a stage's `run()` stay quiet.
"""

from __future__ import annotations

from typing import Any, Protocol


class Progress(Protocol):
    """What a long-running stage reports."""

    def start(self, task: str, total: float | None, unit: str = "") -> None:
        """Begin a task with a known (or unknown) total."""

    def advance(self, n: float = 1, **fields: Any) -> None:
        """Move the current task forward, updating its displayed fields (loss, tok/s, ...)."""

    def log(self, message: str) -> None:
        """A line above the bar (validation results, checkpoints)."""

    def stop(self) -> None:
        """End the current task."""


class Silent:
    """Progress that reports nothing."""

    def start(self, task: str, total: float | None, unit: str = "") -> None:  # noqa: D102
        pass

    def advance(self, n: float = 1, **fields: Any) -> None:  # noqa: D102
        pass

    def log(self, message: str) -> None:  # noqa: D102
        pass

    def stop(self) -> None:  # noqa: D102
        pass


SILENT = Silent()
