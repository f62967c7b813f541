"""Loads the compiled extension (which registers the torch.ops.nflux operators) once.

`NFLUX_DISABLE_EXTENSION=1` skips it, so the pure-torch reference serves every op; that is for
debugging and for comparing against the reference, never a silent default: CI asserts the
extension loaded.
"""

from __future__ import annotations

import os
import warnings

import torch

_module = None
load_error: str | None = None

if os.environ.get("NFLUX_DISABLE_EXTENSION", "") not in ("", "0"):
    load_error = "disabled by NFLUX_DISABLE_EXTENSION"
else:
    try:
        from nflux import _C as _module  # noqa: F401  (importing registers the operators)
    except ImportError as error:  # a broken or absent build: fall back, loudly, once
        load_error = f"{type(error).__name__}: {error}"

loaded = _module is not None
cpu_kernels = bool(loaded and _module.cpu_kernels)
cuda_kernels = bool(loaded and _module.cuda_kernels)
version = getattr(_module, "__version__", None)

_warned = False


def has_kernel(device: torch.device) -> bool:
    """Whether nflux has native kernels for tensors on `device`."""
    if device.type == "cpu":
        return cpu_kernels
    if device.type == "cuda":
        return cuda_kernels
    return False


# Dtypes the native kernels take, by device type (CPU: float32/float64; CUDA adds half types).
NATIVE_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}


def native(tensor: torch.Tensor, dtypes: dict | None = None) -> bool:
    """Whether an op on `tensor` runs a native kernel (else it falls back to the reference)."""
    allowed = (dtypes or NATIVE_DTYPES).get(tensor.device.type, ())
    return has_kernel(tensor.device) and tensor.dtype in allowed


def warn_fallback(op: str, tensor: torch.Tensor) -> None:
    """Warns once per process that an op on `tensor` runs on the pure-torch reference, and why."""
    global _warned
    if _warned:
        return
    _warned = True
    if not loaded:
        reason = load_error
    elif not has_kernel(tensor.device):
        reason = f"no native kernel for device '{tensor.device.type}'"
    else:
        reason = f"no native kernel for dtype {tensor.dtype} on '{tensor.device.type}'"
    warnings.warn(
        f"nflux: {op} and other ops fall back to the pure-torch reference ({reason}); "
        "they are correct but slower.",
        RuntimeWarning,
        stacklevel=3,
    )
