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

from nflux.ops import _autocast
from nflux.ops._checks import (
    check_affine_coupling_args,
    check_lu_conv1x1_args,
    check_made_inverse_args,
    check_masked_linear_args,
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
        root = (2 * c) / (-bq - discriminant.sqrt())
        # The right knot itself is theta = 1 (the root cancels to just under it when d0 >> s):
        # the value is set, the root's derivative kept (dx/dy there is not 0).
        theta = torch.where(dy >= h, root + (1 - root).detach(), root.clamp(0, 1))

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


def lu_factors(
    lower: torch.Tensor, upper: torch.Tensor, log_scale: torch.Tensor, sign: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L + I, U + diag(sign * exp(log_scale))): the triangular factors of `lu_weight`'s W."""
    eye = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)
    return torch.tril(lower, -1) + eye, torch.triu(upper, 1) + torch.diag(sign * torch.exp(log_scale))


def lu_weight(
    perm: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    log_scale: torch.Tensor,
    sign: torch.Tensor,
) -> torch.Tensor:
    """W = P (L + I)(U + diag(sign * exp(log_scale))) with P = I[perm], so (P A) = A[perm]."""
    unit_lower, upper_diag = lu_factors(lower, upper, log_scale, sign)
    return (unit_lower @ upper_diag)[perm]


def fold_input_log_scale(upper: torch.Tensor, log_scale: torch.Tensor, input_log_scale: torch.Tensor):
    """(upper', log_scale') with W' = W diag(exp(input_log_scale)):
    P L (U diag(e^s) + D diag(e^s)) scales U's columns and adds s to log_scale. Only U's strict
    upper triangle enters W, so only it is scaled (an inf below it must not become a NaN
    gradient through inf * 0)."""
    return torch.triu(upper, 1) * torch.exp(input_log_scale), log_scale + input_log_scale


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
    input_shift: torch.Tensor | None = None,
    input_log_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Invertible 1x1 convolution / LU linear layer; see nflux.ops.lu_conv1x1."""
    check_lu_conv1x1_args(x, perm, lower, upper, log_scale, sign, bias, input_shift, input_log_scale)
    if input_log_scale is not None:
        upper, log_scale = fold_input_log_scale(upper, log_scale, input_log_scale)
    if input_shift is not None:
        s = input_shift if x.dim() == 2 else input_shift[:, None, None]
        if inverse:
            out, lad = lu_conv1x1(x, perm, lower, upper, log_scale, sign, bias, inverse=True)
            return out - s, lad
        return lu_conv1x1(x + s, perm, lower, upper, log_scale, sign, bias)
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


def masked_linear(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor
) -> torch.Tensor:
    """y = input (weight * mask)^T + bias; see nflux.ops.masked_linear. Under autocast, torch's
    linear casts its arguments as for any linear layer."""
    check_masked_linear_args(input, weight, bias, mask, same_dtype=not _autocast.enabled(input))
    return masked_product(input, weight, bias, mask)


def masked_product(input, weight, bias, mask):
    """masked_linear's product on checked arguments (nflux.ops.masked_linear's autocast path)."""
    return F.linear(input, weight * mask, bias)


_ACTIVATIONS = {"relu": torch.relu, "elu": F.elu, "tanh": torch.tanh, "gelu": F.gelu}


def made_masks(degrees: list[int], widths: list[int], D: int) -> list[torch.Tensor]:
    """The MADE masks implied by the degrees: [D inputs, hidden units...]; widths of every layer.

    Hidden unit of degree k sees units of degree <= k; output of input i sees degree < deg(i).
    """
    sizes = [D, *widths[:-1]]
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + size)
    layer_degrees = [torch.tensor(degrees[a:b]) for a, b in zip(starts[:-1], starts[1:])]
    P = widths[-1] // D
    masks = []
    for i in range(len(widths)):
        d_in = layer_degrees[i]
        if i + 1 < len(widths):
            masks.append((layer_degrees[i + 1][:, None] >= d_in[None, :]).float())
        else:
            d_out = layer_degrees[0].repeat_interleave(P)
            masks.append((d_out[:, None] > d_in[None, :]).float())
    return masks


def made_forward(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    degrees: list[int],
    context_terms: list[torch.Tensor],
    residual: bool,
    activation: str,
) -> torch.Tensor:
    """MADE outputs [B, D, P] for inputs x [B, D] (weights masked here by the degrees).

    Plain: h = act(L_l(h) + c_l) per hidden layer, then the output layer. Residual (ResMADE):
    h = L_0(x) + c_0; per block h = h + L_b2(act(L_b1(act(h)) + c_b1)) + c_b2; output L(h).
    """
    D = x.shape[1]
    masks = [m.to(x) for m in made_masks(degrees, [w.shape[0] for w in weights], D)]
    act = _ACTIVATIONS[activation]
    n = len(weights)

    def linear(i, h):
        out = F.linear(h, weights[i] * masks[i], biases[i])
        return out + context_terms[i] if context_terms and i < n - 1 else out

    if not residual:
        h = x
        for i in range(n - 1):
            h = act(linear(i, h))
    else:
        h = linear(0, x)
        for i in range(1, n - 1, 2):
            h = h + linear(i + 1, act(linear(i, act(h))))
    return linear(n - 1, h).reshape(x.shape[0], D, -1)


def autoregressive_transformer(
    inputs: torch.Tensor,
    params: torch.Tensor,
    transformer: str,
    *,
    inverse: bool = False,
    tail_bound: float = 3.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The elementwise transformer of an autoregressive flow, summed logabsdet [B].

    affine: params [..., 2] = (shift, log_scale), y = x * exp(log_scale) + shift.
    rq_spline: params [..., 3K-1] = (widths K, heights K, derivatives K-1), see rq_spline.
    """
    if transformer == "affine":
        shift, log_scale = params[..., 0], params[..., 1]
        if inverse:
            return (inputs - shift) * torch.exp(-log_scale), -log_scale.sum(-1)
        return inputs * torch.exp(log_scale) + shift, log_scale.sum(-1)
    K = (params.shape[-1] + 1) // 3
    out, lad = rq_spline(
        inputs,
        params[..., :K],
        params[..., K : 2 * K],
        params[..., 2 * K :],
        inverse=inverse,
        tail_bound=tail_bound,
        min_bin_width=min_bin_width,
        min_bin_height=min_bin_height,
        min_derivative=min_derivative,
    )
    return out, lad.sum(-1)


def made_inverse_naive(
    y: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    degrees: list[int],
    context_terms: list[torch.Tensor],
    residual: bool,
    activation: str,
    transformer: str,
    tail_bound: float = 3.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook inversion: D full MADE passes, after pass d the first d inputs are exact."""
    check_made_inverse_args(y, weights, biases, degrees, context_terms, residual, activation, transformer)
    x = torch.zeros_like(y)
    options = dict(
        tail_bound=tail_bound, min_bin_width=min_bin_width, min_bin_height=min_bin_height,
        min_derivative=min_derivative,
    )
    for _ in range(y.shape[1]):
        params = made_forward(x, weights, biases, degrees, context_terms, residual, activation)
        x, logabsdet = autoregressive_transformer(y, params, transformer, inverse=True, **options)
    return x, logabsdet


def made_inverse(
    y: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    degrees: list[int],
    context_terms: list[torch.Tensor],
    residual: bool,
    activation: str,
    transformer: str,
    tail_bound: float = 3.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-pass inversion in plain, differentiable torch: per degree d, only the hidden units of
    degree d-1 (from the already-final units of lower degree), then x_d. Same function as
    made_inverse_naive; slower than the native op (it concatenates prefixes), used as its
    autograd formula and as the fallback.
    """
    check_made_inverse_args(y, weights, biases, degrees, context_terms, residual, activation, transformer)
    B, D = y.shape
    n = len(weights)
    act = _ACTIVATIONS[activation]
    P = weights[-1].shape[0] // D
    options = dict(
        tail_bound=tail_bound, min_bin_width=min_bin_width, min_bin_height=min_bin_height,
        min_derivative=min_derivative,
    )
    # Index lists in plain Python, so the function also traces under fake tensors. Every
    # column a unit reads here is one its mask admits, so no mask is applied.
    degrees = [int(k) for k in degrees]
    x_order = sorted(range(D), key=lambda j: degrees[j])
    hidden_deg, start = [], D
    for w in weights[:-1]:
        hidden_deg.append(degrees[start : start + w.shape[0]])
        start += w.shape[0]
    xs: list = [None] * D
    # Per hidden layer, the blocks computed so far: (unit indices, values [B, len]).
    layers: list[list] = [[] for _ in range(n - 1)]
    gated: list[list] = [[] for _ in range(n - 1)]
    logabsdet = y.new_zeros(B)

    def gather(blocks):
        index = [u for units, _ in blocks for u in units]
        values = torch.cat([v for _, v in blocks], dim=1) if blocks else y.new_zeros(B, 0)
        return index, values

    def linear(i, rows, index, values):
        out = F.linear(values, weights[i][rows][:, index], biases[i][rows])
        return out + context_terms[i][:, rows] if context_terms and i < n - 1 else out

    for d in range(1, D + 1):
        k = d - 1
        for i in range(n - 1):
            units = [u for u, g in enumerate(hidden_deg[i]) if g == k]
            if not units:
                continue
            if i == 0:
                index = x_order[:k]
                values = torch.stack([xs[j] for j in index], dim=1) if k else y.new_zeros(B, 0)
                pre = linear(0, units, index, values)
                layers[0].append((units, pre if residual else act(pre)))
            elif not residual:
                layers[i].append((units, act(linear(i, units, *gather(layers[i - 1])))))
            elif i % 2 == 1:  # first linear of a block reads act(stream)
                gated[i].append((units, act(layers[i - 1][-1][1])))
                layers[i].append((units, act(linear(i, units, *gather(gated[i])))))
            else:  # second linear: stream + block output
                t = linear(i, units, *gather(layers[i - 1]))
                layers[i].append((units, layers[i - 2][-1][1] + t))
        j = x_order[k]
        params = linear(n - 1, list(range(j * P, (j + 1) * P)), *gather(layers[n - 2]))
        xj, lad = autoregressive_transformer(
            y[:, j : j + 1], params[:, None, :], transformer, inverse=True, **options
        )
        xs[j] = xj[:, 0]
        logabsdet = logabsdet + lad
    return torch.stack(xs, dim=1), logabsdet
