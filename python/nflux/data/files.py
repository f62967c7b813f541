"""Users' own data: a `.npy` or `.csv` file, or a folder of PNG/JPEG images.

`load_path(path) -> (array, kind, meta)`, with `array` of shape [N, ...]:

- `.npy` (loaded with `allow_pickle=False`, so no code runs): numeric, [N] or [N, D] is
  tabular ([N] becomes [N, 1]); [N, H, W] is a one-channel image set; [N, C, H, W] is an
  image set, and [N, H, W, C] with C in (1, 3, 4) and the second axis not in (1, 3, 4) is
  taken as channels-last and transposed. uint8 images record `levels` = 256.
- `.csv`: numbers separated by commas (or by whitespace when the first line has no comma),
  one example per row; a first row that does not parse as numbers is a header and skipped.
  Always tabular.
- a directory: every .png/.jpg/.jpeg under it (recursively, sorted by path; class
  sub-folders are allowed and their labels ignored) is read with Pillow, as one-channel "L"
  if every image is greyscale, else "RGB" (alpha dropped). All must have the same size.
  Values are the integers 0..255 as floats, `levels` = 256. Pillow is optional: without it
  a `MissingDependencyError` says `pip install pillow`.

Values must be finite; anything else is a `DatasetError` naming the file and the problem.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from nflux.data.errors import DatasetError, DatasetNotFoundError, MissingDependencyError

__all__ = ["FILE_SUFFIXES", "IMAGE_SUFFIXES", "load_path"]

FILE_SUFFIXES = (".npy", ".csv")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_CHANNELS = (1, 3, 4)


def load_path(path: str | os.PathLike) -> tuple[np.ndarray, str, dict[str, Any]]:
    """Read a user's data file or image folder; see the module docstring."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetNotFoundError(f"data file or folder not found: {p}")
    if p.is_dir():
        x, meta = _load_image_folder(p)
        return x, "image", meta
    suffix = p.suffix.lower()
    if suffix == ".npy":
        x, kind, meta = _load_npy(p)
    elif suffix == ".csv":
        x, kind, meta = _load_csv(p), "tabular", {}
    else:
        raise DatasetError(f"{p}: unsupported file type {suffix!r}; expected .npy, .csv or an image folder")
    _check_finite(x, p)
    return x, kind, {"source": str(p), **meta}


def _check_finite(x: np.ndarray, p: Path) -> None:
    if x.shape[0] == 0:
        raise DatasetError(f"{p}: no examples in the file")
    bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
    if bad:
        raise DatasetError(f"{p}: {bad} values are NaN or infinite; clean the data first")


def _load_npy(p: Path) -> tuple[np.ndarray, str, dict[str, Any]]:
    try:
        x = np.load(p, allow_pickle=False)
    except ValueError as e:  # object arrays (need pickle), or a corrupt header
        raise DatasetError(f"{p}: not a numeric .npy array ({e})") from None
    except OSError as e:
        raise DatasetError(f"{p}: cannot read ({e})") from None
    if not isinstance(x, np.ndarray) or not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise DatasetError(f"{p}: expected a numeric array, got dtype {getattr(x, 'dtype', type(x))}")
    meta: dict[str, Any] = {}
    if x.ndim == 1:
        return x[:, None].astype(np.float64), "tabular", meta
    if x.ndim == 2:
        return x.astype(np.float64), "tabular", meta
    if x.dtype == np.uint8:
        meta["levels"] = 256
    if x.ndim == 3:
        return x[:, None].astype(np.float64), "image", meta
    if x.ndim == 4:
        if x.shape[-1] in _CHANNELS and x.shape[1] not in _CHANNELS:
            x = x.transpose(0, 3, 1, 2)
            meta["transposed_from"] = "NHWC"
        return x.astype(np.float64), "image", meta
    raise DatasetError(f"{p}: expected an array of 1 to 4 dimensions, got shape {x.shape}")


def _load_csv(p: Path) -> np.ndarray:
    with open(p, encoding="utf-8-sig") as f:
        first = ""
        for first in f:
            if first.strip():
                break
    if not first.strip():
        raise DatasetError(f"{p}: the file is empty")
    delimiter = "," if "," in first else None
    try:
        [float(v) for v in first.strip().split(delimiter)]
        header = 0
    except ValueError:
        header = 1
    try:
        x = np.loadtxt(p, delimiter=delimiter, skiprows=header, ndmin=2, dtype=np.float64, encoding="utf-8-sig")
    except ValueError as e:
        raise DatasetError(f"{p}: cannot parse as numbers ({e})") from None
    return x


def _load_image_folder(root: Path) -> tuple[np.ndarray, dict[str, Any]]:
    paths = sorted(q for q in root.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DatasetNotFoundError(f"{root}: no .png/.jpg/.jpeg images in this folder")
    try:
        from PIL import Image
    except ImportError:
        raise MissingDependencyError(
            f"{root}: reading image folders needs Pillow, which is not installed: pip install pillow"
        ) from None
    images = []
    for q in paths:
        try:
            with Image.open(q) as im:
                im.load()
                images.append(im.copy())
        except OSError as e:
            raise DatasetError(f"{q}: cannot read as an image ({e})") from None
    grey = all(im.mode in ("1", "L", "I", "I;16", "F") for im in images)
    mode = "L" if grey else "RGB"
    size = images[0].size
    arrays = []
    for q, im in zip(paths, images):
        if im.size != size:
            raise DatasetError(
                f"{q}: size {im.size[0]}x{im.size[1]} differs from {size[0]}x{size[1]} of {paths[0]}; "
                "all images in the folder must have the same size"
            )
        a = np.asarray(im.convert(mode), dtype=np.uint8)
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    x = np.stack(arrays).astype(np.float64)
    return x, {"source": str(root), "levels": 256, "mode": mode, "files": len(paths)}
