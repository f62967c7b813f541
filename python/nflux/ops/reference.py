"""Every nflux operator in plain torch.

This is the oracle the tests compare the native kernels against, and the fallback on a device
(or dtype) with no native kernel. It is written from the papers' formulas with ordinary torch
ops, independently of the C++ header math. Branches are evaluated on clamped inputs and then
selected with torch.where, so a masked-out branch never makes a NaN value or gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nflux.ops._checks import (
    check_affine_coupling_args,
    check_lu_conv1x1_args,
    check_rq_spline_args,
)


def _spline_knots(logits: torch.Tensor, min_size: float, tail_bound: float) -> torch.Tensor:
    """K+1 knots over [-B, B] with bin sizes min + (1 - min*K) * softmax(logits)."""
    K = logits.shape[-1]
    sizes = min_size + (1 - min_size * K) * torch.softmax(logits, dim=-1)
    inner = 2 * tail_bound * torch.cumsum(sizes, dim=-1)[..., :-1] - tail_bound
    edge = torch.full_like(logits[..., :1], tail_bound)
    return torch.cat([-edge, inner, edge], dim=-1)


def rq_spline(
    inputs: torch.Tensor,
    unnormalized_widths: torch.Tensor,
    unnormalized_heights: torch.Tensor,
    unnormalized_derivatives: torch.Tensor,
    *,
    inverse: bool = False,
    tail_bound: float = 3.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rational-quadratic spline with linear tails (Durkan et al. 2019); see nflux.ops.rq_spline."""
    K = check_rq_spline_args(
        inputs,
        unnormalized_widths,
        unnormalized_heights,
        unnormalized_derivatives,
        tail_bound,
        min_bin_width,
        min_bin_height,
        min_derivative,
    )
    B = float(tail_bound)
    inside = (inputs >= -B) & (inputs <= B)
    v = torch.where(inside, inputs, torch.zeros_like(inputs))

    wknots = _spline_knots(unnormalized_widths, min_bin_width, B)
    hknots = _spline_knots(unnormalized_heights, min_bin_height, B)
    ones = torch.ones_like(unnormalized_widths[..., :1])
    derivatives = torch.cat(
        [ones, min_derivative + F.softplus(unnormalized_derivatives), ones], dim=-1
    )

    search = hknots if inverse else wknots
    b = (v.unsqueeze(-1) >= search[..., 1:K]).sum(dim=-1, keepdim=True)

    def at(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return t.gather(-1, index).squeeze(-1)

    cw, ch = at(wknots, b), at(hknots, b)
    w, h = at(wknots, b + 1) - cw, at(hknots, b + 1) - ch
    d0, d1 = at(derivatives, b), at(derivatives, b + 1)
    s = h / w

    if not inverse:
        theta = ((v - cw) / w).clamp(0, 1)
    else:
        dy = (v - ch).clamp(min=torch.zeros_like(h), max=h)
        curvature = d0 + d1 - 2 * s
        a = dy * curvature + h * (s - d0)
        bq = h * d0 - dy * curvature
        c = -s * dy
        discriminant = (bq.square() - 4 * a * c).clamp(min=0)
        theta = ((2 * c) / (-bq - discriminant.sqrt())).clamp(0, 1)

    t = theta * (1 - theta)
    denominator = s + (d0 + d1 - 2 * s) * t
    slope_numerator = s.square() * (d1 * theta.square() + 2 * s * t + d0 * (1 - theta).square())
    logabsdet = torch.log(slope_numerator) - 2 * torch.log(denominator)
    if not inverse:
        value = ch + h * (s * theta.square() + d0 * t) / denominator
    else:
        value = cw + theta * w
        logabsdet = -logabsdet

    outputs = torch.where(inside, value, inputs)
    tail_logabsdet = torch.where(torch.isnan(inputs), inputs, torch.zeros_like(inputs))
    return outputs, torch.where(inside, logabsdet, tail_logabsdet)


def affine_coupling(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale_logits: torch.Tensor | None = None,
    *,
    scale: str = "exp",
    clamp: float | None = None,
    inverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine (or additive) coupling; see nflux.ops.affine_coupling."""
    check_affine_coupling_args(x, shift, scale_logits, scale, clamp)
    rows = (x.shape[0], math.prod(x.shape[1:]))
    if scale_logits is None:
        return (x - shift if inverse else x + shift), x.new_zeros(x.shape[0])
    s = scale_logits if clamp is None else clamp * torch.tanh(scale_logits / clamp)
    log_scale = s if scale == "exp" else F.logsigmoid(s + 2)
    if inverse:
        return (x - shift) * torch.exp(-log_scale), -log_scale.reshape(rows).sum(1)
    return x * torch.exp(log_scale) + shift, log_scale.reshape(rows).sum(1)


def lu_weight(
    perm: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    log_scale: torch.Tensor,
    sign: torch.Tensor,
) -> torch.Tensor:
    """W = P (L + I)(U + diag(sign * exp(log_scale))) with P = I[perm], so (P A) = A[perm]."""
    eye = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
    unit_lower = torch.tril(lower, -1) + eye
    upper_diag = torch.triu(upper, 1) + torch.diag(sign * torch.exp(log_scale))
    return (unit_lower @ upper_diag)[perm]


def lu_conv1x1(
    x: torch.Tensor,
    perm: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    log_scale: torch.Tensor,
    sign: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    inverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Invertible 1x1 convolution / LU linear layer; see nflux.ops.lu_conv1x1."""
    check_lu_conv1x1_args(x, perm, lower, upper, log_scale, sign, bias)
    w = lu_weight(perm, lower, upper, log_scale, sign)
    pixels = 1 if x.dim() == 2 else x.shape[2] * x.shape[3]
    b = None if bias is None else (bias if x.dim() == 2 else bias[:, None, None])
    if inverse:
        z = x if b is None else x - b
        # The oracle may use a general solve; the op uses triangular solves.
        if x.dim() == 2:
            out = torch.linalg.solve(w, z.T).T
        else:
            out = torch.einsum("ij,bjhw->bihw", torch.linalg.inv(w), z)
        lad = -pixels * log_scale.sum()
    else:
        out = x @ w.T if x.dim() == 2 else torch.einsum("ij,bjhw->bihw", w, x)
        out = out if b is None else out + b
        lad = pixels * log_scale.sum()
    return out, lad.expand(x.shape[0]).clone()
