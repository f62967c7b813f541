"""One-pass inversion of a MADE-conditioned autoregressive transform (MAF, autoregressive NSF).

Sampling such a flow is sequential: x_d needs the network's outputs for x_{<d}. The usual
implementation runs the whole network D times. made_inverse computes every hidden unit once,
in order of degree (see csrc/made_inverse.cpp), so sampling costs about one network pass.
"""

from __future__ import annotations

from typing import Sequence

import torch

from nflux import _extension
from nflux.ops import _autocast, reference
from nflux.ops._registration import batch_first, batch_index
from nflux.ops._checks import check_made_inverse_args, check_rq_spline_args

# made_inverse runs natively in float32/float64 only; half types take the reference.
_NATIVE_DTYPES = {"cpu": (torch.float32, torch.float64), "cuda": (torch.float32, torch.float64)}
# Where the native backward runs; elsewhere the gradient goes through the reference.
_NATIVE_BACKWARD_DTYPES = {"cpu": (torch.float32, torch.float64), "cuda": (torch.float32, torch.float64)}


def made_inverse(
    y: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor],
    degrees: Sequence[int],
    context_terms: Sequence[torch.Tensor] = (),
    *,
    residual: bool = False,
    activation: str = "relu",
    transformer: str = "affine",
    tail_bound: float = 3.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverts y = T(x; MADE(x)) for x, in one pass over the network.

    The network (see `nflux.nets.MADE`, whose `inverse_autoregressive` calls this):
        plain:    h = act(L_i(h) + c_i) for every hidden layer i, then params = L_out(h);
        residual: h = L_0(x) + c_0, then per block h = h + L_b2(act(L_b1(act(h)) + c_b1)) + c_b2,
                  then params = L_out(h).
    L_i(h) = h W_i^T + b_i with W_i masked by the degrees (the stored weights may be unmasked:
    the op reads only the admitted entries). params has shape [B, D, P], output row i*P + p.

    Args:
        y: `[B, D]`.
        weights, biases: `[out, in]` and `[out]` per layer, the output layer last
            (D * P rows).
        degrees: D input degrees (a permutation of 1..D: input i is generated at step
            degrees[i]), then the degree of every hidden unit, layer after layer. A hidden unit
            of degree k sees inputs of degree <= k.
        context_terms: empty, or per hidden layer the context's contribution `[B, out]`.
        transformer: "affine": params (shift, log_scale), y = x * exp(log_scale) + shift;
            "rq_spline": params (widths K, heights K, derivatives K-1), see `rq_spline`.

    Returns:
        `(x, logabsdet)`: x `[B, D]` and log|det dx/dy| `[B]`. Differentiable in y, the
        weights, biases and context terms.
    """
    _refuse_forward_mode()
    if _autocast.enabled(y):
        y, weights, biases, context_terms = _autocast.to_float32_or_wider(
            y, list(weights), list(biases), list(context_terms)
        )
    P = check_made_inverse_args(
        y, weights, biases, degrees, context_terms, residual, activation, transformer
    )
    if transformer == "rq_spline":
        K = (P + 1) // 3
        B = y.shape[0]
        check_rq_spline_args(
            y[:, 0], y.new_empty(B, K), y.new_empty(B, K), y.new_empty(B, K - 1),
            tail_bound, min_bin_width, min_bin_height, min_derivative,
        )
    args = (
        y, list(weights), list(biases), [int(k) for k in degrees], list(context_terms),
        bool(residual), str(activation), str(transformer), float(tail_bound),
        float(min_bin_width), float(min_bin_height), float(min_derivative),
    )
    if _extension.native(y, _NATIVE_DTYPES):
        return torch.ops.nflux.made_inverse(*args)
    _extension.warn_fallback("made_inverse", y)
    args, dtype = _autocast.widen_halves(*args)
    with _autocast.fallback_context(args[0]):
        return _autocast.narrowed(reference.made_inverse(*args), dtype)


def _refuse_forward_mode() -> None:
    """The op's autograd has no forward-mode rule, and under torch.func.jvp / jacfwd torch would
    hand back zero tangents rather than fail: refuse, as the C++-autograd ops do. (Not while
    torch.compile traces: dynamo cannot trace the interpreter stack, and compiles no jvp.)"""
    transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)  # one cheap query
    if torch.compiler.is_compiling() or not transforms_active():
        return
    stack = getattr(torch._C._functorch, "get_interpreter_stack", lambda: None)()
    if stack and any(level.key() == torch._C._functorch.TransformType.Jvp for level in stack):
        raise NotImplementedError(
            "nflux: made_inverse has no forward-mode derivative (torch.func.jvp, jacfwd); use torch.autograd "
            "(torch.func's gradient transforms are not supported)"
        )


def _vmap(info, in_dims, y, weights, biases, degrees, context_terms, *options):
    """vmap rule: the vmapped rows join the batch, so one call serves them all, while the
    network is shared; a vmapped network (per-index weights) takes one call per index."""
    n = info.batch_size
    y_dim, w_dims, b_dims, _, c_dims = in_dims[:5]
    if any(d is not None for d in (*w_dims, *b_dims)):
        outs = [
            torch.ops.nflux.made_inverse(
                batch_index(y, y_dim, i), [batch_index(w, d, i) for w, d in zip(weights, w_dims)],
                [batch_index(b, d, i) for b, d in zip(biases, b_dims)], degrees,
                [batch_index(t, d, i) for t, d in zip(context_terms, c_dims)], *options)
            for i in range(n)
        ]
        return (torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])), (0, 0)
    rows = batch_first(y, y_dim, n)

    def flat(t, d):  # the width after moving the vmapped dim, which may have been the last
        first = batch_first(t, d, n)
        return first.reshape(-1, first.shape[-1])

    x, lad = torch.ops.nflux.made_inverse(
        rows.reshape(-1, rows.shape[-1]), weights, biases, degrees,
        [flat(t, d) for t, d in zip(context_terms, c_dims)], *options)
    return (x.view(rows.shape), lad.view(rows.shape[:-1])), (0, 0)


def _setup_context(ctx, inputs, output):
    y, weights, biases, degrees, context_terms, *options = inputs
    ctx.save_for_backward(y, *weights, *biases, *context_terms)
    ctx.sizes = (len(weights), len(context_terms))
    ctx.degrees = degrees
    ctx.options = options


def _backward(ctx, grad_x, grad_logabsdet):
    n, c = ctx.sizes
    saved = ctx.saved_tensors
    y, weights, biases, context_terms = saved[0], saved[1 : 1 + n], saved[1 + n : 1 + 2 * n], saved[1 + 2 * n :]
    # create_graph=True (double backward) needs a differentiable backward: the reference's.
    if torch.is_grad_enabled() or not _extension.native(y, _NATIVE_BACKWARD_DTYPES):
        return reference_backward(ctx, grad_x, grad_logabsdet)
    # Native: recomputes x, solves J^T v = g in one reverse sweep over the degrees, then one
    # GEMM per layer for the parameters (csrc/cpu/made_inverse_tile.cpp, csrc/cuda/made_inverse.cu).
    g_y, g_w, g_b, g_c = torch.ops.nflux.made_inverse_backward(
        grad_x, grad_logabsdet, y, list(weights), list(biases), ctx.degrees, list(context_terms), *ctx.options
    )
    return (g_y, list(g_w), list(g_b), None, list(g_c), *([None] * len(ctx.options)))


def reference_backward(ctx, grad_x, grad_logabsdet):
    """made_inverse's gradient through the differentiable one-pass reference, recomputed from the
    saved inputs: serves devices without a native backward, and benchmarks as the baseline."""
    n, c = ctx.sizes
    saved = ctx.saved_tensors
    # Under create_graph the saved tensors stay in the graph, so the gradient is differentiable.
    create_graph = torch.is_grad_enabled()
    leaves = [t if create_graph and t.requires_grad else t.detach().requires_grad_(True) for t in saved]
    y, weights, biases, context_terms = leaves[0], leaves[1 : 1 + n], leaves[1 + n : 1 + 2 * n], leaves[1 + 2 * n :]
    with torch.enable_grad():
        x, logabsdet = reference.made_inverse(y, weights, biases, ctx.degrees, context_terms, *ctx.options)
        grads = torch.autograd.grad(
            (x, logabsdet), leaves, (grad_x, grad_logabsdet), allow_unused=True, create_graph=create_graph
        )
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
    g_y, g_w, g_b, g_c = grads[0], grads[1 : 1 + n], grads[1 + n : 1 + 2 * n], grads[1 + 2 * n :]
    return (g_y, list(g_w), list(g_b), None, list(g_c), *([None] * len(ctx.options)))


# Outputs are contiguous whatever the inputs' layout, as the kernels write them.
def _fake(y, weights, biases, degrees, context_terms, *options):
    return y.new_empty(y.shape), y.new_empty(y.shape[0])


def _fake_backward(grad_x, grad_logabsdet, y, weights, biases, degrees, context_terms, *options):
    return (
        y.new_empty(y.shape),
        [w.new_empty(w.shape) for w in weights],
        [b.new_empty(b.shape) for b in biases],
        [t.new_empty(t.shape) for t in context_terms],
    )


if _extension.loaded:
    torch.library.register_fake("nflux::made_inverse")(_fake)
    torch.library.register_fake("nflux::made_inverse_backward")(_fake_backward)
    torch.library.register_autograd("nflux::made_inverse", _backward, setup_context=_setup_context)
    torch.library.register_vmap("nflux::made_inverse", _vmap)


def autoregressive_transformer(
    inputs: torch.Tensor,
    params: torch.Tensor,
    transformer: str = "affine",
    *,
    inverse: bool = False,
    tail_bound: float = 3.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The elementwise transformer of an autoregressive flow, on native ops.

    Args:
        inputs: `[B, D]`; params: `[B, D, P]` (from `MADE`).
        transformer: "affine": params (shift, log_scale), y = x * exp(log_scale) + shift;
            "rq_spline": params (widths K, heights K, derivatives K-1), see `rq_spline`.

    Returns:
        `(outputs, logabsdet)` with logabsdet summed over features, `[B]`.
    """
    if _autocast.enabled(inputs):  # a bfloat16 exp(log_scale) would spoil the inverse
        inputs, params = _autocast.to_float32_or_wider(inputs, params)
    if transformer == "affine":
        shift, log_scale = params[..., 0], params[..., 1]
        if inverse:
            return (inputs - shift) * torch.exp(-log_scale), -log_scale.sum(-1)
        return torch.addcmul(shift, inputs, torch.exp(log_scale)), log_scale.sum(-1)
    if transformer != "rq_spline":
        raise ValueError(f"nflux: transformer must be 'affine' or 'rq_spline', got {transformer!r}")
    from nflux.ops.rq_spline import rq_spline

    K = (params.shape[-1] + 1) // 3
    out, lad = rq_spline(
        inputs, params[..., :K], params[..., K : 2 * K], params[..., 2 * K :], inverse=inverse,
        tail_bound=tail_bound, min_bin_width=min_bin_width, min_bin_height=min_bin_height,
        min_derivative=min_derivative,
    )
    return out, lad.sum(-1)
