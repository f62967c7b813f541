"""Transform base class, composition and inversion.

A transform is an `nn.Module` with `forward(x, context=None) -> (y, logabsdet)` and
`inverse(y, context=None) -> (x, logabsdet)`; inputs are `[B, D]`, `logabsdet` is `[B]`
(log|det dy/dx| forward, log|det dx/dy| inverse). In a flow, `forward` maps data to the
base space (the density direction) and `inverse` generates samples.
"""

from __future__ import annotations

import torch
from torch import nn


def check_features(transform: nn.Module, x: torch.Tensor, features: int) -> None:
    """A ValueError naming the transform when x is not `[B, features]` (an index_select would
    silently drop extra features, a GEMM would name its own weights)."""
    if x.dim() != 2 or x.shape[1] != features:
        raise ValueError(f"nflux: {type(transform).__name__} expects inputs [B, {features}], got {list(x.shape)}")


class Transform(nn.Module):
    """Base class of bijections on `[B, D]`. Subclasses implement `forward` and `inverse`."""

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None):  # pragma: no cover
        raise NotImplementedError

    def inverse(self, y: torch.Tensor, context: torch.Tensor | None = None):  # pragma: no cover
        raise NotImplementedError


class TwoWayTransform(Transform):
    """A transform whose two directions are one computation: subclasses implement
    `_run(x, context, inverse)`."""

    def _run(self, x, context, inverse: bool):  # pragma: no cover
        raise NotImplementedError

    def forward(self, x, context=None):
        return self._run(x, context, False)

    def inverse(self, y, context=None):
        return self._run(y, context, True)


class Compose(Transform):
    """T_n o ... o T_1 for `Compose(T_1, ..., T_n)`: forward runs T_1 first, inverse T_n first;
    log-determinants add. The same context reaches every member."""

    def __init__(self, *transforms: nn.Module):
        super().__init__()
        if len(transforms) == 1 and isinstance(transforms[0], (list, tuple)):
            transforms = tuple(transforms[0])
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x, context=None):
        total = x.new_zeros(x.shape[0])
        for t in self.transforms:
            x, lad = t(x, context)
            total = total + lad
        return x, total

    def inverse(self, y, context=None):
        total = y.new_zeros(y.shape[0])
        for t in reversed(self.transforms):
            y, lad = t.inverse(y, context)
            total = total + lad
        return y, total

    def __len__(self) -> int:
        return len(self.transforms)

    def __getitem__(self, i):
        return self.transforms[i]


class Inverse(Transform):
    """The inverse bijection: `Inverse(T).forward` is `T.inverse` and vice versa.

    `Inverse(MaskedAffineAutoregressive(...))` is an IAF layer: its fast direction (one MADE
    pass) becomes the sampling direction.
    """

    def __init__(self, transform: nn.Module):
        super().__init__()
        self.transform = transform

    def forward(self, x, context=None):
        return self.transform.inverse(x, context)

    def inverse(self, y, context=None):
        return self.transform(y, context)
