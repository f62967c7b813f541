"""The five UCI density benchmarks, from the MAF paper's preprocessed files on local disk.

`load(name, root) -> (train, val, test, meta)` as float64 numpy arrays. `root` is the folder
the MAF data archive unpacks to (Papamakarios et al. 2017, https://zenodo.org/record/1161203),
laid out as

    root/power/data.npy
    root/gas/ethylene_CO.pickle          (or ethylene_CO.npy, see below)
    root/hepmass/1000_train.csv, root/hepmass/1000_test.csv
    root/miniboone/data.npy
    root/BSDS300/BSDS300.hdf5            (or BSDS300/{train,validation,test}.npy)

Each set gets exactly the preprocessing and splits of the reference code
(github.com/gpapamak/maf, datasets/*.py), re-implemented on numpy:

- power (8 columns in data.npy): shuffle rows, drop columns 3 and 1, add the reference's
  uniform jitter (shuffle and jitter from `RandomState(42)`), split off the last 10% as
  test and the last 10% of the rest as val, standardise with the mean/std (ddof 0) of train+val. 6 features.
- gas: drop Meth, Eth, Time; repeatedly drop the first column that has a correlation > 0.98
  with another; standardise (ddof 1) on all rows; same tail splits. 8 features.
- hepmass: keep rows of class 1, drop the label (and the test file's extra last column);
  standardise with train's mean/std (ddof 1); drop features whose smallest value occurs more
  than 5 times in train (the reference's test); val is the last 10% of train. 21 features.
- miniboone: tail splits as power, standardise on train+val (ddof 0). 43 features.
- bsds300: the hdf5's train/validation/test as they are. 63 features.

gas's file is a pandas pickle, which runs code when loaded. It is read only when pandas is
installed (the MAF archive is a trusted file the user put there), and a pickle-free
`gas/ethylene_CO.npy` is preferred when present: the 16 sensor columns (the frame without
Meth, Eth, Time) as a float array, written once with

    python -c "import numpy as np, pandas as pd; d = pd.read_pickle('ethylene_CO.pickle');
               np.save('ethylene_CO.npy', d.drop(columns=['Meth', 'Eth', 'Time']).to_numpy(float))"

BSDS300's hdf5 needs h5py; without it, `BSDS300/{train,validation,test}.npy` are read instead.
Absent files raise `DatasetNotFoundError` naming the expected path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from nflux.data.errors import DatasetError, DatasetNotFoundError, MissingDependencyError

__all__ = ["DESCRIPTIONS", "load"]

MAF_URL = "https://zenodo.org/record/1161203"

DESCRIPTIONS = {
    "power": "UCI household electric power, 6 features (MAF preprocessing; needs root)",
    "gas": "UCI gas sensors (ethylene/CO), 8 features (MAF preprocessing; needs root)",
    "hepmass": "UCI HEPMASS signal events, 21 features (MAF preprocessing; needs root)",
    "miniboone": "UCI MiniBooNE particle ids, 43 features (MAF preprocessing; needs root)",
    "bsds300": "BSDS300 8x8 natural image patches, 63 features (MAF preprocessing; needs root)",
}

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]


def load(name: str, root: str | os.PathLike | None) -> Arrays:
    """(train, val, test, meta) of UCI benchmark `name`, read from under `root`."""
    if root is None:
        raise DatasetError(
            f"dataset {name!r} is read from the MAF paper's preprocessed files on your disk: "
            f"give the folder that holds {_EXPECTED[name]} as root (data: {MAF_URL})"
        )
    root = Path(root).expanduser()
    train, val, test = _LOADERS[name](root)
    meta = {
        "source": str(root),
        "preprocessing": f"MAF (Papamakarios et al. 2017), {name}",
        "standardized": name != "bsds300",
    }
    return train, val, test, meta


def _need(path: Path) -> Path:
    if not path.is_file():
        raise DatasetNotFoundError(f"expected data file not found: {path} (MAF preprocessed data: {MAF_URL})")
    return path


def _npy(path: Path) -> np.ndarray:
    _need(path)  # outside the try: DatasetNotFoundError is a ValueError too
    try:
        x = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise DatasetError(f"{path}: not a numeric .npy array ({e})") from None
    if x.ndim != 2:
        raise DatasetError(f"{path}: expected a 2-D array [rows, features], got shape {x.shape}")
    return x.astype(np.float64)


def _tail_splits(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The reference split: last 10% test, then last 10% of the rest val."""
    n_test = int(0.1 * data.shape[0])
    test, rest = data[data.shape[0] - n_test :], data[: data.shape[0] - n_test]
    n_val = int(0.1 * rest.shape[0])
    return rest[: rest.shape[0] - n_val], rest[rest.shape[0] - n_val :], test


def _standardise_on(train, val, test, ref, ddof):
    mu, s = ref.mean(axis=0), ref.std(axis=0, ddof=ddof)
    return (train - mu) / s, (val - mu) / s, (test - mu) / s


def _power(root: Path):
    data = _npy(root / "power" / "data.npy")
    if data.shape[1] != 8:
        raise DatasetError(f"{root / 'power' / 'data.npy'}: expected 8 columns, got {data.shape[1]}")
    rng = np.random.RandomState(42)
    rng.shuffle(data)
    n = data.shape[0]
    data = np.delete(np.delete(data, 3, axis=1), 1, axis=1)
    voltage_noise = 0.01 * rng.rand(n, 1)  # the reference draws voltage before gap
    gap_noise = 0.001 * rng.rand(n, 1)
    sm_noise = rng.rand(n, 3)
    data = data + np.hstack((gap_noise, voltage_noise, sm_noise, np.zeros((n, 1))))
    train, val, test = _tail_splits(data)
    return _standardise_on(train, val, test, np.vstack((train, val)), ddof=0)


def _gas_raw(root: Path) -> np.ndarray:
    npy, pickle = root / "gas" / "ethylene_CO.npy", root / "gas" / "ethylene_CO.pickle"
    if npy.is_file():
        return _npy(npy)
    _need(pickle)
    try:
        import pandas as pd
    except ImportError:
        raise MissingDependencyError(
            f"{pickle} is a pandas pickle: install pandas to read it, or convert it once to "
            f"{npy} (see nflux.data.uci's docstring for the one-line command)"
        ) from None
    frame = pd.read_pickle(pickle)
    return frame.drop(columns=["Meth", "Eth", "Time"]).to_numpy(dtype=np.float64)


def _gas(root: Path):
    data = _gas_raw(root)
    # Drop the first column correlated > 0.98 with another, until none is (reference loop).
    while True:
        with np.errstate(invalid="ignore", divide="ignore"):  # a constant column has NaN correlations
            too_correlated = (np.corrcoef(data, rowvar=False) > 0.98).sum(axis=1) > 1
        if not too_correlated.any():
            break
        data = np.delete(data, int(np.flatnonzero(too_correlated)[0]), axis=1)
    data = (data - data.mean(axis=0)) / data.std(axis=0, ddof=1)
    return _tail_splits(data)


def _read_csv_with_header(path: Path) -> np.ndarray:
    _need(path)
    try:
        return np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2, dtype=np.float64)
    except ValueError as e:
        raise DatasetError(f"{path}: cannot parse as a numeric CSV with one header row ({e})") from None


def _hepmass(root: Path):
    train = _read_csv_with_header(root / "hepmass" / "1000_train.csv")
    test = _read_csv_with_header(root / "hepmass" / "1000_test.csv")
    train = train[train[:, 0] == 1][:, 1:]
    test = test[test[:, 0] == 1][:, 1:-1]  # the test file has one extra trailing column
    if train.shape[1] != test.shape[1]:
        raise DatasetError(
            f"{root / 'hepmass'}: after dropping the label, train has {train.shape[1]} features but test has "
            f"{test.shape[1]} (expected the test file to have one extra last column)"
        )
    mu, s = train.mean(axis=0), train.std(axis=0, ddof=1)
    train, test = (train - mu) / s, (test - mu) / s
    # The reference drops a feature when its *smallest* value recurs more than 5 times.
    keep = [j for j in range(train.shape[1]) if np.count_nonzero(train[:, j] == train[:, j].min()) <= 5]
    train, test = train[:, keep], test[:, keep]
    n_val = int(0.1 * train.shape[0])
    return train[: train.shape[0] - n_val], train[train.shape[0] - n_val :], test


def _miniboone(root: Path):
    train, val, test = _tail_splits(_npy(root / "miniboone" / "data.npy"))
    return _standardise_on(train, val, test, np.vstack((train, val)), ddof=0)


def _bsds300(root: Path):
    folder = root / "BSDS300"
    hdf5 = folder / "BSDS300.hdf5"
    names = ("train", "validation", "test")
    if hdf5.is_file():
        try:
            import h5py
        except ImportError:
            if all((folder / f"{k}.npy").is_file() for k in names):
                return tuple(_npy(folder / f"{k}.npy") for k in names)
            raise MissingDependencyError(
                f"{hdf5} needs h5py, which is not installed: pip install h5py "
                f"(or save its train/validation/test datasets as {folder}/<name>.npy)"
            ) from None
        with h5py.File(hdf5, "r") as f:
            return tuple(np.asarray(f[k], dtype=np.float64) for k in names)
    if all((folder / f"{k}.npy").is_file() for k in names):
        return tuple(_npy(folder / f"{k}.npy") for k in names)
    _need(hdf5)


_LOADERS = {"power": _power, "gas": _gas, "hepmass": _hepmass, "miniboone": _miniboone, "bsds300": _bsds300}
_EXPECTED = {
    "power": "power/data.npy",
    "gas": "gas/ethylene_CO.pickle (or gas/ethylene_CO.npy)",
    "hepmass": "hepmass/1000_train.csv and hepmass/1000_test.csv",
    "miniboone": "miniboone/data.npy",
    "bsds300": "BSDS300/BSDS300.hdf5",
}
