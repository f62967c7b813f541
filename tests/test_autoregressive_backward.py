"""The native backward of made_inverse (one reverse sweep over the degrees + one GEMM per layer)
against finite differences and against autograd through the differentiable reference."""

import pytest
import torch

import nflux
from nflux.ops import reference
from test_autoregressive_inverse import SPLINE, _args, _kw, _made

OPTIONS = tuple(SPLINE.values())


def _leaves(made, y, context):
    y, weights, biases, degrees, terms = _args(made, y, context)
    leaves = [t.detach().requires_grad_() for t in (y, *weights, *biases, *terms)]
    return leaves, len(weights), degrees


def _split(t, n):
    return t[0], list(t[1 : 1 + n]), list(t[1 + n : 1 + 2 * n]), list(t[1 + 2 * n :])


def _grads(fn, leaves, n, degrees, kw, seed=0):
    """Gradients of a random linear function of (x, logabsdet), so both cotangents matter."""
    y, w, b, c = _split(leaves, n)
    x, lad = fn(y, w, b, degrees, c, **kw)
    g = torch.Generator().manual_seed(seed)
    gx = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.dtype)
    gl = torch.randn(lad.shape, generator=g, dtype=torch.float64).to(lad.dtype)
    return torch.autograd.grad((x, lad), leaves, (gx, gl), allow_unused=True)


def _reference(y, w, b, degrees, c, *, residual, activation, transformer, **spline):
    spline = {**SPLINE, **spline}
    return reference.made_inverse(y, w, b, degrees, c, residual, activation, transformer, *spline.values())


CASES = [  # transformer, residual, ordering, context, activation
    ("affine", False, "natural", False, "relu"),
    ("affine", True, "random", True, "tanh"),
    ("affine", False, "reversed", True, "gelu"),
    ("rq_spline", False, "random", True, "elu"),
    ("rq_spline", True, "reversed", True, "relu"),
    ("rq_spline", True, [3, 1, 4, 0, 2], False, "gelu"),
]


@pytest.mark.parametrize("transformer,residual,ordering,context,activation", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_native_gradients_equal_reference(transformer, residual, ordering, context, activation, dtype):
    made = _made(D=5, transformer=transformer, residual=residual, ordering=ordering, context=context,
                 activation=activation, dtype=dtype)
    g = torch.Generator().manual_seed(2)
    y = torch.randn(150, 5, generator=g, dtype=dtype) * 1.5  # three 64-row tiles, the last ragged
    c = torch.randn(150, 3, generator=g, dtype=dtype) if context else None
    leaves, n, degrees = _leaves(made, y, c)
    kw = _kw(made, transformer)
    got = _grads(nflux.ops.made_inverse, leaves, n, degrees, kw)
    # the reference in float64 is the truth for both dtypes
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    want = _grads(_reference, leaves64, n, degrees, kw)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-4, rtol=2e-4)
    for i, (a, b) in enumerate(zip(got, want)):
        b = torch.zeros_like(leaves64[i]) if b is None else b
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda m: f"leaf {i}: {m}")


@pytest.mark.parametrize("transformer", ["affine", "rq_spline"])
@pytest.mark.parametrize("residual", [False, True])
def test_gradcheck_with_context(transformer, residual):
    made = _made(D=4, hidden=(6, 6), transformer=transformer, residual=residual, context=True,
                 ordering="random", activation="tanh")
    g = torch.Generator().manual_seed(3)
    y = torch.randn(5, 4, generator=g, dtype=torch.float64)
    c = torch.randn(5, 3, generator=g, dtype=torch.float64)
    leaves, n, degrees = _leaves(made, y, c)
    kw = _kw(made, transformer)

    def fn(*t):
        y, w, b, c = _split(t, n)
        return nflux.ops.made_inverse(y, w, b, degrees, c, **kw)

    assert torch.autograd.gradcheck(fn, leaves)


def test_double_backward():
    """create_graph=True takes the differentiable reference backward: second derivatives exist."""
    made = _made(D=3, hidden=(5, 5), transformer="affine", context=True, activation="tanh")
    y = torch.randn(4, 3, dtype=torch.float64)
    c = torch.randn(4, 3, dtype=torch.float64)
    leaves, n, degrees = _leaves(made, y, c)
    kw = _kw(made, "affine")

    def fn(*t):
        y, w, b, c = _split(t, n)
        return nflux.ops.made_inverse(y, w, b, degrees, c, **kw)

    assert torch.autograd.gradgradcheck(fn, leaves)


def test_unread_units_get_zero_gradient():
    """Hidden units of degree >= D feed nothing: their weights' gradients are exactly 0, and the
    masked-out entries of every weight get 0 although the stored weights are unmasked."""
    made = _made(D=4, hidden=(6, 9), activation="elu")
    y = torch.randn(8, 4, dtype=torch.float64)
    leaves, n, degrees = _leaves(made, y, None)
    degrees = list(degrees)
    degrees[4], degrees[5] = 0, 4  # layer 0: one input-independent unit, one never read
    kw = _kw(made, "affine")
    got = _grads(nflux.ops.made_inverse, leaves, n, degrees, kw)
    want = _grads(_reference, leaves, n, degrees, kw)
    for a, b, t in zip(got, want, leaves):
        torch.testing.assert_close(a, torch.zeros_like(t) if b is None else b)
    assert torch.all(got[1][1] == 0)  # the unit of degree 4
    for i, mask in enumerate(_masks(degrees, [w.shape[0] for w in made.weights], P=2)):
        assert torch.all(got[1 + i][~mask] == 0)


def _masks(degrees, widths, P):
    """MADE masks implied by the degrees: a hidden unit of degree k sees inputs and units of
    degree <= k; input i's outputs see units of degree < its own."""
    D = len(degrees) - sum(widths[:-1])
    layers, start = [torch.tensor(degrees[:D])], D
    for width in widths[:-1]:
        layers.append(torch.tensor(degrees[start : start + width]))
        start += width
    masks = [layers[i + 1][:, None] >= layers[i][None, :] for i in range(len(widths) - 1)]
    return masks + [layers[0].repeat_interleave(P)[:, None] > layers[-1][None, :]]


def test_empty_batch_backward():
    made = _made(D=3, context=True)
    y = torch.zeros(0, 3, dtype=torch.float64)
    leaves, n, degrees = _leaves(made, y, torch.zeros(0, 3, dtype=torch.float64))
    got = _grads(nflux.ops.made_inverse, leaves, n, degrees, _kw(made, "affine"))
    for a, t in zip(got, leaves):
        torch.testing.assert_close(a, torch.zeros_like(t))


@pytest.mark.parametrize("transformer,residual,context", [("affine", False, True), ("rq_spline", True, True)])
def test_opcheck_backward_op(transformer, residual, context):
    made = _made(D=3, hidden=(5, 5), transformer=transformer, residual=residual, context=context,
                 dtype=torch.float32)
    y, c = torch.randn(4, 3), torch.randn(4, 3)
    y, weights, biases, degrees, terms = _args(made, y, c)
    options = (residual, made.activation, transformer, *OPTIONS)
    args = (torch.randn(4, 3), torch.randn(4), y, [w.detach() for w in weights], [b.detach() for b in biases],
            degrees, [t.detach() for t in terms], *options)
    torch.library.opcheck(torch.ops.nflux.made_inverse_backward.default, args)


def test_training_step_compiles():
    """An IAF-style loss (density through made_inverse) trains under torch.compile(fullgraph=True)
    with the native backward, and its gradients match eager."""
    made = _made(D=4, transformer="rq_spline", residual=True, context=True, dtype=torch.float32)
    y, c = torch.randn(16, 4), torch.randn(16, 3)

    def loss(y, c):
        x, lad = made.inverse_autoregressive(y, "rq_spline", c, **SPLINE)
        return (0.5 * x.pow(2).sum(-1) - lad).mean()

    eager = torch.autograd.grad(loss(y, c), list(made.parameters()))
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True)(y, c), list(made.parameters()))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)
