"""lu_conv1x1 (and the ActNorm fold): against the float64 reference, gradients, inverse, the
brute-force Jacobian log-determinant, bad inputs and torch.compile. Every test runs on both
paths of the [C, C] parameter work: the CPU's host loops and the ATen-composed one CUDA takes."""

from __future__ import annotations

import pytest
import torch

import nflux
from nflux import _extension
from nflux.ops import reference

pytestmark = pytest.mark.skipif(not _extension.loaded, reason="native extension not built")

SHAPES = [(5, 4), (3, 4, 3, 2)]


@pytest.fixture(autouse=True, params=["host", "composite"])
def lu_path(request):
    previous = nflux._C._set_lu_host_path(request.param == "host")
    yield request.param
    nflux._C._set_lu_host_path(previous)


def params(C, dtype=torch.float64, seed=0, bias=True, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(C, generator=g)
    lower = torch.randn(C, C, generator=g, dtype=dtype) * 0.5
    upper = torch.randn(C, C, generator=g, dtype=dtype) * 0.5
    log_scale = torch.randn(C, generator=g, dtype=dtype) * 0.3
    sign = torch.where(torch.rand(C, generator=g) < 0.5, -1.0, 1.0).to(dtype)
    b = torch.randn(C, generator=g, dtype=dtype) if bias else None
    learn = [t.requires_grad_(requires_grad) for t in (lower, upper, log_scale) + ((b,) if bias else ())]
    return perm, learn[0], learn[1], learn[2], sign, (learn[3] if bias else None)


def data(shape, dtype=torch.float64, seed=1, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype).requires_grad_(requires_grad)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("inverse", [False, True])
def test_matches_reference_float64(shape, bias, inverse):
    x, p = data(shape), params(shape[1], bias=bias)
    y, lad = nflux.ops.lu_conv1x1(x, *p, inverse=inverse)
    y_ref, lad_ref = reference.lu_conv1x1(x, *p, inverse=inverse)
    assert lad.shape == (shape[0],)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lad, lad_ref, rtol=1e-12, atol=1e-12)


def test_weight_is_permuted_lu_product():
    perm, lower, upper, log_scale, sign, _ = params(4)
    w = reference.lu_weight(perm, lower, upper, log_scale, sign)
    x = torch.eye(4, dtype=torch.float64)
    y, _ = nflux.ops.lu_conv1x1(x, perm, lower, upper, log_scale, sign)
    torch.testing.assert_close(y.T, w)  # columns of W are the images of the unit vectors
    assert torch.linalg.det(w).abs().log().item() == pytest.approx(log_scale.sum().item())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_inverse_round_trip(shape, dtype, tol):
    x, p = data(shape, dtype=dtype), params(shape[1], dtype=dtype)
    y, lad = nflux.ops.lu_conv1x1(x, *p)
    x_back, lad_inv = nflux.ops.lu_conv1x1(y, *p, inverse=True)
    torch.testing.assert_close(x_back, x, rtol=tol, atol=tol)
    torch.testing.assert_close(lad_inv, -lad)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("inverse", [False, True])
def test_gradcheck(shape, bias, inverse):
    x = data(shape, requires_grad=True)
    perm, lower, upper, log_scale, sign, b = params(shape[1], bias=bias, requires_grad=True)

    def fn(x, lower, upper, log_scale, *rest):
        return nflux.ops.lu_conv1x1(
            x, perm, lower, upper, log_scale, sign, rest[0] if rest else None, inverse=inverse
        )

    args = (x, lower, upper, log_scale) + ((b,) if bias else ())
    assert torch.autograd.gradcheck(fn, args)


def test_gradients_only_reach_the_triangles():
    x = data((3, 4, 2, 2))
    perm, lower, upper, log_scale, sign, b = params(4, requires_grad=True)
    y, lad = nflux.ops.lu_conv1x1(x, perm, lower, upper, log_scale, sign, b)
    (y.square().sum() + lad.sum()).backward()
    assert torch.all(lower.grad.triu() == 0) and torch.all(upper.grad.tril() == 0)
    assert lower.grad.tril(-1).abs().sum() > 0 and upper.grad.triu(1).abs().sum() > 0


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 2, 2)])
@pytest.mark.parametrize("inverse", [False, True])
def test_logabsdet_is_brute_force_jacobian(shape, inverse):
    x, p = data(shape), params(shape[1])
    _, lad = nflux.ops.lu_conv1x1(x, *p, inverse=inverse)
    for n in range(shape[0]):
        jac = torch.autograd.functional.jacobian(
            lambda v: nflux.ops.lu_conv1x1(v.unsqueeze(0), *p, inverse=inverse)[0].flatten(), x[n]
        )
        expected = torch.linalg.slogdet(jac.reshape(x[n].numel(), -1)).logabsdet
        torch.testing.assert_close(lad[n], expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(shape, bias):
    for inverse in (False, True):
        x = data(shape, requires_grad=True)
        p = params(shape[1], bias=bias, requires_grad=True)
        torch.library.opcheck(torch.ops.nflux.lu_conv1x1, (x, *p, inverse))


def test_actnorm_fold_equals_actnorm_then_conv():
    C = 4
    x = data((3, C, 2, 3))
    perm, lower, upper, log_scale, sign, b = params(C, requires_grad=True)
    an_ls = (torch.randn(C, dtype=torch.float64) * 0.2).requires_grad_()
    an_b = torch.randn(C, dtype=torch.float64).requires_grad_()

    actnorm = torch.exp(an_ls)[:, None, None] * (x + an_b[:, None, None])
    y_ref, lad_ref = reference.lu_conv1x1(actnorm, perm, lower, upper, log_scale, sign, b)
    lad_ref = lad_ref + x.shape[2] * x.shape[3] * an_ls.sum()
    folded = nflux.ops.fold_actnorm(perm, lower, upper, log_scale, sign, b, an_ls, an_b)
    y, lad = nflux.ops.lu_conv1x1(x, perm, lower, folded[0], folded[1], sign, folded[2])
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(lad, lad_ref)
    g = torch.autograd.grad((y.sum() + lad.sum()), (an_ls, an_b, upper))
    g_ref = torch.autograd.grad((y_ref.sum() + lad_ref.sum()), (an_ls, an_b, upper))
    for got, want in zip(g, g_ref):
        torch.testing.assert_close(got, want)


def test_non_contiguous_and_expanded_gradient():
    base = data((3, 2, 4, 5))
    x = base.transpose(1, 2)  # [3, 4, 2, 5], not contiguous
    p = params(4, requires_grad=True)
    y, lad = nflux.ops.lu_conv1x1(x, *p)
    torch.testing.assert_close(y, reference.lu_conv1x1(x, *p)[0])
    (y.sum() + lad.sum()).backward()  # the sum's expanded gradient
    assert p[1].grad is not None and torch.isfinite(p[1].grad).all()


def test_compile_fullgraph():
    x = data((4, 3, 2, 2), dtype=torch.float32, requires_grad=True)
    perm, lower, upper, log_scale, sign, b = params(3, dtype=torch.float32, requires_grad=True)

    def fn(x, lower, upper, log_scale, b):
        y, lad = nflux.ops.lu_conv1x1(x, perm, lower, upper, log_scale, sign, b)
        x_back, _ = nflux.ops.lu_conv1x1(y, perm, lower, upper, log_scale, sign, b, inverse=True)
        return y.square().sum() - lad.sum() + x_back.sum()

    args = (x, lower, upper, log_scale, b)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*args), args)
    want = torch.autograd.grad(fn(*args), args)
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("x", torch.randn(2, 4, 3), r"x must have shape \[B, C\] or \[B, C, H, W\]"),
        ("x", torch.ones(2, 4, dtype=torch.long), "x must be a floating-point"),
        ("perm", torch.arange(4, dtype=torch.int32), "perm must be an int64"),
        ("perm", torch.arange(3), r"perm must have shape \[4\]"),
        ("lower", torch.randn(4, 3), r"lower must have shape \[4, 4\]"),
        ("upper", torch.randn(4, 4, dtype=torch.float64), "upper has dtype"),
        ("log_scale", torch.randn(5), r"log_scale must have shape \[4\]"),
        ("sign", torch.ones(4, 1), r"sign must have shape \[4\]"),
        ("bias", torch.randn(3), r"bias must have shape \[4\]"),
    ],
)
def test_bad_inputs(field, value, match):
    perm, lower, upper, log_scale, sign, b = params(4, dtype=torch.float32)
    args = dict(x=torch.randn(2, 4), perm=perm, lower=lower, upper=upper, log_scale=log_scale,
                sign=sign, bias=b)
    args[field] = value
    with pytest.raises(ValueError, match=match):
        nflux.ops.lu_conv1x1(**args)


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("field", ["actnorm_log_scale", "actnorm_bias"])
def test_actnorm_arguments_are_named_in_errors(fold, field):
    perm, lower, upper, log_scale, sign, b = params(4, dtype=torch.float32)
    actnorm = dict(actnorm_log_scale=torch.zeros(4), actnorm_bias=torch.zeros(4))
    actnorm[field] = actnorm[field].double()
    with pytest.raises(ValueError, match=f"{field} has dtype torch.float64 but lower has dtype torch.float32"):
        if fold:
            nflux.ops.fold_actnorm(perm, lower, upper, log_scale, sign, b, **actnorm)
        else:
            nflux.ops.actnorm_lu_conv1x1(torch.randn(2, 4), perm, lower, upper, log_scale, sign, b, **actnorm)


def test_native_op_rejects_bad_input_too():
    perm, lower, upper, log_scale, sign, b = params(4, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"lower must have shape \[4, 4\]"):
        torch.ops.nflux.lu_conv1x1(torch.randn(2, 4), perm, lower[:3], upper, log_scale, sign, b, False)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("inputs", ["shift", "log_scale", "both"])
def test_input_shift_and_scale_match_reference_and_gradcheck(shape, bias, inverse, inputs):
    x = data(shape, requires_grad=True)
    perm, lower, upper, log_scale, sign, b = params(shape[1], bias=bias, requires_grad=True)
    shift = data((shape[1],), seed=5, requires_grad=True) if inputs != "log_scale" else None
    in_scale = (data((shape[1],), seed=6) * 0.3).requires_grad_() if inputs != "shift" else None
    extra = dict(input_shift=shift, input_log_scale=in_scale)
    y, lad = nflux.ops.lu_conv1x1(x, perm, lower, upper, log_scale, sign, b, inverse=inverse, **extra)
    y_ref, lad_ref = reference.lu_conv1x1(x, perm, lower, upper, log_scale, sign, b, inverse=inverse, **extra)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lad, lad_ref, rtol=1e-12, atol=1e-12)
    if in_scale is not None:  # the reference's own fold: ActNorm's scale applied to the input first
        per_channel = (lambda v: v) if x.dim() == 2 else (lambda v: v[:, None, None])
        pixels = 1 if x.dim() == 2 else x.shape[2] * x.shape[3]
        shifted = x if shift is None else x + per_channel(shift)
        if not inverse:
            y_two, lad_two = reference.lu_conv1x1(per_channel(torch.exp(in_scale)) * shifted, perm, lower, upper,
                                                  log_scale, sign, b)
            torch.testing.assert_close(y_ref, y_two)
            torch.testing.assert_close(lad_ref, lad_two + pixels * in_scale.sum())

    def fn(x, lower, upper, log_scale, *rest):
        rest = list(rest)
        s = rest.pop(0) if shift is not None else None
        c = rest.pop(0) if in_scale is not None else None
        return nflux.ops.lu_conv1x1(
            x, perm, lower, upper, log_scale, sign, rest[0] if rest else None, inverse=inverse,
            input_shift=s, input_log_scale=c,
        )

    args = (x, lower, upper, log_scale) + tuple(t for t in (shift, in_scale, b) if t is not None)
    assert torch.autograd.gradcheck(fn, args)
    torch.library.opcheck(torch.ops.nflux.lu_conv1x1, (x, perm, lower, upper, log_scale, sign, b, inverse, shift, in_scale))


def test_input_log_scale_is_checked():
    perm, lower, upper, log_scale, sign, b = params(4)
    with pytest.raises(ValueError, match=r"input_log_scale must have shape \[4\]"):
        nflux.ops.lu_conv1x1(data((2, 4)), perm, lower, upper, log_scale, sign, b, input_log_scale=log_scale[:3])
    with pytest.raises(RuntimeError, match=r"input_log_scale must have shape \[4\]"):
        torch.ops.nflux.lu_conv1x1(data((2, 4)), perm, lower, upper, log_scale, sign, b, False, None, log_scale[:3])


def test_perm_entries_out_of_range_are_refused():
    perm, lower, upper, log_scale, sign, b = params(4)
    # The host path names the problem; the composite one is index_select's IndexError.
    with pytest.raises((RuntimeError, IndexError), match="permutation|out of range"):
        torch.ops.nflux.lu_conv1x1(data((2, 4)), torch.tensor([0, 1, 2, 4]), lower, upper, log_scale, sign, b, False)


def test_repeated_perm_entries_are_refused_on_the_host(lu_path):
    # W = M[perm] would be singular while logabsdet still said sum(log_scale), and the lower
    # gradient lost one of the repeated rows. The host path reads perm anyway, so it checks it;
    # the composite path (CUDA) cannot without a device sync.
    if lu_path != "host":
        pytest.skip("checked on the host path only")
    perm, lower, upper, log_scale, sign, b = params(4)
    with pytest.raises(RuntimeError, match="permutation of range\\(4\\), got a repeat of 1"):
        torch.ops.nflux.lu_conv1x1(data((2, 4)), torch.tensor([0, 1, 1, 3]), lower, upper, log_scale, sign, b, False)


def test_ignored_upper_entries_do_not_reach_the_input_scale_gradient():
    # Only U's strict upper triangle enters W; an inf below it gave a NaN input_log_scale
    # gradient on the composite path (inf * 0).
    perm, lower, upper, log_scale, sign, b = params(3)
    upper = upper.clone()
    upper[1, 0] = upper[2, 2] = float("inf")
    in_scale = (data((3,), seed=9) * 0.3).requires_grad_()
    y, lad = nflux.ops.lu_conv1x1(data((4, 3)), perm, lower, upper, log_scale, sign, b, input_log_scale=in_scale)
    (g,) = torch.autograd.grad(y.sum() + lad.sum(), in_scale)
    finite_upper = torch.where(torch.isfinite(upper), upper, 0)
    y_ref, lad_ref = nflux.ops.lu_conv1x1(data((4, 3)), perm, lower, finite_upper, log_scale, sign, b,
                                          input_log_scale=in_scale)
    (g_ref,) = torch.autograd.grad(y_ref.sum() + lad_ref.sum(), in_scale)
    torch.testing.assert_close(g, g_ref)
    # The reference (the fallback and the double backward's formula) folds the same way.
    y_r, lad_r = reference.lu_conv1x1(data((4, 3)), perm, lower, upper, log_scale, sign, b, input_log_scale=in_scale)
    (g_r,) = torch.autograd.grad(y_r.sum() + lad_r.sum(), in_scale)
    torch.testing.assert_close(g_r, g_ref)


@pytest.mark.parametrize("shape", SHAPES)
def test_actnorm_lu_conv1x1_equals_actnorm_then_conv(shape):
    C = shape[1]
    x = data(shape, requires_grad=True)
    perm, lower, upper, log_scale, sign, b = params(C, requires_grad=True)
    an_ls = (torch.randn(C, dtype=torch.float64) * 0.2).requires_grad_()
    an_b = torch.randn(C, dtype=torch.float64).requires_grad_()
    per_channel = (lambda v: v) if x.dim() == 2 else (lambda v: v[:, None, None])
    pixels = 1 if x.dim() == 2 else x.shape[2] * x.shape[3]
    actnorm = per_channel(torch.exp(an_ls)) * (x + per_channel(an_b))
    y_ref, lad_ref = reference.lu_conv1x1(actnorm, perm, lower, upper, log_scale, sign, b)
    lad_ref = lad_ref + pixels * an_ls.sum()
    y, lad = nflux.ops.actnorm_lu_conv1x1(x, perm, lower, upper, log_scale, sign, b, an_ls, an_b)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(lad, lad_ref)
    leaves = (x, an_ls, an_b, lower, upper, log_scale, b)
    g = torch.autograd.grad((y * y_ref.detach()).sum() + lad.sum(), leaves)
    g_ref = torch.autograd.grad((y_ref * y_ref.detach()).sum() + lad_ref.sum(), leaves)
    for got, want in zip(g, g_ref):
        torch.testing.assert_close(got, want)
    x_back, lad_inv = nflux.ops.actnorm_lu_conv1x1(y, perm, lower, upper, log_scale, sign, b, an_ls, an_b, inverse=True)
    torch.testing.assert_close(x_back, x)
    torch.testing.assert_close(lad_inv, -lad)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("inverse", [False, True])
def test_vmap_matches_loop(shape, inverse):
    V = 3
    x = data((V, *shape))
    perm, lower, upper, log_scale, sign, bias = params(shape[1])
    shift, in_scale = data((shape[1],), seed=2), data((shape[1],), seed=3) * 0.3

    def op(a, lo, up):
        return nflux.ops.lu_conv1x1(a, perm, lo, up, log_scale, sign, bias, inverse=inverse, input_shift=shift,
                                    input_log_scale=in_scale)

    # Only the data batched (one W for all), then the factors batched too (one W each).
    y, lad = torch.vmap(op, in_dims=(0, None, None))(x, lower, upper)
    lowers = torch.stack([lower * (1 + 0.5 * v) for v in range(V)])
    y_p, lad_p = torch.vmap(op, in_dims=(0, 0, None))(x, lowers, upper)
    for v in range(V):
        y_v, lad_v = op(x[v], lower, upper)
        torch.testing.assert_close(y[v], y_v)
        torch.testing.assert_close(lad[v], lad_v)
        y_v, lad_v = op(x[v], lowers[v], upper)
        torch.testing.assert_close(y_p[v], y_v)
        torch.testing.assert_close(lad_p[v], lad_v)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_scale", [False, True])
def test_vmap_backward_matches_loop(bias, with_scale):
    V, shape = 3, (4, 3, 2, 2)
    x, g, gl = data((V, *shape)), data((V, *shape), seed=3), data((V, shape[0]), seed=4)
    perm, lower, upper, log_scale, sign, b = params(shape[1], bias=bias)
    in_scale = data((shape[1],), seed=5) * 0.3 if with_scale else None
    op = torch.ops.nflux.lu_conv1x1_backward
    for inverse in (False, True):
        batched = torch.vmap(
            lambda a, c, d: op(a, c, d, perm, lower, upper, log_scale, sign, b, inverse, None, in_scale))(g, gl, x)
        for v in range(V):
            single = op(g[v], gl[v], x[v], perm, lower, upper, log_scale, sign, b, inverse, None, in_scale)
            for i in range(4):
                torch.testing.assert_close(batched[i][v], single[i])
            for i, present in ((4, bias), (5, False), (6, with_scale)):
                if present:
                    torch.testing.assert_close(batched[i][v], single[i])
                else:
                    assert batched[i].numel() == 0


def test_vmap_output_backpropagates_like_loop():
    # Autograd outside vmap (torch.func.grad cannot enter a C++ autograd::Function).
    x = data((3, 5, 4), requires_grad=True)
    perm, lower, upper, log_scale, sign, bias = params(4, requires_grad=True)
    learn = (x, lower, upper, log_scale, bias)

    def op(a):
        return nflux.ops.lu_conv1x1(a, perm, lower, upper, log_scale, sign, bias)

    def loss(y, lad):
        return y.square().sum() - lad.sum()

    got = torch.autograd.grad(loss(*torch.vmap(op)(x)), learn)
    outs = [op(x[v]) for v in range(3)]
    want = torch.autograd.grad(loss(torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])), learn)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("inverse", [False, True])
def test_actnorm_step_without_the_extension_matches_native(monkeypatch, inverse):
    # The reference fallback takes input_log_scale too (ActNorm's scale, folded in the op).
    C = 4
    x = data((3, C, 2, 2))
    perm, lower, upper, log_scale, sign, b = params(C)
    an_ls, an_b = data((C,), seed=7) * 0.2, data((C,), seed=8)
    native = nflux.ops.actnorm_lu_conv1x1(x, perm, lower, upper, log_scale, sign, b, an_ls, an_b, inverse=inverse)
    monkeypatch.setattr(_extension, "loaded", False)
    monkeypatch.setattr(_extension, "_warned", True)
    fallback = nflux.ops.actnorm_lu_conv1x1(x, perm, lower, upper, log_scale, sign, b, an_ls, an_b, inverse=inverse)
    for got, want in zip(fallback, native):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
