"""Image preprocessing with exact log-determinants, and bits per dimension.

Units. Discrete images hold integer levels 0..L-1 (`levels` = L, e.g. 17 for digits, 256 for
8-bit images). `Dequantize` maps them to continuous y = (x + u) / L in [0, 1)^D with
u ~ U[0, 1)^D; an image flow's `log_prob(y)` is a density on [0, 1)^D. The continuous density
of v = x + u on [0, L)^D is p(y) / L^D, and E_u log p_v(x + u) <= log P(x), so

    bits/dim = -(log p(y) - D log L) / (D log 2)

is an upper bound on the discrete model's bits/dim (`bits_per_dim`). Transforms inside the
flow (`Logit`, `Shift`) carry their Jacobians in the flow's log_prob.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from nflux.transforms.base import Transform


def bits_per_dim(log_prob: torch.Tensor, shape: Sequence[int] | int, levels: int) -> torch.Tensor:
    """Bits per dimension of discrete images from `log_prob`, the log density (nats) of their
    dequantised versions on [0, 1)^D; `shape` is the image shape (or D); adds back the
    -D log(levels) of the 1 / levels scaling (see the module docstring)."""
    D = shape if isinstance(shape, int) else math.prod(shape)
    return -(log_prob - D * math.log(levels)) / (D * math.log(2.0))


def dequantized(x: torch.Tensor, u: torch.Tensor, levels: int) -> torch.Tensor:
    """y = (x + u) / levels, kept inside (0, 1), where RealNVP's logit (alpha = 0 allowed) is
    finite: in float arithmetic x + u rounds up to `levels` for x = L - 1 and u within an ulp of
    1 (about one 8-bit float32 pixel in 130,000), and u is exactly 0 once in 2^24 draws."""
    y = (x + u) / levels
    finfo = torch.finfo(y.dtype)
    return y.clamp(min=finfo.tiny, max=1.0 - finfo.eps / 2)


def reduce_bits(x: torch.Tensor, levels: int, bits: int) -> torch.Tensor:
    """n-bit quantisation (Glow's reduced-bit images): integer levels 0..levels-1, with levels a
    power of two, to 0..2**bits - 1 by dropping the low bits: floor(x / (levels / 2**bits))."""
    if levels & (levels - 1) or 2**bits > levels:
        raise ValueError(f"nflux: reduce_bits needs levels a power of two >= 2**bits, got {levels}, bits={bits}")
    return torch.floor(x / (levels // 2**bits))


def quantize(y: torch.Tensor, levels: int) -> torch.Tensor:
    """The inverse of dequantisation: [0, 1) images -> integer levels floor(y * L), clamped to
    0..L-1 (in y's dtype and device)."""
    return torch.clamp(torch.floor(y * levels), 0, levels - 1)


class _Dequantizer(nn.Module):
    """What `Dequantize` and `VariationalDequantize` share: the levels L and `quantize`, the
    inverse of their y = (x + u) / L (they differ only in how u is drawn)."""

    def __init__(self, levels: int):
        super().__init__()
        if isinstance(levels, bool) or not (levels == int(levels) >= 2):
            raise ValueError(f"nflux: levels must be an int >= 2, got {levels!r}")
        self.levels = int(levels)

    def quantize(self, y: torch.Tensor) -> torch.Tensor:
        return quantize(y, self.levels)

    @staticmethod
    def _floating(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Integer-typed images (uint8, int64) in `dtype`: the noise needs a float dtype."""
        return x if x.is_floating_point() else x.to(dtype)


class Dequantize(_Dequantizer):
    """Uniform dequantisation: integer images x (levels 0..L-1) -> (x + u) / L in [0, 1).

    u ~ U[0, 1)^D when `noise` is true (the default, in training and evaluation alike, as
    bits/dim are reported), else u = 1/2 (the bin centres; deterministic). `quantize` is the
    inverse: floor(y * L), clamped to 0..L-1.
    """

    def __init__(self, levels: int, *, noise: bool = True):
        super().__init__(levels)
        self.noise = noise

    def forward(self, x: torch.Tensor, noise: bool | None = None) -> torch.Tensor:
        noise = self.noise if noise is None else noise
        x = self._floating(x, torch.get_default_dtype())
        u = torch.rand_like(x) if noise else torch.full_like(x, 0.5)
        return dequantized(x, u, self.levels)

    def sample(self, x: torch.Tensor, noise: bool | None = None):
        """(y, log q(u | x)): the dequantised images and the log density of their noise,
        0 for uniform noise (the interface of `VariationalDequantize`)."""
        y = self(x, noise)
        return y, y.new_zeros(x.shape[:-3])

    def extra_repr(self) -> str:
        return f"levels={self.levels}, noise={self.noise}"


class Logit(Transform):
    """RealNVP's logit preprocessing: y = logit(alpha + (1 - 2 alpha) x) for x in [0, 1]
    (alpha keeps the logit finite at the bounds). With s = alpha + (1 - 2 alpha) x,

        log|dy/dx| = log(1 - 2 alpha) - log(s) - log(1 - s), summed over every non-batch dim.

    Inverse: x = (sigmoid(y) - alpha) / (1 - 2 alpha).
    """

    def __init__(self, alpha: float = 0.05):
        super().__init__()
        if not 0 <= alpha < 0.5:
            raise ValueError(f"nflux: Logit alpha must be in [0, 0.5), got {alpha}")
        self.alpha = float(alpha)

    def forward(self, x, context=None):
        a = self.alpha
        s = a + (1 - 2 * a) * x
        y = torch.log(s) - torch.log1p(-s)
        # log s + log(1 - s) = -(softplus(-y) + softplus(y)): stable for s near 0 or 1.
        lad = math.log(1 - 2 * a) + nn.functional.softplus(-y) + nn.functional.softplus(y)
        return y, lad.flatten(1).sum(1)

    def inverse(self, y, context=None):
        a = self.alpha
        x = (torch.sigmoid(y) - a) / (1 - 2 * a)
        lad = -math.log(1 - 2 * a) - nn.functional.softplus(-y) - nn.functional.softplus(y)
        return x, lad.flatten(1).sum(1)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class Shift(Transform):
    """y = x + shift (a constant; Glow's x - 1/2 centring). logabsdet 0."""

    def __init__(self, shift: float = -0.5):
        super().__init__()
        self.shift = float(shift)

    def forward(self, x, context=None):
        return x + self.shift, x.new_zeros(x.shape[0])

    def inverse(self, y, context=None):
        return y - self.shift, y.new_zeros(y.shape[0])

    def extra_repr(self) -> str:
        return f"shift={self.shift}"
