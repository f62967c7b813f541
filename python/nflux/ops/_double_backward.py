"""Autograd of the native backward ops, so that gradients of gradients are right.

`rq_spline`, `affine_coupling`, `lu_conv1x1` and `masked_linear` differentiate through explicit
`*_backward` ops (C++ autograd, csrc/autograd.cpp). Those ops are opaque to autograd, so under
`create_graph=True` (gradient penalties, score matching, Hessians) their outputs need a
derivative of their own. It comes from the pure-torch reference: the first-order gradient is
recomputed there as a function of the backward op's inputs and differentiated with
`torch.func.vjp`, whose nested levels keep each input's partial derivative apart (a cotangent
such as 2y that itself depends on the op's inputs must not be followed back to them here:
autograd does that outside). Under create_graph the result stays differentiable, so higher
orders work too. Only double backward pays for it: with grad mode off, the C++ backward calls
the op below autograd and never reaches Python.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from nflux.ops import reference
from nflux.ops._checks import SCALE_KINDS

_SCALE_NAMES = {kind: name for name, kind in SCALE_KINDS.items()}


def _vjp(fn: Callable, args: Sequence, cotangents: Sequence | Callable, constants: Sequence[int] = ()) -> list:
    """The VJP of `fn(*args) -> tuple` for the floating tensors among `args` (None for the other
    entries and those at `constants`, which are passed through as they are). `cotangents` may
    be a function of the outputs."""
    present = [i for i, a in enumerate(args)
               if isinstance(a, torch.Tensor) and a.is_floating_point() and i not in constants]

    def of_present(*tensors):
        full = list(args)
        for i, t in zip(present, tensors):
            full[i] = t
        return tuple(fn(*full))

    outputs, pullback = torch.func.vjp(of_present, *(args[i] for i in present))
    grads = dict(zip(present, pullback(tuple(cotangents(outputs) if callable(cotangents) else cotangents))))
    return [grads.get(i) for i in range(len(args))]


def _rq_spline(cots, primals, options):
    inverse, tail_bound, min_w, min_h, min_d = options
    fwd = lambda x, w, h, d: reference.rq_spline(  # noqa: E731
        x, w, h, d, inverse=inverse, tail_bound=tail_bound, min_bin_width=min_w, min_bin_height=min_h,
        min_derivative=min_d)
    return _vjp(fwd, primals, cots)


def _affine_coupling(cots, primals, options):
    kind, clamp, inverse = options  # kind 0 (additive) has no logits: its scale name is unused
    x, shift, logits = primals
    fwd = lambda x, shift, logits: reference.affine_coupling(  # noqa: E731
        x, shift, logits, scale=_SCALE_NAMES.get(kind, "exp"), clamp=clamp, inverse=inverse)
    g_x, g_shift, g_logits = _vjp(fwd, primals, cots)
    # The op leaves out what the C++ autograd hands on as grad_y itself: grad_shift in the
    # forward direction (and, additive, grad_x, which it still returns).
    return [g_x, None if not inverse else g_shift, g_logits]


def _lu_conv1x1(cots, primals, options):
    (inverse,) = options
    x, perm, lower, upper, log_scale, sign, bias, input_shift, input_log_scale = primals
    fwd = lambda x, lower, upper, log_scale, bias, input_shift, input_log_scale: reference.lu_conv1x1(  # noqa: E731
        x, perm, lower, upper, log_scale, sign, bias, inverse=inverse, input_shift=input_shift,
        input_log_scale=input_log_scale)
    return _vjp(fwd, [x, lower, upper, log_scale, bias, input_shift, input_log_scale], cots)


def _masked_linear(cots, primals, options):
    x, weight, mask = primals
    # grad_bias is the cotangent summed over the batch: the VJP of a zero bias.
    bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    fwd = lambda x, weight, bias: (reference.masked_product(x, weight, bias, mask),)  # noqa: E731
    return _vjp(fwd, [x, weight, bias], cots)


def _register(qualname: str, n_cotangents: int, tensor_positions: Sequence[int], first_order: Callable,
              constants: Sequence[int] = ()) -> None:
    """Autograd for the backward op `qualname`: its arguments at `tensor_positions` are tensors
    (or None), the first `n_cotangents` of them cotangents and the rest forward inputs; the
    other arguments are options. `first_order(cotangents, forward_inputs, options)` recomputes
    the op's outputs (None for an output the op leaves empty). `constants` (indices into
    `tensor_positions`) are floating buffers that get no gradient (a mask, a sign)."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*(inputs[i] for i in tensor_positions))
        ctx.options = [a for i, a in enumerate(inputs) if i not in tensor_positions]
        ctx.n_inputs = len(inputs)

    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        kept: list[int] = []  # the outputs first_order computes (the op's empty ones excluded)

        def outputs(*tensors):
            outs = first_order(list(tensors[:n_cotangents]), list(tensors[n_cotangents:]), ctx.options)
            kept[:] = [i for i, o in enumerate(outs) if o is not None]
            return [outs[i] for i in kept]

        def cotangents(outs):
            return [grads[i] if grads[i] is not None else torch.zeros_like(o) for i, o in zip(kept, outs)]

        result = _vjp(outputs, saved, cotangents, constants)
        by_position = dict(zip(tensor_positions, result))
        return tuple(by_position.get(i) for i in range(ctx.n_inputs))

    torch.library.register_autograd(qualname, backward, setup_context=setup_context)


def register() -> None:
    """Called by nflux.ops once the extension is loaded."""
    _register("nflux::rq_spline_backward", 2, range(6), _rq_spline)
    _register("nflux::affine_coupling_backward", 2, range(5), _affine_coupling)
    _register("nflux::lu_conv1x1_backward", 2, (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11), _lu_conv1x1, constants=(7,))
    _register("nflux::masked_linear_backward", 1, range(4), _masked_linear, constants=(3,))
