"""Inference cache of W and W^-1 for the LU-parameterised linear / 1x1-conv transforms.

Training calls `nflux.ops.lu_conv1x1`, which builds W (or W^-1) from its factors on every call
so that gradients reach the factors. When no gradient is needed (sampling, evaluation) the
factors do not change between calls, so the transform builds the matrix once, keeps it, and
each call is one GEMM. The cache is keyed on every parameter's version counter and storage
address, and on the number of optimizer steps taken in this process: `load_state_dict`, an
in-place edit or `.to()` changes the first two, and any optimizer step the third (torch's fused
optimizers update parameters without bumping their version counters), so the next call
rebuilds. An edit through `.data` bypasses the version counter and is not seen: edit
parameters under `torch.no_grad()` instead, as EMA utilities do.
(Comparing values on every call would see it, but cost a third of a small LULinear's call on
the CPU and a synchronisation per call on a GPU.) The cache is bypassed while torch.compile
traces (the compiled graph builds W itself) and whenever a parameter requires grad with grad
mode on.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from nflux.ops import _autocast, reference
from nflux.ops._checks import check_lu_conv1x1_args

# (matrix applied over channels, offset added after it or None, log|det| per pixel)
Affine = tuple[torch.Tensor, "torch.Tensor | None", torch.Tensor]


def lu_affine(perm, lower, upper, log_scale, sign, bias=None, *, inverse=False, input_shift=None,
              input_log_scale=None) -> Affine:
    """The map lu_conv1x1 applies, y = W (x + input_shift) + bias, as (W, W input_shift + bias),
    or for `inverse=True` as (W^-1, -(W^-1 bias) - input_shift); W^-1 comes from two triangular
    solves against P^T, never from a general inverse. `input_log_scale` folds into the factors
    as in the op."""
    if input_log_scale is not None:
        upper, log_scale = reference.fold_input_log_scale(upper, log_scale, input_log_scale)
    if not inverse:
        w = reference.lu_weight(perm, lower, upper, log_scale, sign)
        offset = bias
        if input_shift is not None:
            offset = w @ input_shift if bias is None else torch.addmv(bias, w, input_shift)
        return w, offset, log_scale.sum()
    # W^-1 = (U + D)^-1 (L + I)^-1 P^T, and P^T = I[:, perm].
    unit_lower, upper_diag = reference.lu_factors(lower, upper, log_scale, sign)
    p_t = torch.eye(lower.shape[0], dtype=lower.dtype, device=lower.device)[:, perm]
    z = torch.linalg.solve_triangular(unit_lower, p_t, upper=False, unitriangular=True)
    w_inv = torch.linalg.solve_triangular(upper_diag, z, upper=True)
    offset = None if bias is None else -(w_inv @ bias)
    if input_shift is not None:
        offset = -input_shift if offset is None else offset - input_shift
    return w_inv, offset, -log_scale.sum()


def apply_affine(affine: Affine, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m x + offset over the channels of `[B, C]` or `[B, C, H, W]`, logabsdet `[B]`): one GEMM,
    the offset riding in it, as in the op."""
    m, offset, log_det = affine
    pixels = 1 if x.dim() == 2 else x.shape[2] * x.shape[3]
    logabsdet = (log_det * pixels).expand(x.shape[0]).clone()
    if x.dim() == 2:
        return (x @ m.T if offset is None else torch.addmm(offset, x, m.T)), logabsdet
    B, C = x.shape[:2]
    x3 = x.reshape(B, C, pixels)
    if offset is None:
        y3 = torch.matmul(m, x3)
    else:
        y3 = torch.baddbmm(offset.view(1, C, 1).expand(B, C, pixels), m.expand(B, C, C), x3)
    return y3.view(x.shape), logabsdet


_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


# A hook on every optimizer's step (torch's global post-step hooks): fused Adam, AdamW and SGD
# leave `_version` alone, so without it the cache would keep serving the weights of before.
register_optimizer_step_post_hook(_count_optimizer_step)


class LUCache:
    """The forward and inverse `Affine` of one transform, valid while its tensors are unchanged."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._held: list[torch.Tensor] = []
        self._entries: dict[bool, Affine] = {}

    @staticmethod
    def usable(tensors) -> bool:
        """Whether a call may use the cache: not while compiling, not when a gradient must reach
        the parameters, and not for inference tensors (they have no version counter)."""
        if torch.compiler.is_compiling():
            return False
        present = [t for t in tensors if t is not None]
        if torch.is_grad_enabled() and any(t.requires_grad for t in present):
            return False
        return not any(t.is_inference() for t in present)

    def get(self, tensors, inverse: bool, build: Callable[[], Affine]) -> Affine:
        key = (torch.is_inference_mode_enabled(), _optimizer_steps) + tuple(
            None if t is None else (t._version, t.data_ptr(), t.dtype, t.device) for t in tensors
        )
        if key != self._key:
            self._key, self._entries = key, {}
            # Holding the tensors keeps their storage alive, so no new parameter can reuse an
            # address (and a fresh version count) and pass for the old one.
            self._held = [t.detach() for t in tensors if t is not None]
        if inverse not in self._entries:
            with torch.no_grad():
                self._entries[inverse] = build()
        return self._entries[inverse]

    def clear(self) -> None:
        self._key, self._held, self._entries = None, [], {}


def cached_lu_conv1x1(cache: LUCache, x, perm, lower, upper, log_scale, sign, bias=None, *, inverse=False,
                      extra=(), fold: Callable | None = None):
    """lu_conv1x1 through `cache` when usable, else None (the caller then calls the op).

    `extra` are further tensors the factors depend on (ActNorm's), and `fold()` returns the
    `lu_affine` keyword arguments built from them; both are for the fused ActNorm step.
    """
    tensors = (perm, lower, upper, log_scale, sign, bias, *extra)
    if not LUCache.usable(tensors):
        return None
    if _autocast.enabled(x):
        # The op's autocast policy: the map in float32 (float64), whatever dtype x arrives in,
        # and (below) with autocast off so that neither building W nor applying it runs in bfloat16.
        if lower.dtype not in (torch.float32, torch.float64):
            return None  # the op casts the factors too; a cache of cast copies would never hit
        x, _ = _autocast.to_float32_or_wider(x, lower)
    elif lower.dtype in _autocast.HALF_TYPES:
        return None  # half factors outside autocast: the op computes them in float32 (no half solve)
    check_lu_conv1x1_args(x, perm, lower, upper, log_scale, sign, bias)

    def build():
        args = dict(perm=perm, lower=lower, upper=upper, log_scale=log_scale, sign=sign, bias=bias)
        if fold is not None:
            args.update(fold())
        return lu_affine(**args, inverse=inverse)

    with _autocast.fallback_context(x):
        return apply_affine(cache.get(tensors, inverse, build), x)
