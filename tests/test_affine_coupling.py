"""affine_coupling: the native op against the float64 reference, its gradients, inverse, the
brute-force Jacobian, bad inputs and torch.compile."""

from __future__ import annotations

import itertools

import pytest
import torch

import nflux
from nflux import _extension
from nflux.ops import reference

pytestmark = pytest.mark.skipif(not _extension.cpu_kernels, reason="native CPU kernels not built")

VARIANTS = [  # (scale_logits given, scale, clamp)
    (False, "exp", None),
    (True, "exp", None),
    (True, "exp", 2.0),
    (True, "sigmoid", None),
    (True, "sigmoid", 1.5),
]
SHAPES = [(6, 5), (3, 4, 5, 3), (5,), (4, 37)]  # 37: not a multiple of the kernel's lanes


def make(shape, dtype=torch.float64, logits=True, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape, generator=g, dtype=dtype) for _ in range(3)]
    tensors[2] = tensors[2] * 2  # logits over a range that exercises the clamp and sigmoid
    tensors = [t.requires_grad_(requires_grad) for t in tensors]
    return tensors[0], tensors[1], (tensors[2] if logits else None)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("inverse", [False, True])
def test_matches_reference_float64(shape, variant, inverse):
    has_logits, scale, clamp = variant
    x, shift, logits = make(shape, logits=has_logits)
    y, lad = nflux.ops.affine_coupling(x, shift, logits, scale=scale, clamp=clamp, inverse=inverse)
    y_ref, lad_ref = reference.affine_coupling(x, shift, logits, scale=scale, clamp=clamp, inverse=inverse)
    assert lad.shape == (shape[0],)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lad, lad_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_inverse_round_trip(variant, dtype, tol):
    has_logits, scale, clamp = variant
    x, shift, logits = make((8, 3, 4, 4), dtype=dtype, logits=has_logits)
    y, lad = nflux.ops.affine_coupling(x, shift, logits, scale=scale, clamp=clamp)
    x_back, lad_inv = nflux.ops.affine_coupling(y, shift, logits, scale=scale, clamp=clamp, inverse=True)
    torch.testing.assert_close(x_back, x, rtol=tol, atol=tol)
    torch.testing.assert_close(lad_inv, -lad, rtol=tol, atol=tol)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("inverse", [False, True])
def test_gradcheck(variant, inverse):
    has_logits, scale, clamp = variant
    inputs = make((3, 2, 5), logits=has_logits, requires_grad=True)
    args = [t for t in inputs if t is not None]

    def fn(*tensors):
        logits = tensors[2] if has_logits else None
        return nflux.ops.affine_coupling(
            tensors[0], tensors[1], logits, scale=scale, clamp=clamp, inverse=inverse
        )

    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("inverse", [False, True])
def test_logabsdet_is_brute_force_jacobian(variant, inverse):
    has_logits, scale, clamp = variant
    x, shift, logits = make((2, 3, 2), logits=has_logits)
    for b in range(x.shape[0]):
        def row(v, b=b):
            out, _ = nflux.ops.affine_coupling(
                v.unsqueeze(0), shift[b : b + 1], None if logits is None else logits[b : b + 1],
                scale=scale, clamp=clamp, inverse=inverse,
            )
            return out.flatten()

        jac = torch.autograd.functional.jacobian(row, x[b])
        _, lad = nflux.ops.affine_coupling(x, shift, logits, scale=scale, clamp=clamp, inverse=inverse)
        expected = torch.linalg.slogdet(jac.reshape(x[b].numel(), -1)).logabsdet
        torch.testing.assert_close(lad[b], expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", VARIANTS)
def test_opcheck(variant):
    has_logits, scale, clamp = variant
    kind = 0 if not has_logits else {"exp": 1, "sigmoid": 2}[scale]
    for inverse, dtype in itertools.product([False, True], [torch.float32, torch.float64]):
        x, shift, logits = make((4, 3, 2, 2), dtype=dtype, logits=has_logits, requires_grad=True)
        torch.library.opcheck(torch.ops.nflux.affine_coupling, (x, shift, logits, kind, clamp, inverse))


def test_non_contiguous_inputs():
    x, shift, logits = make((6, 10))
    xt, st, lt = (t.t() for t in make((10, 6)))  # transposed views
    for args in ((xt, st, lt), (x[:, ::2], shift[:, ::2], logits[:, ::2])):
        y, lad = nflux.ops.affine_coupling(*args, scale="sigmoid", clamp=3.0)
        y_ref, lad_ref = reference.affine_coupling(*args, scale="sigmoid", clamp=3.0)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(lad, lad_ref)


def test_expanded_gradient_and_empty_batch():
    x, shift, logits = make((5, 4), requires_grad=True)
    y, lad = nflux.ops.affine_coupling(x, shift, logits)
    (y.sum() + lad.sum()).backward()  # sum's gradient arrives as an expanded (stride 0) tensor
    torch.testing.assert_close(shift.grad, torch.ones_like(shift))
    torch.testing.assert_close(logits.grad, (x * torch.exp(logits)).detach() + 1)
    y0, lad0 = nflux.ops.affine_coupling(*make((0, 3)))
    assert y0.shape == (0, 3) and lad0.shape == (0,)


@pytest.mark.parametrize("variant", VARIANTS)
def test_grad_shift_is_grad_y_in_the_forward_direction(variant):
    # The C++ autograd kernel hands grad_y on as dL/dshift (and as dL/dx for the additive
    # coupling); the backward op leaves grad_shift out (empty) in that direction.
    has_logits, scale, clamp = variant
    x, shift, logits = make((4, 7), logits=has_logits, requires_grad=True)
    y, lad = nflux.ops.affine_coupling(x, shift, logits, scale=scale, clamp=clamp)
    grad_y = torch.randn_like(y)
    shift_grad, *rest = torch.autograd.grad((y * grad_y).sum() + lad.sum(), [shift, x])
    torch.testing.assert_close(shift_grad, grad_y, rtol=0, atol=0)
    if not has_logits:
        torch.testing.assert_close(rest[0], grad_y, rtol=0, atol=0)
    kind = 0 if not has_logits else {"exp": 1, "sigmoid": 2}[scale]
    args = (grad_y, torch.randn(4, dtype=x.dtype), x.detach(), shift.detach(),
            None if logits is None else logits.detach(), kind, clamp)
    assert torch.ops.nflux.affine_coupling_backward(*args, False)[1].shape == (0,)
    assert torch.ops.nflux.affine_coupling_backward(*args, True)[1].shape == x.shape
    # The additive coupling's forward-direction backward is grad_y twice: no kernel runs.
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y, lad = nflux.ops.affine_coupling(x, shift, logits, scale=scale, clamp=clamp)
        torch.autograd.grad((y, lad), [x, shift], (grad_y, torch.ones_like(lad)))
    ran = {e.name for e in prof.events()}
    assert ("nflux::affine_coupling_backward" in ran) == has_logits


def test_autograd_kernel_is_cpp_and_handles_partial_outputs():
    # Only y, or only logabsdet, feeding the loss: the missing gradient arrives as zeros.
    x, shift, logits = make((3, 5), requires_grad=True)
    y, lad = nflux.ops.affine_coupling(x, shift, logits, scale="sigmoid", clamp=2.0)
    y_ref, lad_ref = reference.affine_coupling(x, shift, logits, scale="sigmoid", clamp=2.0)
    for out, ref in ((y.sum(), y_ref.sum()), (lad.sum(), lad_ref.sum())):
        got = torch.autograd.grad(out, [x, shift, logits], retain_graph=True, allow_unused=True)
        want = torch.autograd.grad(ref, [x, shift, logits], retain_graph=True, allow_unused=True)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, torch.zeros_like(x) if w is None else w)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("nflux::affine_coupling", "Autograd")
    assert "AffineCouplingFunction" in y.grad_fn.name()


def test_vmap_backward_matches_loop():
    for inverse, logits_given in itertools.product([False, True], [False, True]):
        x, shift, logits = make((3, 4, 5), logits=logits_given)
        g = torch.randn(3, 4, 5, dtype=x.dtype)
        gl = torch.randn(3, 4, dtype=x.dtype)
        kind = 1 if logits_given else 0
        op = torch.ops.nflux.affine_coupling_backward
        if logits_given:
            batched = torch.vmap(lambda a, b, c, d, e: op(a, b, c, d, e, kind, None, inverse))(
                g, gl, x, shift, logits
            )
        else:
            batched = torch.vmap(lambda a, b, c, d: op(a, b, c, d, None, kind, None, inverse))(g, gl, x, shift)
        for v in range(3):
            single = op(g[v], gl[v], x[v], shift[v], logits[v] if logits_given else None, kind, None, inverse)
            torch.testing.assert_close(batched[0][v], single[0])
            if inverse:
                torch.testing.assert_close(batched[1][v], single[1])
            else:
                assert batched[1].numel() == 0
            if logits_given:
                torch.testing.assert_close(batched[2][v], single[2])


def test_vmap_matches_loop():
    x, shift, logits = make((3, 4, 5))
    y, lad = torch.vmap(lambda a, b, c: nflux.ops.affine_coupling(a, b, c, scale="sigmoid"))(x, shift, logits)
    for v in range(3):
        y_v, lad_v = nflux.ops.affine_coupling(x[v], shift[v], logits[v], scale="sigmoid")
        torch.testing.assert_close(y[v], y_v)
        torch.testing.assert_close(lad[v], lad_v)


def test_compile_fullgraph():
    x, shift, logits = make((4, 6), dtype=torch.float32, requires_grad=True)

    def fn(a, b, c):
        y, lad = nflux.ops.affine_coupling(a, b, c, scale="exp", clamp=2.0)
        return (y.square().sum() - lad.sum())

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss = compiled(x, shift, logits)
    grads = torch.autograd.grad(loss, (x, shift, logits))
    expected = torch.autograd.grad(fn(x, shift, logits), (x, shift, logits))
    torch.testing.assert_close(loss, fn(x, shift, logits))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(shift=torch.randn(4, 5)), "shift must have the shape of x"),
        (dict(scale_logits=torch.randn(4, 2)), "scale_logits must have the shape of x"),
        (dict(shift=torch.randn(4, 3, dtype=torch.float64)), "shift has dtype"),
        (dict(scale_logits=torch.randn(4, 3, dtype=torch.float64)), "scale_logits has dtype"),
        (dict(x=torch.ones(4, 3, dtype=torch.long)), "x must be a floating-point"),
        (dict(x=torch.tensor(1.0), shift=torch.tensor(1.0)), "x must have a batch dimension"),
        (dict(scale="softplus"), "scale must be one of"),
        (dict(clamp=0.0), "clamp must be positive"),
        (dict(clamp=float("inf")), "clamp must be positive and finite"),
        # 1 / clamp overflows float32 (s = 0 then gave 0 * inf = NaN); clamp itself too.
        (dict(clamp=1e-40), "1 / clamp finite in float32"),
        (dict(clamp=2.94e-39), "1 / clamp finite in float32"),  # subnormal: 1 / clamp is inf
        (dict(clamp=1e39), "1 / clamp finite in float32"),
    ],
)
def test_bad_inputs(kwargs, match):
    args = dict(x=torch.randn(4, 3), shift=torch.randn(4, 3), scale_logits=torch.randn(4, 3))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        nflux.ops.affine_coupling(**args)


def test_native_op_rejects_bad_input_too():
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="1 / clamp finite"):
        torch.ops.nflux.affine_coupling(x, x, x, 1, 1e-40, False)
    with pytest.raises(RuntimeError, match="shift must have the shape of x"):
        torch.ops.nflux.affine_coupling(x, torch.randn(4, 2), None, 0, None, False)
    with pytest.raises(RuntimeError, match="scale_logits is missing"):
        torch.ops.nflux.affine_coupling(x, x, None, 1, None, False)


@pytest.mark.skipif(not (torch.cuda.is_available() and _extension.cuda_kernels), reason="no CUDA kernels")
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5),
                                       (torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_cuda_matches_reference(variant, dtype, tol):
    has_logits, scale, clamp = variant
    for inverse in (False, True):
        x, shift, logits = make((6, 3, 5, 7), logits=has_logits, requires_grad=True)
        dev = [None if t is None else t.detach().to("cuda", dtype).requires_grad_() for t in (x, shift, logits)]
        y, lad = nflux.ops.affine_coupling(*dev, scale=scale, clamp=clamp, inverse=inverse)
        y_ref, lad_ref = reference.affine_coupling(x, shift, logits, scale=scale, clamp=clamp, inverse=inverse)
        torch.testing.assert_close(y.double().cpu(), y_ref.detach(), rtol=tol, atol=tol * 10)
        torch.testing.assert_close(lad.double().cpu(), lad_ref.detach(), rtol=tol, atol=tol * 100)
        (y.double().square().sum() + lad.double().sum()).backward()
        (y_ref.square().sum() + lad_ref.sum()).backward()
        for d, r in zip(dev, (x, shift, logits)):
            if r is not None:
                torch.testing.assert_close(d.grad.double().cpu(), r.grad, rtol=tol * 10, atol=tol * 100)


@pytest.mark.parametrize("scale", ["exp", "sigmoid"])
def test_soft_clamp_float32_across_branches_and_edges(scale):
    # The CPU float kernel's tanh is a series below |s / clamp| = 1/4 and an exp form above it:
    # a dense sweep over both branches and the edges, against the float64 reference.
    clamp = 2.0
    s = torch.cat([torch.linspace(-30, 30, 4001), torch.linspace(-0.6, 0.6, 4001),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-8, 0.5, -0.5, float("inf"), -float("inf")])])
    x, shift = torch.randn(s.shape), torch.randn(s.shape)
    args = [t[None].clone().requires_grad_(True) for t in (x, shift, s)]
    y, lad = nflux.ops.affine_coupling(*args, scale=scale, clamp=clamp)
    (y.sum() + lad.sum()).backward()
    ref_args = [t.detach().double().requires_grad_(True) for t in args]
    y_ref, lad_ref = reference.affine_coupling(*ref_args, scale=scale, clamp=clamp)
    (y_ref.sum() + lad_ref.sum()).backward()
    torch.testing.assert_close(y, y_ref.float(), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(lad, lad_ref.float(), rtol=1e-5, atol=1e-3)  # a float sum of 8000 terms
    # d log scale / d s carries 1 - tanh^2, which cancels in float for large |s / clamp|.
    for got, want in zip(args, ref_args):
        torch.testing.assert_close(got.grad, want.grad.float(), rtol=1e-5, atol=1e-5)
    nan = nflux.ops.affine_coupling(x[:3][None], shift[:3][None], torch.tensor([[0.1, float("nan"), 3.0]]),
                                    scale=scale, clamp=clamp)[0]
    assert nan.isnan().tolist() == [[False, True, False]]


def test_float_exp_scale_over_the_whole_range():
    # y = 1 * exp(s) + 0 exposes the CPU kernels' polynomial exp (no libm call) at every
    # magnitude: within 2 ulp of float64 exp rounded to float wherever that is a normal float
    # above ~1.7e-38, inf past the top, 0 below (a flush, not denormals), NaN kept.
    s = torch.cat([torch.linspace(-120, 95, 200001), torch.tensor([
        88.72283, 88.722839, 88.7229, 89.0, 1e30, -1e30, -86.9, -87.0, -87.3, -100.0, -103.0,
        0.0, -0.0, 1e-40, float("inf"), -float("inf"), float("nan")])])
    x, shift = torch.ones(1, s.numel()), torch.zeros(1, s.numel())
    y, lad = nflux.ops.affine_coupling(x, shift, s[None])
    y_inv, _ = nflux.ops.affine_coupling(x, shift, s[None], inverse=True)  # x * exp(-s)
    for got, logit in ((y[0], s), (y_inv[0], -s)):
        want = torch.exp(logit.double())
        normal = (want >= 1.7e-38) & (want <= torch.finfo(torch.float32).max)
        ulp = torch.finfo(torch.float32).eps * want[normal]
        assert ((got[normal].double() - want[normal]).abs() <= 2 * ulp).all()
        assert got[want > torch.finfo(torch.float32).max].isinf().all()
        tiny = want < 1.7e-38
        assert ((got[tiny] == 0) | ((got[tiny].double() - want[tiny]).abs() <= 2 * 2.0**-149 * 2**23)).all()
        assert got[logit.isnan()].isnan().all()
    assert lad.isnan().all()  # the row holds a NaN logit


def test_sigmoid_inverse_scale_where_the_scale_is_tiny():
    # 1 / sigmoid(v) for v = s + 2 in (-88.7, -87.3]: the scale exp(v) / (1 + exp(v)) is below
    # the CPU exp's flush to 0, its reciprocal finite. It was (1 + e) / e with e flushed: inf,
    # and NaN where y == shift. Compared with float64 rounded to float32.
    s = torch.tensor([[-89.0, -89.0, -90.0, -88.0, -85.0, -89.5, -90.6]])
    y = torch.tensor([[0.5, 1.0, 1.0, -1.0, 2.0, 1e-30, 2.0]])
    shift = torch.full_like(y, 0.5)
    x, lad = nflux.ops.affine_coupling(y, shift, s, scale="sigmoid", inverse=True)
    want = (y.double() - shift.double()) * (1 + torch.exp(-(s.double() + 2)))
    finite = want.abs() <= torch.finfo(torch.float32).max
    torch.testing.assert_close(x[finite], want[finite].float(), rtol=4e-7, atol=0)
    assert x[~finite].isinf().all() and (x[~finite].sign() == want[~finite].sign()).all()
    torch.testing.assert_close(lad.double(), -torch.nn.functional.logsigmoid(s.double() + 2).sum(1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("scale", ["exp", "sigmoid"])
@pytest.mark.parametrize("inverse", [False, True])
def test_logabsdet_gradient_alone_where_y_overflows(scale, inverse):
    """With y unused its cotangent is zero, and the gradient is that of logabsdet alone, as in the
    reference (whose graph never visits y), even where exp(s) or (y - shift) / scale is inf."""
    s = torch.tensor([[100.0, -100.0, 95.0, -200.0, 0.5]])
    x, shift = torch.full_like(s, 0.7), torch.full_like(s, 0.3)
    grads = []
    for fn in (nflux.ops.affine_coupling, reference.affine_coupling):
        leaves = [t.clone().requires_grad_() for t in (x, shift, s)]
        _, lad = fn(*leaves, scale=scale, inverse=inverse)
        grads.append(torch.autograd.grad(lad.sum(), leaves, materialize_grads=True))
    for got, want in zip(*grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)
