"""One family of typed errors. The CLI turns each into one line and an exit code.

Library code raises these and never exits the process; `grape_cli.cli` is the only
place that maps them to an exit code.
"""

from __future__ import annotations


class GrapeError(Exception):
    """Base class: `message` says what went wrong, `hint` says what to do about it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(GrapeError):
    """Bad arguments or settings (the equivalent of a CLI usage error)."""

    exit_code = 2


class InputError(GrapeError):
    """A user file (pairs, image, prompt) that cannot be used."""

    exit_code = 2


class ModelError(GrapeError):
    """A model that cannot be found, downloaded or loaded."""

    exit_code = 3


class IndexNotFound(GrapeError):
    exit_code = 4


class IndexMismatch(GrapeError):
    """The index was built with another embedding model or an older schema."""

    exit_code = 4


class IndexLocked(GrapeError):
    """Another process is writing to the same index."""

    exit_code = 5


class TrainingError(GrapeError):
    exit_code = 6


class HubError(GrapeError):
    exit_code = 7


class ClusterError(GrapeError):
    """The Ray cluster could not be reached, or the pipeline failed on it."""

    exit_code = 9


class IndexDamaged(GrapeError):
    """The index folder is there but part of it is missing or unreadable (a table, the
    manifest). `grape index` repairs what it can; readers stop and say so."""

    exit_code = 8
