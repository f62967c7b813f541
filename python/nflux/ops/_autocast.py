"""torch.autocast's policy for nflux ops, applied at their Python entry points.

Flow transforms compute in float32 (float64 when an input is): a conditioner's bfloat16 output
meets a float32 x, and the transform, its log-determinant and its inverse stay exact to float32.
masked_linear, a conditioner layer, computes in the autocast dtype like torch's linear.
csrc/autocast.cpp applies the same policy to the native ops (for direct torch.ops calls, and
so the ATen products inside them are not cast again). Casting here as well lets the argument
checks see the dtypes the op computes in, and the pure-torch fallback run under the same policy.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def enabled(tensor: torch.Tensor) -> bool:
    """Whether autocast is on for `tensor`'s device (never for devices without autocast: meta)."""
    device = tensor.device.type
    return torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)


def _floating(args: tuple) -> list[torch.Tensor]:
    found = []
    for a in args:
        for t in a if isinstance(a, (list, tuple)) else (a,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                found.append(t)
    return found


def _cast(args: tuple, dtype: torch.dtype, eligible) -> tuple:
    def one(t: Any) -> Any:
        return t.to(dtype) if isinstance(t, torch.Tensor) and eligible(t) else t

    return tuple(type(a)(one(t) for t in a) if isinstance(a, (list, tuple)) else one(a) for a in args)


def to_float32_or_wider(*args: Any) -> tuple:
    """Casts every floating tensor in `args` (lists included) to float32, or to float64 if any is."""
    dtype = torch.float64 if any_float64(*args) else torch.float32
    return _cast(args, dtype, lambda t: t.is_floating_point() and t.dtype != dtype)


HALF_TYPES = (torch.float16, torch.bfloat16)


def widen_halves(*args: Any) -> tuple[tuple, torch.dtype | None]:
    """For a flow op's pure-torch fallback: `args` with their float16 / bfloat16 tensors in
    float32, as the native kernels compute them (the reference run in bfloat16 merges spline
    knots: NaN logabsdets), and the dtype to hand the outputs back in (None: none was cast)."""
    floats = _floating(args)
    if not any(t.dtype in HALF_TYPES for t in floats):
        return args, None
    return _cast(args, torch.float32, lambda t: t.dtype in HALF_TYPES), floats[0].dtype


def narrowed(outputs: tuple, dtype: torch.dtype | None) -> tuple:
    """The floating `outputs` of a fallback in `dtype`, the inputs' own (see `widen_halves`)."""
    if dtype is None:
        return outputs
    return tuple(o.to(dtype) if isinstance(o, torch.Tensor) and o.is_floating_point() else o for o in outputs)


def any_float64(*args: Any) -> bool:
    return any(t.dtype == torch.float64 for t in _floating(args))


def fallback_context(tensor: torch.Tensor):
    """Autocast off for the pure-torch fallback, whose inputs are already cast: its products must
    not be cast again."""
    if enabled(tensor):
        return torch.autocast(tensor.device.type, enabled=False)
    return contextlib.nullcontext()
