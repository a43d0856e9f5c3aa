"""One small error hierarchy: every message names the file and the fix."""

from __future__ import annotations

from planning.errors import AutoliverError, PlanError

__all__ = [
    "AutoliverError",
    "CheckpointError",
    "DataLoadingError",
    "DatasetError",
    "ImageReadError",
    "MissingArtefactError",
    "PlanError",
    "SplitsError",
    "StaleArtefactError",
    "UsageError",
]


class DatasetError(AutoliverError):
    """A raw dataset or one of its files is invalid."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            text = f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(text)


class ImageReadError(DatasetError):
    """An image file or DICOM folder could not be read."""


class MissingArtefactError(AutoliverError):
    """An artefact a stage needs does not exist; the message names the command that makes it."""


class StaleArtefactError(AutoliverError):
    """An artefact was built from inputs that have changed since."""


class SplitsError(AutoliverError):
    """A splits file is malformed or does not match the dataset."""


class CheckpointError(AutoliverError):
    """A checkpoint is damaged, truncated or from an incompatible run."""


class DataLoadingError(AutoliverError):
    """A batch could not be made; the message names the case and the cause."""


class UsageError(AutoliverError, ValueError):
    """A command or function was called with bad arguments (the CLI exits with status 2).

    Also a ValueError, so library callers that catch ValueError for bad arguments keep working."""
