"""Users' own data: a `.npy` or `.csv` file, or a folder of PNG/JPEG images.

`load_path(path) -> (array, kind, meta)`, with `array` of shape [N, ...]:

- `.npy` (loaded with `allow_pickle=False`, so no code runs): numeric, [N] or [N, D] is
  tabular ([N] becomes [N, 1]); [N, H, W] is a one-channel image set; [N, C, H, W] is an
  image set, and [N, H, W, C] with C in (1, 3, 4) and the second axis not in (1, 3, 4) is
  taken as channels-last and transposed. Images record their intensity `levels` from the
  dtype: uint8 256, uint16 65536, bool 2, other integer arrays 256 when every value is in
  0..255. Float images get no `levels` (training needs them: save images as integers).
  Complex arrays are refused (the imaginary part would be lost).
- `.csv`: numbers separated by commas (or by whitespace when the first line has no comma),
  one example per row; blank lines are ignored, and a first non-blank row that does not
  parse as numbers is a header and skipped. Always tabular.
- a directory: every .png/.jpg/.jpeg under it (recursively, sorted by path; class
  sub-folders are allowed and their labels ignored) is read with Pillow. All must have the
  same size. 8-bit images: one channel if every image is greyscale ("1", "L", or "LA" with
  its alpha dropped), else three ("RGB", alpha dropped); values 0..255, `levels` = 256.
  16-bit greyscale images (Pillow modes "I;16*", and "I"/"F" holding the integers
  0..65535) keep their bit depth: one channel, values 0..65535, `levels` = 65536 (reduce
  them with `nflux.transforms.preprocess.reduce_bits` if you want fewer); a folder cannot
  mix them with 8-bit images. Pillow reads 16-bit colour PNGs as 8-bit RGB. Values are
  integers stored as floats. Pillow is optional: without it a `MissingDependencyError`
  says `pip install pillow`.

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
_GREY_MODES = ("1", "L", "LA", "La")  # 8-bit greyscale (alpha dropped)


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
    if np.issubdtype(x.dtype, np.complexfloating):
        raise DatasetError(f"{p}: complex arrays (dtype {x.dtype}) are not supported; "
                           "save the real and imaginary parts as separate real columns")
    meta: dict[str, Any] = {}
    if x.ndim == 1:
        return x[:, None].astype(np.float64), "tabular", meta
    if x.ndim == 2:
        return x.astype(np.float64), "tabular", meta
    levels = _npy_levels(x)
    if levels is not None:
        meta["levels"] = levels
    elif np.issubdtype(x.dtype, np.integer) and x.size:  # integers, but not levels 0..255
        meta["integer_range"] = [int(x.min()), int(x.max())]
    if x.ndim == 3:
        return x[:, None].astype(np.float64), "image", meta
    if x.ndim == 4:
        if x.shape[-1] in _CHANNELS and x.shape[1] not in _CHANNELS:
            x = x.transpose(0, 3, 1, 2)
            meta["transposed_from"] = "NHWC"
        return x.astype(np.float64), "image", meta
    raise DatasetError(f"{p}: expected an array of 1 to 4 dimensions, got shape {x.shape}")


def _npy_levels(x: np.ndarray) -> int | None:
    """Intensity levels of integer images, from the dtype (see the module docstring)."""
    if x.dtype == np.bool_:
        return 2
    if x.dtype == np.uint8:
        return 256
    if x.dtype == np.uint16:
        return 65536
    if np.issubdtype(x.dtype, np.integer) and x.size and 0 <= x.min() and x.max() <= 255:
        return 256
    return None


def _load_csv(p: Path) -> np.ndarray:
    with open(p, encoding="utf-8-sig") as f:
        first, blank = "", 0
        for first in f:
            if first.strip():
                break
            blank += 1  # np.loadtxt's skiprows counts blank lines too
    if not first.strip():
        raise DatasetError(f"{p}: the file is empty")
    delimiter = "," if "," in first else None
    try:
        [float(v) for v in first.strip().split(delimiter)]
        skip = 0
    except ValueError:
        skip = blank + 1  # the header and the blank lines above it
    try:
        x = np.loadtxt(p, delimiter=delimiter, skiprows=skip, ndmin=2, dtype=np.float64, encoding="utf-8-sig")
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
    # Pillow's convert("L") clips 16-bit values to 255: read those images as they are.
    deep = [im.mode in ("I", "F") or im.mode.startswith("I;16") for im in images]
    if any(deep) and not all(deep):
        i, j = deep.index(True), deep.index(False)
        raise DatasetError(f"{root}: {paths[i].name} is a 16-bit greyscale image ({images[i].mode}) but "
                           f"{paths[j].name} is 8-bit ({images[j].mode}); convert the folder to one bit depth")
    if all(deep):
        mode, levels = "I;16", 65536
    else:
        mode, levels = ("L" if all(im.mode in _GREY_MODES for im in images) else "RGB"), 256
    size = images[0].size
    arrays = []
    for q, im in zip(paths, images):
        if im.size != size:
            raise DatasetError(
                f"{q}: size {im.size[0]}x{im.size[1]} differs from {size[0]}x{size[1]} of {paths[0]}; "
                "all images in the folder must have the same size"
            )
        a = np.asarray(im) if mode == "I;16" else np.asarray(im.convert(mode), dtype=np.uint8)
        if mode == "I;16" and not (np.array_equal(a, np.round(a)) and a.min() >= 0 and a.max() < levels):
            raise DatasetError(f"{q}: {im.mode} image with values outside the integers 0..65535; "
                               "nflux reads 8-bit and 16-bit images")
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    x = np.stack(arrays).astype(np.float64)
    return x, {"source": str(root), "levels": levels, "mode": mode, "files": len(paths)}
