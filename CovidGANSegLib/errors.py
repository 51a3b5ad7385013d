"""Exceptions with messages a user can act on: they name the file and the problem."""

from __future__ import annotations

from pathlib import Path


class CovidGANSegError(Exception):
    """Base class of the library's own errors (the CLI prints them without a traceback)."""

    def __str__(self) -> str:
        text = " ".join(line.strip() for line in super().__str__().splitlines() if line.strip())  # one line
        return text or f"{type(self).__name__} (no details)"


class InputError(CovidGANSegError, ValueError):
    """Bad input data: the message names the file (when there is one) and the problem."""

    def __init__(self, problem: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)


class CheckpointError(InputError):
    """A checkpoint that is missing, corrupt, truncated, of another format or architecture."""


class OutputError(CovidGANSegError):
    """An output that cannot be written (read-only folder, disk full, file-size limit...).

    The message names the output file the user asked for, never the temporary file beside it.
    """

    def __init__(self, problem: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)


def exception_chain(exc: BaseException, limit: int = 10) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from or while handling, newest first (at most ``limit``)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < limit and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain
