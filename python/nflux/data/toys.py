"""The seven 2-D toy densities, as samplers in plain torch.

Each toy is `sample(n, generator=None, dtype=torch.float32) -> Tensor[n, 2]`, deterministic
given a `torch.Generator` (all randomness is drawn from it, on the CPU). The definitions and
scales are those of the FFJORD / Neural Spline Flows toy sets (`inf_train_gen`), so that
numbers and pictures compare with the papers: every toy lies roughly within [-4, 4]^2 and has
per-coordinate std between about 1 and 2.5. Two differences, both distribution-preserving:
class/arm labels are drawn i.i.d. instead of in equal blocks (so any `n` works, and a sample
is i.i.d.), and moons/circles draw their angles uniformly instead of on a linspace.

Where the density has a closed form it is exposed as `log_prob(x) -> Tensor[n]`
(`eight_gaussians`, `checkerboard`), for quality tests of a fitted flow.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = [
    "TOYS",
    "checkerboard",
    "checkerboard_log_prob",
    "circles",
    "eight_gaussians",
    "eight_gaussians_log_prob",
    "moons",
    "pinwheel",
    "spirals",
    "swiss_roll",
]


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    return n


def _u(shape, g, dtype) -> Tensor:
    return torch.rand(shape, generator=g, dtype=dtype)


def _z(shape, g, dtype) -> Tensor:
    return torch.randn(shape, generator=g, dtype=dtype)


def moons(n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> Tensor:
    """Two interleaved half circles (sklearn `make_moons`, noise 0.1), scaled by 2, shifted."""
    n = _check_n(n)
    t = math.pi * _u(n, generator, dtype)
    upper = _u(n, generator, dtype) < 0.5
    x = torch.where(upper, torch.cos(t), 1.0 - torch.cos(t))
    y = torch.where(upper, torch.sin(t), 0.5 - torch.sin(t))
    pts = torch.stack([x, y], dim=1) + 0.1 * _z((n, 2), generator, dtype)
    return pts * 2.0 + torch.tensor([-1.0, -0.2], dtype=dtype)


def circles(n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> Tensor:
    """Two concentric circles of radii 3 and 1.5 (sklearn `make_circles`, factor 0.5,
    noise 0.08, scaled by 3)."""
    n = _check_n(n)
    t = 2.0 * math.pi * _u(n, generator, dtype)
    r = torch.where(_u(n, generator, dtype) < 0.5, 1.0, 0.5).to(dtype)
    pts = r[:, None] * torch.stack([torch.cos(t), torch.sin(t)], dim=1)
    return 3.0 * (pts + 0.08 * _z((n, 2), generator, dtype))


# Eight Gaussians: centres on the circle of radius 4/1.414, std 0.5/1.414 (FFJORD scaling).
_EG_SCALE = 1.414
_EG_RADIUS = 4.0 / _EG_SCALE
_EG_STD = 0.5 / _EG_SCALE


def _eight_centres(dtype) -> Tensor:
    angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
    return (_EG_RADIUS * torch.stack([torch.cos(angles), torch.sin(angles)], 1)).to(dtype)


def eight_gaussians(n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> Tensor:
    """Equal mixture of 8 isotropic Gaussians (std ~0.354) centred on a circle of radius ~2.83."""
    n = _check_n(n)
    idx = torch.randint(0, 8, (n,), generator=generator)
    return _eight_centres(dtype)[idx] + _EG_STD * _z((n, 2), generator, dtype)


def eight_gaussians_log_prob(x: Tensor) -> Tensor:
    """Exact log-density of `eight_gaussians` at `x` ([n, 2]), in x's dtype."""
    _check_points(x)
    c = _eight_centres(x.dtype).to(x.device)
    sq = ((x[:, None, :] - c[None]) ** 2).sum(-1)  # [n, 8]
    log_comp = -sq / (2 * _EG_STD**2) - math.log(2 * math.pi * _EG_STD**2)
    return torch.logsumexp(log_comp, dim=1) - math.log(8.0)


def checkerboard(n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> Tensor:
    """Uniform on the 8 dark squares (side 2) of a 4x4 checkerboard covering [-4, 4]^2."""
    n = _check_n(n)
    x1 = _u(n, generator, dtype) * 4 - 2
    x2 = _u(n, generator, dtype) - 2 * torch.randint(0, 2, (n,), generator=generator).to(dtype)
    x2 = x2 + torch.remainder(torch.floor(x1), 2)
    return torch.stack([x1, x2], dim=1) * 2


def checkerboard_log_prob(x: Tensor) -> Tensor:
    """Exact log-density of `checkerboard`: log(1/32) on the dark squares, -inf elsewhere."""
    _check_points(x)
    u = x / 2  # back to the unit-square board on [-2, 2]^2
    inside = (u >= -2).all(1) & (u < 2).all(1)
    dark = torch.remainder(torch.floor(u[:, 0]) + torch.floor(u[:, 1]), 2) == 0
    full = torch.full(x.shape[:1], -math.log(32.0), dtype=x.dtype, device=x.device)
    return torch.where(inside & dark, full, torch.full_like(full, -math.inf))


def pinwheel(n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> Tensor:
    """Five curved arms (radial std 0.3, tangential std 0.1, rate 0.25), scaled by 2."""
    n = _check_n(n)
    labels = torch.randint(0, 5, (n,), generator=generator)
    feats = _z((n, 2), generator, dtype) * torch.tensor([0.3, 0.1], dtype=dtype)
    feats[:, 0] += 1.0
    angles = labels.to(dtype) * (2 * math.pi / 5) + 0.25 * torch.exp(feats[:, 0])
    c, s = torch.cos(angles), torch.sin(angles)
    # Row vector times the rotation [[c, -s], [s, c]], as in the reference einsum.
    x = feats[:, 0] * c + feats[:, 1] * s
    y = -feats[:, 0] * s + feats[:, 1] * c
    return 2 * torch.stack([x, y], dim=1)


def spirals(n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> Tensor:
    """Two interleaved spirals of 1.5 turns (the FFJORD "2spirals"), divided by 3."""
    n = _check_n(n)
    t = torch.sqrt(_u(n, generator, dtype)) * (540 * 2 * math.pi / 360)
    dx = -torch.cos(t) * t + 0.5 * _u(n, generator, dtype)
    dy = torch.sin(t) * t + 0.5 * _u(n, generator, dtype)
    sign = torch.where(_u(n, generator, dtype) < 0.5, 1.0, -1.0).to(dtype)
    pts = sign[:, None] * torch.stack([dx, dy], dim=1) / 3
    return pts + 0.1 * _z((n, 2), generator, dtype)


def swiss_roll(n: int, generator: torch.Generator | None = None, dtype=torch.float32) -> Tensor:
    """The (x, z) plane of sklearn's `make_swiss_roll` (noise 1.0), divided by 5."""
    n = _check_n(n)
    t = 1.5 * math.pi * (1 + 2 * _u(n, generator, dtype))
    pts = torch.stack([t * torch.cos(t), t * torch.sin(t)], dim=1)
    return (pts + _z((n, 2), generator, dtype)) / 5


def _check_points(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor of shape [n, 2], got {shape}")


Sampler = Callable[..., Tensor]

#: name -> (sampler, log_prob or None, one-line description)
TOYS: dict[str, tuple[Sampler, Callable[[Tensor], Tensor] | None, str]] = {
    "moons": (moons, None, "2-D two moons (two interleaved half circles)"),
    "circles": (circles, None, "2-D two concentric noisy circles"),
    "eight_gaussians": (eight_gaussians, eight_gaussians_log_prob, "2-D mixture of 8 Gaussians on a circle"),
    "checkerboard": (checkerboard, checkerboard_log_prob, "2-D uniform on the dark squares of a 4x4 board"),
    "pinwheel": (pinwheel, None, "2-D pinwheel with 5 curved arms"),
    "spirals": (spirals, None, "2-D two interleaved spirals"),
    "swiss_roll": (swiss_roll, None, "2-D swiss roll (x, z plane)"),
}
