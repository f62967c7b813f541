"""The dataset registry: `available()` and `load(name, root=None, seed=0) -> Splits`.

Nothing is downloaded, ever. The sets are:

- toys (kind "toy"): the seven 2-D densities of `nflux.data.toys`, drawn afresh from fixed
  seeds: 50,000 train / 5,000 val / 10,000 test points. Same `seed` -> same tensors; a
  different `seed` -> independent draws.
- `digits` (kind "image"): scikit-learn's bundled 8x8 handwritten digits, 1797 images as
  float tensors [N, 1, 8, 8] holding the integer intensities 0..16 (17 levels; meta["levels"]).
  They are not dequantised or rescaled here: the model side adds uniform noise and divides
  by 17 (or whatever its convention is), using meta["levels"].
- `iris`, `wine`, `breast_cancer`, `diabetes` (kind "tabular"): the feature matrices of
  scikit-learn's bundled `load_*` sets (read from files inside the package, no `fetch_*`),
  in data units (diabetes unscaled).
- `power`, `gas`, `hepmass`, `miniboone`, `bsds300` (kind "tabular"): the UCI density
  benchmarks, read from the MAF paper's preprocessed files under a user-given `root`, with
  the MAF splits and preprocessing (see `nflux.data.uci`).
- a path (kind "tabular" or "image"): a user's `.npy` / `.csv` file or a folder of PNG/JPEG
  images (see `nflux.data.files`).

Finite sets are shuffled with a `torch.Generator` seeded by `seed` and split 80/10/10
(train/val/test; at least one example in val and test), except the UCI sets, which keep the
MAF paper's fixed splits. Data are returned in data units, float32 by default: standardising
tabular data is the caller's step (`nflux.data.Standardizer`, fitted on `train`), so that the
statistics can be recorded in the run config.

scikit-learn is a dependency of nflux (the digits are the default image set) but is imported
only when one of its sets is loaded; if it is missing, loading one of them raises a
`MissingDependencyError` saying `pip install scikit-learn`, and everything else works.
"""

from __future__ import annotations

import difflib
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nflux.data import files, toys, uci
from nflux.data.errors import DatasetError, MissingDependencyError

__all__ = ["TOY_SIZES", "Splits", "available", "load", "split_random"]

TOY_SIZES = {"train": 50_000, "val": 5_000, "test": 10_000}
KINDS = ("toy", "tabular", "image")


@dataclass(frozen=True)
class Splits:
    """Train/val/test tensors of one dataset, all of shape [n_split, *shape].

    kind: "toy", "tabular" or "image". shape: one example's shape ((2,), (D,) or (C, H, W)).
    meta: JSON-serialisable facts (name, source, sizes; for images `levels`, the number of
    integer intensity levels; for preprocessed sets a `preprocessing` note).
    """

    train: Tensor
    val: Tensor
    test: Tensor
    kind: str
    shape: tuple[int, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        for split in ("train", "val", "test"):
            t = getattr(self, split)
            if tuple(t.shape[1:]) != tuple(self.shape):
                raise ValueError(f"{split} has shape {tuple(t.shape)}, expected [n, {self.shape}]")


def split_random(x: np.ndarray | Tensor, seed: int, val: float = 0.1, test: float = 0.1):
    """Shuffle rows with a generator seeded by `seed`; return (train, val, test) tensors.

    Val and test get round(fraction * N) rows each, at least one; train gets the rest."""
    x = torch.as_tensor(x)
    n = x.shape[0]
    if n < 3:
        raise DatasetError(f"need at least 3 examples to make train/val/test splits, got {n}")
    n_val, n_test = max(1, round(val * n)), max(1, round(test * n))
    if n_val + n_test >= n:
        n_val = n_test = 1
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g)
    x = x[perm]
    return x[: n - n_val - n_test], x[n - n_val - n_test : n - n_test], x[n - n_test :]


def _derived_seed(*parts: object) -> int:
    """A 63-bit seed from the parts, stable across runs and platforms (unlike hash())."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _dtype_for(dtype, kind: str) -> torch.dtype:
    """`dtype`, or for None the natural one: float64 for tabular data, whose standardisation
    needs its full precision (a column of 2e7 + N(0, 0.5) keeps only 3 distinct values in
    float32); float32 for images (integer levels are exact in it) and for the 2-D toys (drawn
    in float32, so that their samples stay those of earlier runs)."""
    if dtype is not None:
        return dtype
    return torch.float64 if kind == "tabular" else torch.float32


def _load_toy(name: str, seed: int, dtype) -> Splits:
    dtype = _dtype_for(dtype, "toy")
    sampler = toys.TOYS[name][0]
    out = {}
    for split, n in TOY_SIZES.items():
        g = torch.Generator().manual_seed(_derived_seed("nflux-toy", name, split, seed))
        out[split] = sampler(n, g, dtype=dtype)
    meta = {"name": name, "source": "nflux.data.toys", "seed": seed, "sizes": dict(TOY_SIZES),
            "has_log_prob": toys.TOYS[name][1] is not None}
    return Splits(out["train"], out["val"], out["test"], "toy", (2,), meta)


def _sklearn_datasets():
    try:
        import sklearn.datasets
    except ImportError:
        raise MissingDependencyError(
            "this dataset ships inside scikit-learn, which is not installed: pip install scikit-learn"
        ) from None
    return sklearn.datasets


def _finish(name: str, x: np.ndarray, kind: str, seed: int, dtype, meta: dict) -> Splits:
    tr, va, te = split_random(torch.as_tensor(np.asarray(x)).to(_dtype_for(dtype, kind)), seed)
    meta = {"name": name, "seed": seed, "sizes": {"train": len(tr), "val": len(va), "test": len(te)}, **meta}
    return Splits(tr, va, te, kind, tuple(tr.shape[1:]), meta)


def _load_digits(seed: int, dtype) -> Splits:
    images = _sklearn_datasets().load_digits().images  # [1797, 8, 8], integers 0..16 as float64
    meta = {"source": "sklearn.datasets.load_digits", "levels": 17, "value_range": [0, 16],
            "convention": "integer intensities 0..16 stored as floats, not dequantised"}
    return _finish("digits", images[:, None], "image", seed, dtype, meta)


def _sklearn_tabular(loader: str, **kwargs) -> Callable[[int, Any], Splits]:
    def load_set(seed: int, dtype) -> Splits:
        fn = getattr(_sklearn_datasets(), loader)
        try:
            data = fn(**kwargs).data
        except TypeError:  # scikit-learn too old for the keyword (diabetes `scaled`)
            data = fn().data
        name = loader.removeprefix("load_")
        return _finish(name, data, "tabular", seed, dtype, {"source": f"sklearn.datasets.{loader}"})

    return load_set


def _uci(name: str) -> Callable[..., Splits]:
    def load_set(seed: int, dtype, root) -> Splits:
        arrays = uci.load(name, root)
        tr, va, te = (torch.as_tensor(np.ascontiguousarray(a)).to(_dtype_for(dtype, "tabular")) for a in arrays[:3])
        meta = arrays[3]
        meta = {"name": name, "sizes": {"train": len(tr), "val": len(va), "test": len(te)}, **meta}
        return Splits(tr, va, te, "tabular", tuple(tr.shape[1:]), meta)

    return load_set


# name -> (description, loader(seed, dtype, root))
_REGISTRY: dict[str, tuple[str, Callable[..., Splits]]] = {}
for _name, (_, _, _desc) in toys.TOYS.items():
    _REGISTRY[_name] = (_desc, lambda seed, dtype, root, _n=_name: _load_toy(_n, seed, dtype))
_REGISTRY["digits"] = (
    "8x8 handwritten digits from scikit-learn, 1797 images [1, 8, 8], 17 levels",
    lambda seed, dtype, root: _load_digits(seed, dtype),
)
for _loader, _desc, _kw in [
    ("load_iris", "iris flowers from scikit-learn, 150 x 4", {}),
    ("load_wine", "wine chemistry from scikit-learn, 178 x 13", {}),
    ("load_breast_cancer", "breast cancer cell features from scikit-learn, 569 x 30", {}),
    ("load_diabetes", "diabetes patient features from scikit-learn (unscaled), 442 x 10", {"scaled": False}),
]:
    _fn = _sklearn_tabular(_loader, **_kw)
    _REGISTRY[_loader.removeprefix("load_")] = (_desc, lambda seed, dtype, root, _f=_fn: _f(seed, dtype))
for _name, _desc in uci.DESCRIPTIONS.items():
    _REGISTRY[_name] = (_desc, lambda seed, dtype, root, _n=_name: _uci(_n)(seed, dtype, root))


def available() -> dict[str, str]:
    """Registered dataset names -> one-line descriptions. Any path to a .npy/.csv file or an
    image folder is accepted by `load` as well."""
    return {name: desc for name, (desc, _) in _REGISTRY.items()}


def _looks_like_path(name: str) -> bool:
    return (
        os.sep in name
        or "/" in name
        or name.lower().endswith(files.FILE_SUFFIXES)
        or os.path.exists(name)
    )


def load(name: str, *, root: str | os.PathLike | None = None, seed: int = 0, dtype=torch.float32) -> Splits:
    """Load dataset `name` (a registered name, case-insensitive, or a path) as `Splits`.

    dtype: of the returned tensors; None picks float64 for tabular data (full precision for
    standardising: what `nflux train` loads), float32 for images and the 2-D toys.

    root: the directory holding the UCI benchmark folders (power/, gas/, hepmass/,
    miniboone/, BSDS300/); ignored by the other sets. seed: fixes the toy draws and the
    shuffle before splitting. Raises `DatasetError` (a ValueError) with a clear message for
    an unknown name, `DatasetNotFoundError` naming the expected path for absent files, and
    `MissingDependencyError` naming the package for a missing optional dependency.
    """
    if not isinstance(name, (str, os.PathLike)):
        raise DatasetError(f"dataset name must be a string or path, got {type(name).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DatasetError(f"seed must be a non-negative int, got {seed!r}")
    name = os.fspath(name)
    key = name.strip().lower()
    if key in _REGISTRY:
        return _REGISTRY[key][1](seed, dtype, root)
    if _looks_like_path(name):
        x, kind, meta = files.load_path(name)
        return _finish(os.path.basename(os.path.normpath(name)), x, kind, seed, dtype, meta)
    close = difflib.get_close_matches(key, list(_REGISTRY), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise DatasetError(
        f"unknown dataset {name!r}.{hint} Known: {', '.join(_REGISTRY)}; "
        "or give a path to a .npy/.csv file or an image folder."
    )
