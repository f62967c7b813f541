"""Fused affine coupling (NICE, RealNVP, Glow), native on CPU and CUDA."""

from __future__ import annotations

import torch

from nflux import _extension
from nflux.ops import _autocast, reference
from nflux.ops._checks import check_affine_coupling_args

def affine_coupling(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale_logits: torch.Tensor | None = None,
    *,
    scale: str = "exp",
    clamp: float | None = None,
    inverse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x * scale(scale_logits) + shift, in one pass, with its per-row log-determinant.

    Args:
        x: `[batch, ...]` values to transform (y when `inverse=True`); any trailing shape.
        shift: the shift, x's shape.
        scale_logits: the raw log-scale, x's shape; None gives NICE's additive coupling
            (logabsdet 0).
        scale: "exp" (RealNVP: scale = exp(s)) or "sigmoid" (Glow: scale = sigmoid(s + 2)).
        clamp: if given, s is first soft-clamped to clamp * tanh(s / clamp).
        inverse: compute x = (y - shift) / scale instead.

    Returns:
        `(y, logabsdet)`: y shaped like x; logabsdet `[batch]`, log|det dy/dx| summed over every
        non-batch dimension (log|det dx/dy| for `inverse=True`).
    """
    if _autocast.enabled(x):
        x, shift, scale_logits = _autocast.to_float32_or_wider(x, shift, scale_logits)
    kind = check_affine_coupling_args(x, shift, scale_logits, scale, clamp)
    if _extension.native(x):
        return torch.ops.nflux.affine_coupling(
            x, shift, scale_logits, kind, None if clamp is None else float(clamp), bool(inverse)
        )
    _extension.warn_fallback("affine_coupling", x)
    (x, shift, scale_logits), dtype = _autocast.widen_halves(x, shift, scale_logits)
    with _autocast.fallback_context(x):
        out = reference.affine_coupling(x, shift, scale_logits, scale=scale, clamp=clamp, inverse=inverse)
    return _autocast.narrowed(out, dtype)


# The autograd kernel is in C++ (csrc/autograd.cpp): it saves only the inputs and calls
# affine_coupling_backward, handing grad_y on as the shift's gradient in the forward direction.


def _fake(x, shift, logits, kind, clamp, inverse):
    return x.new_empty(x.shape), x.new_empty(x.shape[:1])


def _fake_backward(grad_y, grad_lad, x, shift, logits, kind, clamp, inverse):
    grad_logits = x.new_empty(x.shape) if logits is not None else x.new_empty(0)
    # Forward direction: grad_shift is grad_y itself, returned empty by the kernels.
    grad_shift = x.new_empty(x.shape) if inverse else x.new_empty(0)
    return x.new_empty(x.shape), grad_shift, grad_logits


def _front(t, dim, size):
    if t is None:
        return None
    t = t.expand(size, *t.shape) if dim is None else t.movedim(dim, 0)
    return t.reshape(size * t.shape[1], *t.shape[2:])


def _vmap(info, in_dims, x, shift, logits, *options):
    # The vmapped dimension joins the batch: one call serves every vmapped row.
    size = info.batch_size
    moved = [_front(t, d, size) for t, d in zip((x, shift, logits), in_dims)]
    y, lad = torch.ops.nflux.affine_coupling(*moved, *options)
    return (y.view(size, -1, *y.shape[1:]), lad.view(size, -1)), (0, 0)


def _vmap_backward(info, in_dims, grad_y, grad_lad, x, shift, logits, *options):
    size = info.batch_size
    moved = [_front(t, d, size) for t, d in zip((grad_y, grad_lad, x, shift, logits), in_dims)]
    grads = torch.ops.nflux.affine_coupling_backward(*moved, *options)
    # The empty outputs (grad_shift forward, grad_logits additive) stay unbatched.
    inverse = options[-1]
    batched = (True, inverse, logits is not None)
    out = tuple(g.view(size, -1, *g.shape[1:]) if b else g for g, b in zip(grads, batched))
    return out, tuple(0 if b else None for b in batched)


if _extension.loaded:
    torch.library.register_fake("nflux::affine_coupling")(_fake)
    torch.library.register_fake("nflux::affine_coupling_backward")(_fake_backward)
    torch.library.register_vmap("nflux::affine_coupling", _vmap)
    torch.library.register_vmap("nflux::affine_coupling_backward", _vmap_backward)
