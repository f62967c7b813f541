"""Errors raised for user mistakes with data, so the command line can answer them with a clear
message and exit code 2 instead of a traceback.

All are `DatasetError` (a `ValueError`). A file or directory that is not there is also a
`FileNotFoundError`, and a missing optional package (Pillow, h5py, pandas, scikit-learn) is
also an `ImportError`, so code that catches the builtin kinds keeps working.
"""

from __future__ import annotations

__all__ = ["DatasetError", "DatasetNotFoundError", "MissingDependencyError"]


class DatasetError(ValueError):
    """A dataset name, file or content that cannot be used; the message says why."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """An expected data file or directory is absent; the message names the expected path."""


class MissingDependencyError(DatasetError, ImportError):
    """An optional package needed for this dataset is not installed; the message names it."""
