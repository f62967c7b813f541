"""Monotonic rational-quadratic spline (Neural Spline Flows), native on CPU and CUDA."""

from __future__ import annotations

import torch

from nflux import _extension
from nflux.ops import _autocast, reference
from nflux.ops._checks import check_rq_spline_args
from nflux.ops._registration import fake_like, register_elementwise_vmap

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
    """Elementwise monotonic rational-quadratic spline with linear tails.

    Args:
        inputs: `[...]` values to transform (y when `inverse=True`).
        unnormalized_widths, unnormalized_heights: `[..., K]` bin logits (softmax, with a
            minimum bin size); the knots span [-tail_bound, tail_bound].
        unnormalized_derivatives: `[..., K-1]` logits of the interior knot derivatives
            (softplus + min_derivative). The boundary derivatives are 1, so the spline joins
            the identity tails.
        inverse: evaluate the inverse spline.

    Returns:
        `(outputs, logabsdet)`, both shaped like `inputs`; `logabsdet` is elementwise
        log|dy/dx| (log|dx/dy| for `inverse=True`). Outside [-tail_bound, tail_bound] the
        transform is the identity with logabsdet 0; a NaN input gives NaN in both outputs.
    """
    if _autocast.enabled(inputs):
        inputs, unnormalized_widths, unnormalized_heights, unnormalized_derivatives = _autocast.to_float32_or_wider(
            inputs, unnormalized_widths, unnormalized_heights, unnormalized_derivatives
        )
    check_rq_spline_args(
        inputs,
        unnormalized_widths,
        unnormalized_heights,
        unnormalized_derivatives,
        tail_bound,
        min_bin_width,
        min_bin_height,
        min_derivative,
    )
    if _extension.native(inputs):
        return torch.ops.nflux.rq_spline(
            inputs,
            unnormalized_widths,
            unnormalized_heights,
            unnormalized_derivatives,
            bool(inverse),
            float(tail_bound),
            float(min_bin_width),
            float(min_bin_height),
            float(min_derivative),
        )
    _extension.warn_fallback("rq_spline", inputs)
    (inputs, unnormalized_widths, unnormalized_heights, unnormalized_derivatives), dtype = _autocast.widen_halves(
        inputs, unnormalized_widths, unnormalized_heights, unnormalized_derivatives
    )
    with _autocast.fallback_context(inputs):
        out = reference.rq_spline(
            inputs,
            unnormalized_widths,
            unnormalized_heights,
            unnormalized_derivatives,
            inverse=inverse,
            tail_bound=tail_bound,
            min_bin_width=min_bin_width,
            min_bin_height=min_bin_height,
            min_derivative=min_derivative,
        )
    return _autocast.narrowed(out, dtype)


# Autograd is registered in C++ (csrc/autograd.cpp): the backward op recomputes the spline from
# the saved inputs, with no Python on the per-call path.
if _extension.loaded:
    torch.library.register_fake("nflux::rq_spline")(fake_like(0, 0))
    torch.library.register_fake("nflux::rq_spline_backward")(fake_like(2, 3, 4, 5))
    register_elementwise_vmap("nflux::rq_spline", tensor_args=4, outputs=2)
    register_elementwise_vmap("nflux::rq_spline_backward", tensor_args=6, outputs=4)
