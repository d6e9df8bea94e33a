"""User-facing errors: one line that names the file and the problem, and an exit code.

Every error a user can cause (bad file, bad option, wrong checkpoint) is raised as a subclass of
`FSEFTError`; the CLI prints `str(error)` alone (no traceback) and exits with `error.exit_code`.
Anything else escaping is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


class FSEFTError(Exception):
    """Base class of errors meant for the user, not the developer."""

    exit_code = 1

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = os.fspath(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


class InputError(FSEFTError):
    """An input image, label, study list or option the user gave is unusable."""

    exit_code = 2


class ModelError(FSEFTError):
    """A checkpoint or registry entry is missing, unsafe or of the wrong layout."""

    exit_code = 3


class DownloadError(FSEFTError):
    """Fetching a model failed (network, size or checksum)."""

    exit_code = 4


class JobFailed(FSEFTError):
    """Some studies of a batch failed; the others were written."""

    exit_code = 5


class Cancelled(FSEFTError):
    """The user interrupted the run; nothing half-written was left behind."""

    exit_code = 130


def listed(items: Sequence[str], most: int = 6) -> str:
    """The first `most` items for a one-line error, and how many more there are."""
    return ", ".join(items[:most]) + (f" (+{len(items) - most} more)" if len(items) > most else "")
