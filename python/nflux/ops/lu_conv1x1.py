"""Invertible 1x1 convolution (Glow) and LU linear layer (MAF/NSF), with an ActNorm fold.

The op is one CompositeExplicitAutograd kernel in C++, so it runs natively on every device: the
channel-mixing GEMM goes to MKL/cuBLAS, and on the CPU (float/double) the [C, C] parameter work
is a host loop each way instead of small ATen calls.
"""

from __future__ import annotations

import torch

from nflux import _extension
from nflux.ops import _autocast, reference
from nflux.ops._checks import check_like, check_lu_conv1x1_args
from nflux.ops._registration import batch_first, batch_index


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
    """y = W (x + input_shift) + bias over the channels of `[B, C, H, W]` (or the features of `[B, C]`).

    W = P (L + I)(U + diag(sign * exp(log_scale))), where L = tril(lower, -1),
    U = triu(upper, 1) (entries outside those triangles are ignored and get zero gradient) and
    P = I[perm] for an int64 permutation `perm` of range(C), so (P A) = A[perm]. `perm` and
    `sign` are fixed buffers (no gradient). A `perm` that is not a permutation is refused by the
    native CPU kernel (float32 / float64), which builds the factors on the host; the GPU path
    (a check would synchronise every call), the pure-torch fallback and the transforms' LU
    cache do not check it (the transforms build valid ones). The inverse, x = W^-1 (y - bias), uses two
    triangular solves to build W^-1, never a general inverse. `input_shift` ([C], optional) is
    added to x before the mixing (ActNorm's bias; see `actnorm_lu_conv1x1`) at the cost of one
    [C] matrix-vector product: it rides in the GEMM's bias (inverse: x = W^-1 (y - bias) - shift).
    `input_log_scale` ([C], optional; ActNorm's scale) multiplies the shifted input by
    exp(input_log_scale) first: it folds into the factors (U's columns and log_scale) inside the
    op, so y = W diag(exp(input_log_scale)) (x + input_shift) + bias is still one GEMM.

    Returns:
        `(y, logabsdet)`; logabsdet is `[B]`, H*W*(sum(log_scale) + sum(input_log_scale))
        (negated for `inverse=True`).
    """
    if _autocast.enabled(x):
        x, lower, upper, log_scale, sign, bias, input_shift, input_log_scale = _autocast.to_float32_or_wider(
            x, lower, upper, log_scale, sign, bias, input_shift, input_log_scale
        )
    # Half inputs outside autocast compute in float32 too (the policy of every flow op; ATen has
    # no half triangular solve for the inverse), and come back in their own dtype.
    dtype = None
    if x.dtype in _autocast.HALF_TYPES or lower.dtype in _autocast.HALF_TYPES:  # a cheap test first: a hot path
        (x, lower, upper, log_scale, sign, bias, input_shift, input_log_scale), dtype = _autocast.widen_halves(
            x, lower, upper, log_scale, sign, bias, input_shift, input_log_scale
        )
    check_lu_conv1x1_args(x, perm, lower, upper, log_scale, sign, bias, input_shift, input_log_scale)
    if _extension.loaded:
        out = torch.ops.nflux.lu_conv1x1(
            x, perm, lower, upper, log_scale, sign, bias, bool(inverse), input_shift, input_log_scale
        )
        return _autocast.narrowed(out, dtype)
    _extension.warn_fallback("lu_conv1x1", x)
    with _autocast.fallback_context(x):
        out = reference.lu_conv1x1(
            x, perm, lower, upper, log_scale, sign, bias, inverse=inverse, input_shift=input_shift,
            input_log_scale=input_log_scale,
        )
    return _autocast.narrowed(out, dtype)


def _check_actnorm(lower, actnorm_log_scale, actnorm_bias):
    """ActNorm's [C] parameters, checked against the conv's own factors so that a mismatch
    names the ActNorm argument."""
    check_like(actnorm_log_scale, lower, "actnorm_log_scale", "lower")
    check_like(actnorm_bias, lower, "actnorm_bias", "lower")
    C = lower.shape[0]
    for name, t in (("actnorm_log_scale", actnorm_log_scale), ("actnorm_bias", actnorm_bias)):
        if tuple(t.shape) != (C,):
            raise ValueError(f"nflux: {name} must have shape [{C}], got {list(t.shape)}")


def actnorm_lu_conv1x1(
    x: torch.Tensor,
    perm: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    log_scale: torch.Tensor,
    sign: torch.Tensor,
    bias: torch.Tensor | None,
    actnorm_log_scale: torch.Tensor,
    actnorm_bias: torch.Tensor,
    *,
    inverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A Glow step's ActNorm then invertible 1x1 conv, y = W a(x) + bias with
    a(x) = exp(actnorm_log_scale) * (x + actnorm_bias), as one lu_conv1x1 call (one GEMM).

    ActNorm's scale and bias are the op's input_log_scale and input_shift: the scale folds into
    the LU factors inside the op (the columns of U and log_scale), the bias rides in the GEMM's
    offset, so the data is touched once each way and the fold costs no autograd node of its
    own. logabsdet includes ActNorm's; `inverse=True` undoes both (x = a^-1(W^-1 (y - bias))).
    """
    _check_actnorm(lower, actnorm_log_scale, actnorm_bias)
    return lu_conv1x1(
        x, perm, lower, upper, log_scale, sign, bias, inverse=inverse, input_shift=actnorm_bias,
        input_log_scale=actnorm_log_scale,
    )


def fold_actnorm(
    perm: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    log_scale: torch.Tensor,
    sign: torch.Tensor,
    bias: torch.Tensor | None,
    actnorm_log_scale: torch.Tensor,
    actnorm_bias: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Folds ActNorm, a(x) = exp(actnorm_log_scale) * (x + actnorm_bias), into the 1x1 conv.

    Returns `(upper', log_scale', bias')` such that lu_conv1x1 with them (and the same perm,
    lower, sign) equals lu_conv1x1(a(x), ...), logabsdet included: W diag(s) scales the columns
    of U and adds actnorm_log_scale to log_scale, and bias' = W' actnorm_bias + bias. Only
    [C, C]-sized work: a Glow step's ActNorm + 1x1 conv becomes one GEMM, and the gradients
    reach the ActNorm parameters through these small differentiable ops.
    """
    _check_actnorm(lower, actnorm_log_scale, actnorm_bias)
    folded_upper, folded_log_scale = reference.fold_input_log_scale(upper, log_scale, actnorm_log_scale)
    # bias' = W' actnorm_bias + bias is the op itself applied to the one row actnorm_bias: one
    # call (and one backward node) instead of building W' from a dozen small autograd ops.
    folded_bias, _ = lu_conv1x1(actnorm_bias[None], perm, lower, folded_upper, folded_log_scale, sign, bias)
    return folded_upper, folded_log_scale, folded_bias[0]


# The autograd kernel is in C++ (csrc/autograd.cpp): it saves the inputs and calls
# lu_conv1x1_backward.


def _fake(x, perm, lower, upper, log_scale, sign, bias, inverse, input_shift=None, input_log_scale=None):
    return x.new_empty(x.shape), x.new_empty(x.shape[:1])


def _fake_backward(grad_y, grad_lad, x, perm, lower, upper, log_scale, sign, bias, inverse, input_shift=None,
                   input_log_scale=None):
    C = lower.shape[0]
    return (
        x.new_empty(x.shape),
        x.new_empty(C, C),
        x.new_empty(C, C),
        x.new_empty(C),
        *(x.new_empty(C) if v is not None else x.new_empty(0) for v in (bias, input_shift, input_log_scale)),
    )


def _select(args, in_dims, v):
    return [batch_index(a, d, v) for a, d in zip(args, in_dims)]


def _vmap(info, in_dims, x, perm, lower, upper, log_scale, sign, bias, inverse, input_shift=None,
          input_log_scale=None):
    size = info.batch_size
    tensors = (x, perm, lower, upper, log_scale, sign, bias, input_shift, input_log_scale)
    dims = (*in_dims[:7], *(in_dims[i] if len(in_dims) > i else None for i in (8, 9)))
    if all(d is None for d in dims[1:]):
        # One W for every vmapped row: the vmapped dimension joins the batch, one GEMM in all.
        x = batch_first(x, dims[0], size)
        y, lad = torch.ops.nflux.lu_conv1x1(
            x.reshape(size * x.shape[1], *x.shape[2:]), perm, lower, upper, log_scale, sign, bias,
            inverse, input_shift, input_log_scale,
        )
        return (y.view(x.shape), lad.view(size, -1)), (0, 0)
    # Batched parameters: one W per vmapped index, so one call each.
    outs = []
    for v in range(size):
        t = _select(tensors, dims, v)
        outs.append(torch.ops.nflux.lu_conv1x1(*t[:7], inverse, *t[7:]))
    return (torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])), (0, 0)


def _vmap_backward(info, in_dims, grad_y, grad_lad, x, perm, lower, upper, log_scale, sign, bias,
                   inverse, input_shift=None, input_log_scale=None):
    # Each vmapped index has its own parameter gradients (a batch-folded call would sum them),
    # so one call per index. The empty outputs (no bias, no input_shift or input_log_scale)
    # stay unbatched.
    tensors = (grad_y, grad_lad, x, perm, lower, upper, log_scale, sign, bias, input_shift, input_log_scale)
    dims = (*in_dims[:9], *(in_dims[i] if len(in_dims) > i else None for i in (10, 11)))
    outs = []
    for v in range(info.batch_size):
        t = _select(tensors, dims, v)
        outs.append(torch.ops.nflux.lu_conv1x1_backward(*t[:9], inverse, *t[9:]))
    batched = (True, True, True, True, bias is not None, input_shift is not None, input_log_scale is not None)
    grads = tuple(torch.stack([o[i] for o in outs]) if b else outs[0][i] for i, b in enumerate(batched))
    return grads, tuple(0 if b else None for b in batched)


if _extension.loaded:
    torch.library.register_fake("nflux::lu_conv1x1")(_fake)
    torch.library.register_fake("nflux::lu_conv1x1_backward")(_fake_backward)
    torch.library.register_vmap("nflux::lu_conv1x1", _vmap)
    torch.library.register_vmap("nflux::lu_conv1x1_backward", _vmap_backward)
