"""Tests of nflux.ops.rq_spline (native kernel) against the pure-torch reference and its own maths.

Sizes mix tiny tensors (1-7 elements: the kernel's scalar leftovers) and big ones (>= 1000, not
multiples of 16: vector blocks plus leftovers).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import nflux
from nflux import _extension
from nflux.ops import reference
from nflux.ops.reference import _spline_knots

OP = torch.ops.nflux.rq_spline.default if nflux.build_info()["extension_loaded"] else None
native = pytest.mark.skipif(OP is None, reason="nflux extension not loaded: no torch.ops.nflux op")
F64 = torch.float64
F32 = torch.float32

OPTIONS = [
    dict(tail_bound=3.0, min_bin_width=1e-3, min_bin_height=1e-3, min_derivative=1e-3),
    dict(tail_bound=1.0, min_bin_width=1e-2, min_bin_height=1e-2, min_derivative=1e-2),
    dict(tail_bound=7.5, min_bin_width=0.02, min_bin_height=1e-4, min_derivative=0.5),
]


def make_params(shape, K, dtype=F64, scale=1.0, seed=0, device="cpu"):
    """Random (widths, heights, derivatives) logits for inputs of `shape`."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    w = torch.randn(*shape, K, generator=g, dtype=F64) * scale
    h = torch.randn(*shape, K, generator=g, dtype=F64) * scale
    d = torch.randn(*shape, K - 1, generator=g, dtype=F64) * scale
    return tuple(t.to(dtype=dtype, device=device) for t in (w, h, d))


def make_inputs(shape, bound, dtype=F64, spread=1.2, seed=1, device="cpu"):
    """Uniform in [-spread*bound, spread*bound]: mostly inside the spline, some in the tails."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(*shape, generator=g, dtype=F64) * 2 - 1) * spread * bound
    return x.to(dtype=dtype, device=device)


def raw_args(x, w, h, d, inverse=False, tail_bound=3.0, min_bin_width=1e-3, min_bin_height=1e-3,
             min_derivative=1e-3):
    return (x, w, h, d, inverse, tail_bound, min_bin_width, min_bin_height, min_derivative)


def ref_grads(x, w, h, d, gy, gl, **kw):
    """Gradients of sum(gy*y + gl*logabsdet) through the reference, in float64."""
    leaves = [t.detach().to(F64).requires_grad_(True) for t in (x, w, h, d)]
    y, l = reference.rq_spline(*leaves, **kw)
    return torch.autograd.grad((y * gy.to(F64)).sum() + (l * gl.to(F64)).sum(), leaves, allow_unused=True)


def op_grads(x, w, h, d, gy, gl, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, h, d)]
    y, l = nflux.ops.rq_spline(*leaves, **kw)
    return torch.autograd.grad((y * gy).sum() + (l * gl).sum(), leaves, allow_unused=True)


def assert_close(actual, expected, **tol):
    torch.testing.assert_close(actual, expected.to(actual.dtype), equal_nan=True, **tol)


# --------------------------------------------------------------------------------------------
# 1. Values against the reference


@pytest.mark.parametrize("options", OPTIONS, ids=["default", "B1", "B7.5"])
@pytest.mark.parametrize("K", [1, 2, 3, 8, 33])
@pytest.mark.parametrize("N", [1, 7, 1037])
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_matches_reference_float64(inverse, N, K, options):
    B = options["tail_bound"]
    w, h, d = make_params([N], K, scale=2.0, seed=N * 100 + K)
    x = make_inputs([N], B, seed=K)
    y, l = nflux.ops.rq_spline(x, w, h, d, inverse=inverse, **options)
    y_ref, l_ref = reference.rq_spline(x, w, h, d, inverse=inverse, **options)
    assert y.dtype == F64 and y.shape == x.shape and l.shape == x.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(l, l_ref, rtol=1e-9, atol=1e-9)
    # Tails are the exact identity with zero log-determinant.
    outside = x.abs() > B
    assert torch.equal(y[outside], x[outside])
    assert torch.all(l[outside] == 0)


@pytest.mark.parametrize("K", [1, 4, 33])
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_float32_matches_float64_reference(inverse, K):
    N = 3001
    w, h, d = make_params([N], K, dtype=F32, seed=K)
    x = make_inputs([N], 3.0, dtype=F32, seed=2)
    y, l = nflux.ops.rq_spline(x, w, h, d, inverse=inverse)
    y_ref, l_ref = reference.rq_spline(x.double(), w.double(), h.double(), d.double(), inverse=inverse)
    assert y.dtype == F32 and l.dtype == F32
    # Narrow bins (K=33) amplify float32 rounding of x and of the knots, for any float32
    # implementation: bound the error absolutely, and relative to the reference's own float32 error.
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(l, l_ref.float(), rtol=1e-3, atol=2e-3)
    y32, l32 = reference.rq_spline(x, w, h, d, inverse=inverse)
    for ours, theirs, exact in ((y, y32, y_ref), (l, l32, l_ref)):
        ours_err = (ours.double() - exact).abs().max()
        their_err = (theirs.double() - exact).abs().max()
        assert ours_err <= 10 * their_err + 1e-5, (ours_err, their_err)


# --------------------------------------------------------------------------------------------
# 2. gradcheck


@pytest.mark.parametrize("K", [1, 3, 5])
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_gradcheck(inverse, K):
    B = 2.0
    # Two elements in each tail, the rest inside and (with probability 1) away from the knots.
    x = torch.tensor([-3.5, -2.1, -1.7, -0.6, 0.05, 0.9, 1.6, 2.2, 40.0], dtype=F64)
    w, h, d = make_params(x.shape, K, seed=K)

    def f(x, w, h, d):
        return nflux.ops.rq_spline(x, w, h, d, inverse=inverse, tail_bound=B)

    args = [t.clone().requires_grad_(True) for t in (x, w, h, d)]
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# 3. opcheck: schema, fake kernel, autograd registration, dispatch


@native
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_opcheck(inverse, requires_grad):
    x = make_inputs([3, 5], 2.0, seed=3)
    w, h, d = make_params(x.shape, 4, seed=4)
    args = [t.requires_grad_(requires_grad) for t in (x, w, h, d)]
    torch.library.opcheck(OP, raw_args(*args, inverse=inverse, tail_bound=2.0))


@native
def test_opcheck_backward_op():
    x = make_inputs([11], 2.0, seed=5)
    w, h, d = make_params(x.shape, 3, seed=6)
    gy, gl = torch.randn(11, dtype=F64), torch.randn(11, dtype=F64)
    torch.library.opcheck(
        torch.ops.nflux.rq_spline_backward.default,
        (gy, gl, x, w, h, d, True, 2.0, 1e-3, 1e-3, 1e-3),
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"),
    )


# --------------------------------------------------------------------------------------------
# 4. Round trip


@pytest.mark.parametrize("B", [1.0, 3.0, 5.0])
@pytest.mark.parametrize("K", [2, 8, 33])
def test_round_trip_float32(B, K):
    N = 2001
    x = torch.linspace(-B, B, N, dtype=F32)
    x[0], x[-1] = -B, B
    # Small logits keep every slope well away from 0, so float32 rounding of y (~3e-7 * B)
    # cannot be amplified past 1e-5 by 1/slope in the inverse (with logits ~N(0, 0.5^2), slopes
    # already dip to 0.01 and the rounding alone moves x by 2.5e-5, for any implementation).
    w, h, d = make_params([N], K, dtype=F32, scale=0.3, seed=K + int(B))
    y, l_fwd = nflux.ops.rq_spline(x, w, h, d, tail_bound=B)
    assert torch.all(y.abs() <= B)
    assert y[0] == -B and y[-1] == B
    x_back, l_inv = nflux.ops.rq_spline(y, w, h, d, inverse=True, tail_bound=B)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-5)
    torch.testing.assert_close(l_inv, -l_fwd, rtol=1e-4, atol=1e-4)
    # And the other way: forward(inverse(y)) == y over the same dense grid.
    x2, l2 = nflux.ops.rq_spline(x, w, h, d, inverse=True, tail_bound=B)
    y2, l3 = nflux.ops.rq_spline(x2, w, h, d, tail_bound=B)
    torch.testing.assert_close(y2, x, rtol=0, atol=1e-5)
    torch.testing.assert_close(l3, -l2, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("K", [2, 8, 33])
def test_round_trip_float32_no_worse_than_reference(K):
    """With wide-ranging logits slopes reach e^-12 here, so float32 rounding of y alone moves the
    inverse by up to ~0.05 (that is conditioning, not a bug; the inverse's quadratic also loses a
    few digits in bins of very uneven slopes). The kernel must be no worse than the reference."""
    N, B = 2001, 3.0
    x = torch.linspace(-B, B, N, dtype=F32)
    w, h, d = make_params([N], K, dtype=F32, scale=2.0, seed=K)
    y, l_fwd = nflux.ops.rq_spline(x, w, h, d, tail_bound=B)
    x_back, l_inv = nflux.ops.rq_spline(y, w, h, d, inverse=True, tail_bound=B)
    y_r, _ = reference.rq_spline(x, w, h, d, tail_bound=B)
    x_r, _ = reference.rq_spline(y_r, w, h, d, inverse=True, tail_bound=B)
    ours = (x_back - x).abs().max().item()
    theirs = (x_r - x).abs().max().item()
    assert ours <= 2 * theirs + 4 * torch.finfo(F32).eps * B, (ours, theirs)
    torch.testing.assert_close(l_inv, -l_fwd, rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------------------------
# 5. logabsdet is the log of the elementwise derivative


@pytest.mark.parametrize("K", [2, 8])
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_logabsdet_is_log_derivative(inverse, K):
    N = 1003
    x = make_inputs([N], 3.0, seed=7).requires_grad_(True)
    w, h, d = make_params([N], K, seed=8)
    y, l = nflux.ops.rq_spline(x, w, h, d, inverse=inverse)
    (dydx,) = torch.autograd.grad(y.sum(), x)
    assert torch.all(dydx > 0)  # monotonic increasing
    torch.testing.assert_close(l, dydx.log(), rtol=1e-9, atol=1e-9)
    # The reference's autograd derivative agrees too.
    xr = x.detach().clone().requires_grad_(True)
    (dydx_ref,) = torch.autograd.grad(reference.rq_spline(xr, w, h, d, inverse=inverse)[0].sum(), xr)
    torch.testing.assert_close(dydx, dydx_ref, rtol=1e-9, atol=1e-9)


def test_gradients_match_reference_all_tensors():
    N, K = 1037, 6
    for inverse in (False, True):
        x = make_inputs([N], 3.0, seed=9)
        w, h, d = make_params([N], K, seed=10)
        gy, gl = torch.randn(N, dtype=F64), torch.randn(N, dtype=F64)
        got = op_grads(x, w, h, d, gy, gl, inverse=inverse)
        want = ref_grads(x, w, h, d, gy, gl, inverse=inverse)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)



def test_autograd_kernel_is_cpp_and_handles_partial_outputs():
    # Only the outputs, or only logabsdet, feeding the loss: the missing gradient arrives as
    # zeros, and the gradients still match the reference's.
    N, K = 37, 5
    x = make_inputs([N], 3.0, seed=3).requires_grad_(True)
    params = [p.requires_grad_(True) for p in make_params([N], K, seed=4)]
    y, lad = nflux.ops.rq_spline(x, *params, inverse=True)
    y_ref, lad_ref = reference.rq_spline(x, *params, inverse=True)
    for out, ref in ((y.sum(), y_ref.sum()), (lad.sum(), lad_ref.sum())):
        got = torch.autograd.grad(out, [x, *params], retain_graph=True)
        want = torch.autograd.grad(ref, [x, *params], retain_graph=True)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-9)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("nflux::rq_spline", "Autograd")
    assert "RqSplineFunction" in y.grad_fn.name()

# --------------------------------------------------------------------------------------------
# 6. Edge values


def _knot_grid(N, K, B, seed, dtype=F64, **mins):
    """Inputs placed exactly on every width knot (forward) and height knot (inverse)."""
    w, h, d = make_params([N, K + 1], K, seed=seed)  # element (i, j) sits on its knot j
    wk = _spline_knots(w, mins.get("min_bin_width", 1e-3), B)
    hk = _spline_knots(h, mins.get("min_bin_height", 1e-3), B)
    j = torch.arange(K + 1)
    xw = wk[:, j, j]
    xh = hk[:, j, j]
    deriv = torch.cat(
        [torch.ones(N, K + 1, 1, dtype=F64), 1e-3 + torch.nn.functional.softplus(d),
         torch.ones(N, K + 1, 1, dtype=F64)], dim=-1)[:, j, j]
    cast = lambda *ts: tuple(t.to(dtype) for t in ts)  # noqa: E731
    return cast(xw, xh, deriv, w, h, d)


@pytest.mark.parametrize("K", [1, 3, 8])
def test_exactly_at_knots(K):
    B = 2.5
    xw, xh, deriv, w, h, d = _knot_grid(5, K, B, seed=K)
    # Forward at width knot j lands on height knot j with slope d_j.
    y, l = nflux.ops.rq_spline(xw, w, h, d, tail_bound=B)
    torch.testing.assert_close(y, xh, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(l, deriv.log(), rtol=1e-9, atol=1e-9)
    y_ref, l_ref = reference.rq_spline(xw, w, h, d, tail_bound=B)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(l, l_ref, rtol=1e-9, atol=1e-9)
    # Inverse at height knot j lands on width knot j with log dx/dy = -log d_j.
    x, li = nflux.ops.rq_spline(xh, w, h, d, inverse=True, tail_bound=B)
    torch.testing.assert_close(x, xw, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(li, -deriv.log(), rtol=1e-9, atol=1e-9)
    # Gradients at knots are finite for every tensor, forward and inverse.
    for inverse, inp in ((False, xw), (True, xh)):
        grads = op_grads(inp, w, h, d, torch.ones_like(inp), torch.ones_like(inp), inverse=inverse, tail_bound=B)
        for g in grads:
            assert torch.isfinite(g).all()


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_tail_bound_and_neighbours(inverse, dtype):
    B = 3.0
    b = torch.tensor(B, dtype=dtype)
    inf = torch.tensor(math.inf, dtype=dtype)
    zero = torch.tensor(0.0, dtype=dtype)
    just_in = torch.nextafter(b, zero)
    just_out = torch.nextafter(b, inf)
    x = torch.stack([-b, b, -just_in, just_in, -just_out, just_out])
    n = x.numel()
    w, h, d = make_params([n], 5, dtype=dtype, seed=11)
    y, l = nflux.ops.rq_spline(x, w, h, d, inverse=inverse, tail_bound=B)
    # The spline maps the bounds onto themselves with unit slope: continuous with the tails.
    torch.testing.assert_close(y[:2], x[:2], rtol=0, atol=1e-6 if dtype == F32 else 1e-12)
    torch.testing.assert_close(l[:2], torch.zeros(2, dtype=dtype), rtol=0, atol=1e-5 if dtype == F32 else 1e-10)
    # Just inside: still the spline, but next to the bound.
    torch.testing.assert_close(y[2:4], x[2:4], rtol=0, atol=1e-5 if dtype == F32 else 1e-10)
    # Just outside: exact identity.
    assert torch.equal(y[4:], x[4:]) and torch.all(l[4:] == 0)
    y_ref, l_ref = reference.rq_spline(x.double(), w.double(), h.double(), d.double(), inverse=inverse, tail_bound=B)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == F32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y, y_ref.to(dtype), **tol)
    torch.testing.assert_close(l, l_ref.to(dtype), **(dict(rtol=1e-4, atol=1e-4) if dtype == F32 else tol))
    for g in op_grads(x, w, h, d, torch.ones_like(x), torch.ones_like(x), inverse=inverse, tail_bound=B):
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_deep_tails_and_infinities(inverse, dtype):
    x = torch.tensor([1e6, -1e6, 1e30, -1e30, math.inf, -math.inf, 3.0001, -1e-30 - 3.5], dtype=dtype)
    n = x.numel()
    w, h, d = make_params([n], 7, dtype=dtype, seed=12)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, h, d)]
    y, l = nflux.ops.rq_spline(*leaves, inverse=inverse)
    assert torch.equal(y.detach(), x)
    assert torch.equal(l.detach(), torch.zeros_like(x))
    (y.sum() + l.sum()).backward()
    gx, gw, gh, gd = (t.grad for t in leaves)
    assert torch.equal(gx, torch.ones_like(x))  # identity: finite gradient 1, even at +-inf
    for g in (gw, gh, gd):
        assert torch.equal(g, torch.zeros_like(g))


def test_reference_inverse_keeps_its_derivative_at_the_right_knot():
    # theta is set to 1 at y = +tail_bound; the reference did that with a where that also cut
    # dx/dy to 0 there (the double backward and the fallback go through the reference).
    y = torch.tensor([3.0, 3.0 - 1e-9], dtype=F64, requires_grad=True)
    w, h, d = make_params([2], 5, seed=21)
    for op in (nflux.ops.rq_spline, reference.rq_spline):
        x, _ = op(y, w, h, d, inverse=True)
        (g,) = torch.autograd.grad(x.sum(), y)
        torch.testing.assert_close(g[0], torch.tensor(1.0, dtype=F64))  # the identity tail's slope
        torch.testing.assert_close(g[0], g[1], rtol=1e-6, atol=0)


@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_nan_input_is_contained(inverse):
    N, K = 1037, 5  # big enough that the NaNs share vector blocks with finite elements
    x = make_inputs([N], 3.0, seed=13)
    w, h, d = make_params([N], K, seed=14)
    nan_at = torch.tensor([0, 17, 500, N - 1])
    x_nan = x.clone()
    x_nan[nan_at] = math.nan
    y0, l0 = nflux.ops.rq_spline(x, w, h, d, inverse=inverse)
    y1, l1 = nflux.ops.rq_spline(x_nan, w, h, d, inverse=inverse)
    assert torch.isnan(y1[nan_at]).all() and torch.isnan(l1[nan_at]).all()
    keep = torch.ones(N, dtype=torch.bool)
    keep[nan_at] = False
    assert torch.equal(y1[keep], y0[keep]) and torch.equal(l1[keep], l0[keep])
    ones = torch.ones(N, dtype=F64)
    g0 = op_grads(x, w, h, d, ones, ones, inverse=inverse)
    g1 = op_grads(x_nan, w, h, d, ones, torch.where(keep, ones, torch.zeros_like(ones)), inverse=inverse)
    for a, b in zip(g0, g1):
        assert torch.isfinite(b[keep]).all()
        assert torch.equal(a[keep], b[keep])


@pytest.mark.parametrize("logit", [50.0, -50.0, 1e4, -1e4])
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_extreme_parameter_logits(inverse, dtype, logit):
    N, K, B = 1003, 6, 3.0
    x = torch.linspace(-1.1 * B, 1.1 * B, N, dtype=dtype)
    w, h, d = make_params([N], K, dtype=dtype, seed=15)
    # Every other element has one extreme logit in each tensor, in varying bins.
    idx = torch.arange(0, N, 2)
    w[idx, idx % K] = logit
    h[idx, (idx + 1) % K] = logit
    d[idx, idx % (K - 1)] = logit
    leaves = [t.clone().requires_grad_(True) for t in (x, w, h, d)]
    y, l = nflux.ops.rq_spline(*leaves, inverse=inverse, tail_bound=B)
    assert torch.isfinite(y).all() and torch.isfinite(l).all()
    assert torch.all(y.abs() <= 1.1 * B + 1e-6)
    (y.sum() + l.sum()).backward()
    for t in leaves:
        assert torch.isfinite(t.grad).all()
    y_ref, l_ref = reference.rq_spline(x.double(), w.double(), h.double(), d.double(), inverse=inverse, tail_bound=B)
    if dtype == F64:
        torch.testing.assert_close(y.detach(), y_ref, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(l.detach(), l_ref, rtol=1e-7, atol=1e-7)
    else:
        torch.testing.assert_close(y.detach(), y_ref.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("N", [1, 5, 1037])
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_single_bin_is_identity(inverse, N):
    x = make_inputs([N], 3.0, seed=16)
    w, h, d = make_params([N], 1, scale=10.0, seed=17)
    assert d.shape == (N, 0)
    y, l = nflux.ops.rq_spline(x, w, h, d, inverse=inverse)
    torch.testing.assert_close(y, x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(l, torch.zeros_like(x), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------
# 7. Shapes, strides, broadcasting


@pytest.mark.parametrize("shape", [(0,), (3, 0)])
def test_empty_inputs(shape):
    x = torch.empty(shape, dtype=F64)
    w, h, d = make_params(shape, 4)
    leaves = [t.requires_grad_(True) for t in (x, w, h, d)]
    for inverse in (False, True):
        y, l = nflux.ops.rq_spline(*leaves, inverse=inverse)
        assert y.shape == shape and l.shape == shape
        grads = torch.autograd.grad(y.sum() + l.sum(), leaves)
        assert [g.shape for g in grads] == [t.shape for t in leaves]


def test_scalar_input():
    for value in (0.3, -2.9, 5.0):
        x = torch.tensor(value, dtype=F64)
        w, h, d = make_params([], 5, seed=18)
        for inverse in (False, True):
            y, l = nflux.ops.rq_spline(x, w, h, d, inverse=inverse)
            y_ref, l_ref = reference.rq_spline(x, w, h, d, inverse=inverse)
            assert y.shape == () and l.shape == ()
            torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(l, l_ref, rtol=1e-10, atol=1e-10)


def test_multidim_leading_shape():
    shape = (4, 5, 6)
    x = make_inputs(shape, 3.0, seed=19)
    w, h, d = make_params(shape, 8, seed=20)
    for inverse in (False, True):
        y, l = nflux.ops.rq_spline(x, w, h, d, inverse=inverse)
        assert y.shape == shape and l.shape == shape
        y_ref, l_ref = reference.rq_spline(x, w, h, d, inverse=inverse)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(l, l_ref, rtol=1e-9, atol=1e-9)
        y_flat, l_flat = nflux.ops.rq_spline(x.reshape(-1), w.reshape(-1, 8), h.reshape(-1, 8), d.reshape(-1, 7), inverse=inverse)
        assert torch.equal(y_flat.reshape(shape), y) and torch.equal(l_flat.reshape(shape), l)


def _noncontiguous_cases():
    K = 5
    x = make_inputs([41, 37], 3.0, seed=21)
    w, h, d = make_params([41, 37], K, seed=22)
    yield "transposed", (x.t(), w.transpose(0, 1), h.transpose(0, 1), d.transpose(0, 1))
    yield "step-sliced", (x[::3, 1::2], w[::3, 1::2], h[::3, 1::2], d[::3, 1::2])
    wide = make_params([41], 2 * K, seed=23)
    yield "last-dim-strided", (x[:, 0], wide[0][:, ::2], wide[1][:, 1::2], wide[2][:, ::2][:, : K - 1])
    x1, (w0, h0, d0) = x[:, 0], make_params([], K, seed=24)
    yield "expanded-params", (x1, w0.expand(41, K), h0.expand(41, K), d0.expand(41, K - 1))


@pytest.mark.parametrize("case", list(_noncontiguous_cases()), ids=lambda c: c[0])
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_noncontiguous_matches_contiguous(inverse, case):
    _, args = case
    assert not all(t.is_contiguous() for t in args)
    got = nflux.ops.rq_spline(*args, inverse=inverse)
    want = nflux.ops.rq_spline(*(t.contiguous() for t in args), inverse=inverse)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    ref = reference.rq_spline(*args, inverse=inverse)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)
    n = args[0].numel()
    g = torch.Generator().manual_seed(25)
    gy = torch.randn(args[0].shape, generator=g, dtype=F64)
    gl = torch.randn(args[0].shape, generator=g, dtype=F64)
    for a, b in zip(op_grads(*args, gy, gl, inverse=inverse), ref_grads(*args, gy, gl, inverse=inverse)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)
    assert n > 0


@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_gradients_of_broadcast_parameters(inverse):
    N, K = 1037, 8
    x = make_inputs([N], 3.0, seed=26)
    w0, h0, d0 = (t.requires_grad_(True) for t in make_params([], K, seed=27))
    y, l = nflux.ops.rq_spline(x, w0.expand(N, K), h0.expand(N, K), d0.expand(N, K - 1), inverse=inverse)
    got = torch.autograd.grad(y.sum() + 0.5 * l.sum(), (w0, h0, d0))
    y_ref, l_ref = reference.rq_spline(x, w0.expand(N, K), h0.expand(N, K), d0.expand(N, K - 1), inverse=inverse)
    want = torch.autograd.grad(y_ref.sum() + 0.5 * l_ref.sum(), (w0, h0, d0))
    for a, b in zip(got, want):
        assert a.shape == (b.shape)
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


# --------------------------------------------------------------------------------------------
# 8. Large tensors (index arithmetic beyond small sizes)


def test_large_tensor_float32():
    N, K = (1 << 21) + 3, 8
    g = torch.Generator().manual_seed(28)
    x = (torch.rand(N, generator=g) * 2 - 1) * 3.3
    w = torch.randn(N, K, generator=g)
    h = torch.randn(N, K, generator=g)
    d = torch.randn(N, K - 1, generator=g)
    y, l = nflux.ops.rq_spline(x, w, h, d)
    assert torch.isfinite(y).all() and torch.isfinite(l).all()
    # Check a random subset plus the very end against the reference.
    idx = torch.cat([torch.randint(0, N, (4096,), generator=g), torch.arange(N - 40, N)])
    y_ref, l_ref = reference.rq_spline(x[idx].double(), w[idx].double(), h[idx].double(), d[idx].double())
    torch.testing.assert_close(y[idx], y_ref.float(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(l[idx], l_ref.float(), rtol=1e-4, atol=2e-4)
    x_inv, l_inv = nflux.ops.rq_spline(x, w, h, d, inverse=True)
    x_ref, li_ref = reference.rq_spline(x[idx].double(), w[idx].double(), h[idx].double(), d[idx].double(), inverse=True)
    torch.testing.assert_close(x_inv[idx], x_ref.float(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(l_inv[idx], li_ref.float(), rtol=1e-3, atol=2e-3)


# --------------------------------------------------------------------------------------------
# 9. Bad input


def _good(N=5, K=4, dtype=F64):
    x = make_inputs([N], 3.0, dtype=dtype)
    return (x, *make_params([N], K, dtype=dtype))


def _bad_cases():
    x, w, h, d = _good()
    yield "leading", (x, w[:4], h, d), {}, "unnormalized_widths"
    yield "leading-heights", (x, w, h[None], d), {}, "unnormalized_heights"
    yield "K-heights", (x, w, torch.cat([h, h[:, :1]], -1), d), {}, "unnormalized_heights"
    yield "K-1-derivatives", (x, w, h, torch.cat([d, d[:, :1]], -1)), {}, "unnormalized_derivatives"
    yield "int-inputs", (x.long(), w, h, d), {}, "inputs"
    yield "mixed-dtype", (x, w.float(), h, d), {}, "unnormalized_widths"
    yield "mixed-dtype-derivatives", (x, w, h, d.float()), {}, "unnormalized_derivatives"
    yield "min-bin-width", (x, w, h, d), {"min_bin_width": 0.25}, "min_bin_width"
    yield "min-bin-height", (x, w, h, d), {"min_bin_height": 0.3}, "min_bin_height"
    yield "tail-bound-zero", (x, w, h, d), {"tail_bound": 0.0}, "tail_bound"
    yield "tail-bound-negative", (x, w, h, d), {"tail_bound": -1.0}, "tail_bound"
    yield "min-derivative", (x, w, h, d), {"min_derivative": 0.0}, "min_derivative"
    yield "tail-bound-inf", (x, w, h, d), {"tail_bound": math.inf}, "tail_bound"
    yield "min-bin-width-zero", (x, w, h, d), {"min_bin_width": 0.0}, "min_bin_width"
    yield "min-bin-height-zero", (x, w, h, d), {"min_bin_height": 0.0}, "min_bin_height"
    yield "min-derivative-inf", (x, w, h, d), {"min_derivative": math.inf}, "min_derivative"
    # Below float32's resolution next to the tail bound the first knot rounds onto -tail_bound
    # (x = -B then landed in bin 1: -2.25 instead of -3). float64 resolves it.
    xf, wf, hf, df = (t.float() for t in (x, w, h, d))
    yield "min-bin-width-unresolved", (xf, wf, hf, df), {"min_bin_width": 1e-8}, "min_bin_width = 1e-08 is below"
    yield "min-bin-height-unresolved", (xf, wf, hf, df), {"min_bin_height": 1e-9}, "min_bin_height = 1e-09 is below"
    # Twice epsilon resolves one bin, but the knots' running sum rounds the last bin away with
    # K = 16 (NaN logabsdet next to +B): the floor grows with K.
    w16, h16, d16 = (torch.randn(5, 16 - (i == 2)) for i in range(3))
    yield "min-bin-width-unresolved-for-K", (xf, w16, h16, d16), {"min_bin_width": 2.4e-7}, "with K = 16 bins"


BAD = list(_bad_cases())


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises_value_error(case):
    _, args, kwargs, name = case
    with pytest.raises(ValueError, match=name):
        nflux.ops.rq_spline(*args, **kwargs)
    with pytest.raises(ValueError, match=name):
        reference.rq_spline(*args, **kwargs)


@native
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raw_op_raises_runtime_error(case):
    _, args, kwargs, name = case
    with pytest.raises(RuntimeError, match=name):
        OP(*raw_args(*args, **kwargs))


@pytest.mark.parametrize("K", [8, 16, 64])
def test_smallest_accepted_bins_stay_finite_in_float32(K):
    # The last bin at its minimum, next to +B where the knots' rounding gathers: values and
    # logabsdets finite and within the bound (2.4e-7 with K = 16 gave NaN and collapsed it).
    g = torch.Generator().manual_seed(K)
    smallest = (K + 2) * torch.finfo(torch.float32).eps
    w, h, d = (torch.randn(200, n, generator=g) * 3 for n in (K, K, K - 1))
    w[:, -1], h[:, -1] = -1e4, -1e4
    x = torch.linspace(3 - 1e-5, 3, 200)
    for op in (nflux.ops.rq_spline, reference.rq_spline):
        for inverse in (False, True):
            y, lad = op(x, w, h, d, min_bin_width=smallest, min_bin_height=smallest, inverse=inverse)
            assert torch.isfinite(y).all() and torch.isfinite(lad).all(), (op, inverse)
            assert (y.abs() <= 3).all()


def test_tiny_min_bin_width_is_exact_in_float64():
    x = torch.tensor([-3.0, 3.0], dtype=F64)
    w, h, d = make_params([2], 5, seed=3)
    for op in (nflux.ops.rq_spline, reference.rq_spline):
        y, _ = op(x, w, h, d, min_bin_width=1e-8, min_bin_height=1e-8)
        torch.testing.assert_close(y, x, rtol=0, atol=1e-12)


@pytest.mark.cuda
def test_mixed_devices_raise():
    x, w, h, d = _good()
    with pytest.raises(ValueError, match="unnormalized_heights"):
        nflux.ops.rq_spline(x.cuda(), w.cuda(), h, d.cuda())
    with pytest.raises(RuntimeError, match="unnormalized_heights"):
        OP(*raw_args(x.cuda(), w.cuda(), h, d.cuda()))


# --------------------------------------------------------------------------------------------
# 10. torch.compile


def _spline_loss(x, w, h, d):
    y, l = nflux.ops.rq_spline(x, w, h, d, inverse=False, tail_bound=2.5)
    x2, l2 = nflux.ops.rq_spline(torch.tanh(y), w, h, d, inverse=True, tail_bound=2.5)
    return y * 2 + x2, l + l2


def _check_compiled(backend):
    torch._dynamo.reset()
    N, K = 1037, 6
    x = make_inputs([N], 2.5, seed=29)
    w, h, d = make_params([N], K, seed=30)
    gy, gl = torch.randn(N, dtype=F64), torch.randn(N, dtype=F64)
    compiled = torch.compile(_spline_loss, fullgraph=True, backend=backend)
    results = []
    for fn in (_spline_loss, compiled):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, h, d)]
        out, lad = fn(*leaves)
        grads = torch.autograd.grad((out * gy).sum() + (lad * gl).sum(), leaves)
        results.append((out.detach(), lad.detach(), *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_compile_aot_eager():
    _check_compiled("aot_eager")


@pytest.mark.slow
@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "clang++", "c++")), reason="inductor needs a C++ compiler"
)
def test_compile_inductor():
    # Slow by marker: a cold inductor compile takes ~50 s on a 2-core box (warm cache: ~3 s).
    _check_compiled("inductor")


# --------------------------------------------------------------------------------------------
# 11. torch.func


@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_vmap(inverse):
    Bt, N, K = 3, 7, 5
    x = make_inputs([Bt, N], 3.0, seed=31)
    w, h, d = make_params([Bt, N], K, seed=32)

    def f(x, w, h, d):
        return nflux.ops.rq_spline(x, w, h, d, inverse=inverse)

    want = reference.rq_spline(x, w, h, d, inverse=inverse)
    got = torch.func.vmap(f)(x, w, h, d)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # Batch only the inputs; parameters shared across the batch.
    got = torch.func.vmap(f, in_dims=(0, None, None, None))(x, w[0], h[0], d[0])
    want = reference.rq_spline(x, w[0].expand(Bt, N, K), h[0].expand(Bt, N, K), d[0].expand(Bt, N, K - 1), inverse=inverse)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # Batch dimension not in front, and output moved.
    got_y, got_l = torch.func.vmap(f, in_dims=(1, 1, 1, 1), out_dims=1)(
        x.t().contiguous(), w.transpose(0, 1), h.transpose(0, 1), d.transpose(0, 1))
    ref_y, ref_l = reference.rq_spline(x, w, h, d, inverse=inverse)
    torch.testing.assert_close(got_y, ref_y.t(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_l, ref_l.t(), rtol=1e-10, atol=1e-10)


FUNC_GRAD_XFAIL = pytest.mark.xfail(
    strict=True,
    raises=RuntimeError,
    reason=(
        "torch.func.grad/jacrev reject ops whose autograd comes from torch.library.register_autograd: "
        "the generated autograd.Function has no setup_context staticmethod (pytorch/pytorch#168393, "
        "#179652). nflux.ops.rq_spline needs its own autograd.Function (setup_context + vmap) or "
        "a fixed torch to support torch.func.grad"
    ),
)


@FUNC_GRAD_XFAIL
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_func_grad_and_jacrev(inverse):
    N, K = 6, 4
    x = make_inputs([N], 3.0, seed=33)
    w, h, d = make_params([N], K, seed=34)

    def scalar(fn):
        def loss(x, w, h, d):
            y, l = fn(x, w, h, d, inverse=inverse)
            return (y.sin() + l).sum()
        return loss

    got = torch.func.grad(scalar(nflux.ops.rq_spline), argnums=(0, 1, 2, 3))(x, w, h, d)
    want = torch.func.grad(scalar(reference.rq_spline), argnums=(0, 1, 2, 3))(x, w, h, d)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)

    def outputs(fn):
        return lambda x, w: fn(x, w, h, d, inverse=inverse)[0]

    jac = torch.func.jacrev(outputs(nflux.ops.rq_spline), argnums=(0, 1))(x, w)
    jac_ref = torch.func.jacrev(outputs(reference.rq_spline), argnums=(0, 1))(x, w)
    torch.testing.assert_close(jac, jac_ref, rtol=1e-9, atol=1e-10)
    # Elementwise: the Jacobian wrt x is diagonal, and its diagonal is exp(logabsdet).
    _, l = nflux.ops.rq_spline(x, w, h, d, inverse=inverse)
    torch.testing.assert_close(jac[0], torch.diag(l.exp()), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_autograd_functional_jacobian(inverse):
    N, K = 6, 4
    x = make_inputs([N], 3.0, seed=33)
    w, h, d = make_params([N], K, seed=34)
    jac = torch.autograd.functional.jacobian(
        lambda x, w: nflux.ops.rq_spline(x, w, h, d, inverse=inverse)[0], (x, w))
    jac_ref = torch.autograd.functional.jacobian(
        lambda x, w: reference.rq_spline(x, w, h, d, inverse=inverse)[0], (x, w))
    torch.testing.assert_close(jac, jac_ref, rtol=1e-9, atol=1e-10)
    _, l = nflux.ops.rq_spline(x, w, h, d, inverse=inverse)
    torch.testing.assert_close(jac[0], torch.diag(l.exp()), rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------
# 12. Pure-torch fallback


def test_fallback_without_extension():
    script = textwrap.dedent(
        """
        import warnings, torch, nflux
        from nflux.ops import reference
        info = nflux.build_info()
        assert info["extension_loaded"] is False, info
        assert info["cpu_kernels"] is False, info
        assert "NFLUX_DISABLE_EXTENSION" in info["extension_error"], info
        g = torch.Generator().manual_seed(0)
        x = torch.randn(37, generator=g, dtype=torch.float64) * 2
        w, h = torch.randn(2, 37, 6, generator=g, dtype=torch.float64)
        d = torch.randn(37, 5, generator=g, dtype=torch.float64)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y1, l1 = nflux.ops.rq_spline(x, w, h, d)
            y2, l2 = nflux.ops.rq_spline(y1, w, h, d, inverse=True)
        runtime = [c for c in caught if issubclass(c.category, RuntimeWarning)]
        assert len(runtime) == 1, [str(c.message) for c in caught]
        assert "reference" in str(runtime[0].message)
        yr, lr = reference.rq_spline(x, w, h, d)
        assert torch.equal(y1, yr) and torch.equal(l1, lr)
        torch.testing.assert_close(y2, x)
        torch.testing.assert_close(l2, -l1)
        print("FALLBACK-OK")
        """
    )
    env = dict(os.environ, NFLUX_DISABLE_EXTENSION="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "FALLBACK-OK" in done.stdout


# --------------------------------------------------------------------------------------------
# 13. CUDA (skipped without a GPU)

CUDA_DTYPES = [F64, F32, torch.float16, torch.bfloat16]


@pytest.mark.cuda
def test_cuda_kernels_compiled():
    assert nflux.build_info()["cuda_kernels"], "CUDA is available but nflux was built without CUDA kernels"


@pytest.mark.cuda
@pytest.mark.parametrize("K", [1, 8, 33, 200])  # K > 128 takes the workspace path
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=str)
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_cuda_matches_cpu_float64(inverse, dtype, K):
    N = 4099
    x = make_inputs([N], 3.0, dtype=dtype, seed=K)
    w, h, d = make_params([N], K, dtype=dtype, seed=K + 1)
    y, l = nflux.ops.rq_spline(*(t.cuda() for t in (x, w, h, d)), inverse=inverse)
    assert y.dtype == dtype and l.dtype == dtype and y.device.type == "cuda"
    # The CPU kernel in float64 is fed the same (rounded) values.
    exact = nflux.ops.rq_spline(x.double(), w.double(), h.double(), d.double(), inverse=inverse)
    if dtype == F64:
        torch.testing.assert_close((y.cpu(), l.cpu()), exact, rtol=1e-10, atol=1e-10)
        return
    # Kernels accumulate in float32; narrow bins make that ill-conditioned for any float32 code
    # (see test_float32_matches_float64_reference), so allow the CPU float32 kernel's own error,
    # plus rounding of the result to `dtype`.
    cpu32 = nflux.ops.rq_spline(x.float(), w.float(), h.float(), d.float(), inverse=inverse)
    eps = torch.finfo(dtype).eps
    for got, ref32, ref in zip((y, l), cpu32, exact):
        err32 = (ref32.double() - ref).abs().max()
        allowed = 4 * err32 + 1e-5 + 2 * eps * (ref.abs() + 1)
        err = (got.cpu().double() - ref).abs()
        assert torch.all(err <= allowed), (err.max().item(), err32.item())


@pytest.mark.cuda
@pytest.mark.parametrize("K", [3, 200])
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_cuda_backward_matches_reference(inverse, dtype, K):
    N = 2053
    x = make_inputs([N], 3.0, dtype=dtype, seed=K)
    w, h, d = make_params([N], K, dtype=dtype, seed=K + 2)
    gy, gl = torch.randn(N, dtype=dtype), torch.randn(N, dtype=dtype)
    got = op_grads(*(t.cuda() for t in (x, w, h, d, gy)), gl.cuda(), inverse=inverse)
    want = ref_grads(x, w, h, d, gy, gl, inverse=inverse)
    if dtype == F64:
        for a, b in zip(got, want):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-8, atol=1e-9)
        return
    # float32 gradients with K=200 (bins ~0.03 wide) are ill-conditioned for any float32 code:
    # require the CUDA kernel to be about as accurate as the CPU kernel, which shares its maths.
    cpu = op_grads(x, w, h, d, gy, gl, inverse=inverse)
    for a, c, b in zip(got, cpu, want):
        cuda_err = (a.cpu().double() - b).abs().max().item()
        cpu_err = (c.double() - b).abs().max().item()
        assert cuda_err <= 4 * cpu_err + 1e-4, (cuda_err, cpu_err)


@pytest.mark.cuda
@pytest.mark.parametrize("K", [8, 200])
def test_cuda_round_trip(K):
    N, B = 4001, 3.0
    x = torch.linspace(-B, B, N, dtype=F32, device="cuda")
    w, h, d = make_params([N], K, dtype=F32, seed=K, device="cuda")
    y, l = nflux.ops.rq_spline(x, w, h, d, tail_bound=B)
    x_back, l_back = nflux.ops.rq_spline(y, w, h, d, inverse=True, tail_bound=B)
    torch.testing.assert_close(x_back, x, rtol=0, atol=1e-5)
    torch.testing.assert_close(l_back, -l, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_cuda_opcheck(inverse):
    x = make_inputs([3, 5], 2.0, seed=35, device="cuda")
    w, h, d = make_params(x.shape, 4, seed=36, device="cuda")
    for requires_grad in (False, True):
        args = [t.clone().requires_grad_(requires_grad) for t in (x, w, h, d)]
        torch.library.opcheck(OP, raw_args(*args, inverse=inverse, tail_bound=2.0))


# --------------------------------------------------------------------------------------------
# Optional cross-check against the NSF authors' implementation (nflows)


@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_matches_nflows(inverse):
    splines = pytest.importorskip("nflows.transforms.splines.rational_quadratic")
    N, K, B = 1003, 8, 3.0
    x = make_inputs([N], B, seed=37)
    w, h, d = make_params([N], K, seed=38)
    y, l = nflux.ops.rq_spline(x, w, h, d, inverse=inverse, tail_bound=B)
    # With linear tails nflows takes the K-1 interior derivative logits and pads the boundary
    # slopes to 1 itself, like nflux.
    y_nf, l_nf = splines.unconstrained_rational_quadratic_spline(
        x, w, h, d.clone(), inverse=inverse, tails="linear", tail_bound=B)
    torch.testing.assert_close(y, y_nf, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(l, l_nf, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Every SIMD copy of the CPU loops (NFLUX_CPU_ISA caps the one picked) agrees with the reference.

_ISA_SCRIPT = """
import torch, nflux
from nflux.ops import reference
g = torch.Generator().manual_seed(0)
for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-4)):
    for K, inverse in ((8, False), (8, True), (5, False), (1, True), (21, True)):
        N = 1000 + K
        x = (torch.rand(N, generator=g, dtype=torch.float64) * 7 - 3.5).to(dtype)
        w, h = (torch.randn(N, K, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
        d = torch.randn(N, K - 1, generator=g, dtype=torch.float64).to(dtype)
        ts = [t.clone().requires_grad_() for t in (x, w, h, d)]
        y, l = nflux.ops.rq_spline(*ts, inverse=inverse)
        (y.sum() + l.sum()).backward()
        rs = [t.double().clone().requires_grad_() for t in (x, w, h, d)]
        yr, lr = reference.rq_spline(*rs, inverse=inverse)
        (yr.sum() + lr.sum()).backward()
        for a, b in zip([y, l] + [t.grad for t in ts], [yr, lr] + [t.grad for t in rs]):
            if b.numel() == 0:
                continue
            err = ((a.double() - b).abs() / (1 + b.abs())).max().item()
            assert err < tol * (1 if dtype == torch.float64 else 50), (dtype, K, inverse, err)
# +-B map onto the identity tails exactly, also where a steep knot derivative makes the inverse's
# root cancel (logits at scale 100: in float32 12-25% of rows used to miss +B by up to 2e-4).
for dtype in (torch.float32, torch.float64):
    w, h = (torch.randn(4000, 8, generator=g, dtype=torch.float64).mul(100).to(dtype) for _ in range(2))
    d = torch.randn(4000, 7, generator=g, dtype=torch.float64).mul(100).to(dtype)
    for bound in (3.0, -3.0):
        for inverse in (False, True):
            v = torch.full((4000,), bound, dtype=dtype)
            y, l = nflux.ops.rq_spline(v, w, h, d, inverse=inverse)
            assert torch.equal(y, v) and torch.all(l == 0), (dtype, bound, inverse)
            yr, lr = reference.rq_spline(v, w, h, d, inverse=inverse)  # the fallback: to rounding
            eps = torch.finfo(dtype).eps
            assert (yr - v).abs().max() <= 8 * eps and lr.abs().max() <= 64 * eps, (dtype, bound, inverse)
print("ok")
"""


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_every_cpu_isa_matches_reference(isa):
    env = {**os.environ, "NFLUX_CPU_ISA": isa}
    result = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


@native
def test_fallback_warning_names_the_dtype(monkeypatch, recwarn):
    """Half types on CPU take the reference: the warning says the dtype is why, not the device
    (which has kernels)."""
    monkeypatch.setattr(_extension, "_warned", False)
    x, w, h, d = (t.to(torch.bfloat16) for t in _good())
    nflux.ops.rq_spline(x, w, h, d)
    (warning,) = [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert "no native kernel for dtype torch.bfloat16 on 'cpu'" in str(warning.message)
