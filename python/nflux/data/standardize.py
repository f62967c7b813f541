"""Per-feature affine standardisation of tabular data, fitted on the training split.

`z = (x - mean) / std` feature-wise, with `std` floored at `min_std` so a (near-)constant
feature does not divide by zero. A flow is trained on `z`; its samples are mapped back with
`inverse`, and a log-density in data units is exact:

    log p_x(x) = log p_z(z) + logabsdet        (logabsdet = -sum(log std), a constant)

The fitted statistics are kept as float64 and round-trip exactly through `to_json()` /
`from_json()` (Python floats are written with full precision), so a run's config can record
them and `sample` can return data units later.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["Standardizer"]


class Standardizer:
    """Feature-wise `z = (x - mean) / std`; see the module docstring."""

    def __init__(self, mean: Tensor, std: Tensor, min_std: float = 1e-6):
        mean = torch.as_tensor(mean, dtype=torch.float64).detach().cpu()
        std = torch.as_tensor(std, dtype=torch.float64).detach().cpu()
        if mean.shape != std.shape:
            raise ValueError(f"mean and std must have the same shape, got {tuple(mean.shape)} and {tuple(std.shape)}")
        if not (math.isfinite(min_std) and min_std > 0):
            raise ValueError(f"min_std must be a positive finite float, got {min_std!r}")
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise ValueError("mean and std must be finite")
        self.mean = mean
        self.std = std.clamp_min(min_std)
        self.min_std = float(min_std)

    @classmethod
    def fit(cls, x: Tensor, min_std: float = 1e-6) -> Standardizer:
        """Mean and (population, ddof=0) std over dim 0 of `x` ([N, *feature_shape]), N >= 1."""
        if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] < 1:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor of shape [N >= 1, features...], got {shape}")
        x64 = x.detach().to(torch.float64)
        if not torch.isfinite(x64).all():
            raise ValueError("cannot fit a Standardizer: x contains NaN or inf")
        return cls(x64.mean(0), x64.std(0, correction=0), min_std)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.mean.shape)

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if tuple(x.shape[1:]) != self.feature_shape:
            raise ValueError(
                f"x must have shape [N, {', '.join(map(str, self.feature_shape))}], got {tuple(x.shape)}"
            )
        return self.mean.to(x.device, x.dtype), self.std.to(x.device, x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Data units -> standardised units."""
        mean, std = self._stats(x)
        return (x - mean) / std

    def inverse(self, z: Tensor) -> Tensor:
        """Standardised units -> data units."""
        mean, std = self._stats(z)
        return z * std + mean

    __call__ = forward

    def logabsdet(self) -> float:
        """log|det dz/dx| of `forward` for one example: -sum(log std). Add it to a log-density
        of z to get the log-density of x (the inverse map has the negated value)."""
        return -float(torch.log(self.std).sum())

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (nested lists of floats) that `from_json` restores exactly."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "min_std": self.min_std}

    @classmethod
    def from_json(cls, obj: dict[str, Any] | str) -> Standardizer:
        """Inverse of `to_json`; also accepts the dict serialised as a JSON string."""
        if isinstance(obj, str):
            obj = json.loads(obj)
        try:
            mean = torch.tensor(obj["mean"], dtype=torch.float64)
            std = torch.tensor(obj["std"], dtype=torch.float64)
            min_std = float(obj.get("min_std", 1e-6))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a Standardizer record (expected keys mean, std): {e}") from None
        if (std < min_std).any():
            raise ValueError("not a Standardizer record: std below min_std")
        return cls(mean, std, min_std)

    def __repr__(self) -> str:
        return f"Standardizer(features={self.feature_shape}, min_std={self.min_std})"
