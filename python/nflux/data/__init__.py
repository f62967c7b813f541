"""Datasets for nflux: embedded 2-D toys, scikit-learn's bundled digits and tabular sets,
users' .npy/.csv files and image folders, and the UCI density benchmarks from local files.

    splits = nflux.data.load("moons")            # Splits(train, val, test, kind, shape, meta)
    nflux.data.available()                       # {name: description}
    std = nflux.data.Standardizer.fit(splits.train)

Nothing is downloaded. See `nflux.data.datasets` for the conventions (splits, units, levels).
"""

from __future__ import annotations

from nflux.data import toys
from nflux.data.datasets import TOY_SIZES, Splits, available, load, split_random
from nflux.data.errors import DatasetError, DatasetNotFoundError, MissingDependencyError
from nflux.data.standardize import Standardizer

__all__ = [
    "TOY_SIZES",
    "DatasetError",
    "DatasetNotFoundError",
    "MissingDependencyError",
    "Splits",
    "Standardizer",
    "available",
    "load",
    "split_random",
    "toys",
]
