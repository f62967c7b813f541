import pytest
import torch

import nflux
from nflux.nets import MADE
from nflux.ops import reference

SPLINE = dict(tail_bound=3.0, min_bin_width=1e-3, min_bin_height=1e-3, min_derivative=1e-3)


def _made(D=5, transformer="affine", residual=False, ordering="natural", context=False,
          hidden=(16, 16), dtype=torch.float64, activation="relu", scale=0.3, seed=0):
    P = 2 if transformer == "affine" else 3 * 4 - 1
    made = MADE(D, P, hidden, ordering=ordering, seed=seed, residual=residual,
                context_features=3 if context else None, activation=activation).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in made.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
        made.weights[-1].mul_(0.2)  # moderate log-scales: exp(exp(...)) overflows tell nothing
    return made


def _args(made, y, context=None):
    return (y, list(made.weights), list(made.biases), made.degrees,
            made.context_terms(context, y.shape[0]))


def _kw(made, transformer):
    kw = dict(residual=made.residual, activation=made.activation, transformer=transformer)
    return {**kw, **SPLINE} if transformer == "rq_spline" else kw


CASES = [
    ("affine", False, "natural", False),
    ("affine", True, "reversed", False),
    ("affine", False, "random", True),
    ("affine", True, "random", True),
    ("rq_spline", False, "natural", False),
    ("rq_spline", True, "random", True),
    ("rq_spline", False, [3, 1, 4, 0, 2], True),
]


@pytest.mark.parametrize("transformer,residual,ordering,context", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_pass_equals_d_pass(transformer, residual, ordering, context, dtype):
    made = _made(transformer=transformer, residual=residual, ordering=ordering, context=context, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    y = torch.randn(64, 5, generator=g, dtype=dtype) * 1.5
    c = torch.randn(64, 3, generator=g, dtype=dtype) if context else None
    kw = _kw(made, transformer)
    x, lad = nflux.ops.made_inverse(*_args(made, y, c), **kw)
    x_ref, lad_ref = reference.made_inverse_naive(*_args(made, y, c), **kw)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-11, rtol=1e-11)
    # logabsdet sums D log-slopes, each as sensitive as float32 allows (both sides are ~1e-5
    # from the float64 truth), so it gets D times the tolerance of x
    lad_tol = dict(atol=5e-5, rtol=5e-5) if dtype == torch.float32 else tol
    torch.testing.assert_close(x, x_ref, **tol)
    torch.testing.assert_close(lad, lad_ref, **lad_tol)
    # the module's own D-pass (native forward ops) and the differentiable reference agree too
    options = SPLINE if transformer == "rq_spline" else {}
    x_mod, _ = made.inverse_naive(y, transformer, c, **options)
    torch.testing.assert_close(x, x_mod, **tol)
    x_one, lad_one = reference.made_inverse(*_args(made, y, c), **kw)
    torch.testing.assert_close(x, x_one, **tol)
    torch.testing.assert_close(lad, lad_one, **lad_tol)


@pytest.mark.parametrize("transformer", ["affine", "rq_spline"])
@pytest.mark.parametrize("residual", [False, True])
def test_round_trip(transformer, residual):
    made = _made(D=7, transformer=transformer, residual=residual, ordering="random", context=True)
    y = torch.randn(32, 7, dtype=torch.float64)
    c = torch.randn(32, 3, dtype=torch.float64)
    options = SPLINE if transformer == "rq_spline" else {}
    x, lad_inv = made.inverse_autoregressive(y, transformer, c, **options)
    y_back, lad_fwd = made.transform(x, transformer, c, **options)
    torch.testing.assert_close(y_back, y, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(lad_inv, -lad_fwd, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("activation", ["elu", "tanh", "gelu"])
def test_activations_and_hidden_degree_zero(activation):
    made = _made(D=4, hidden=(6, 9), activation=activation)
    y = torch.randn(8, 4, dtype=torch.float64)
    args = _args(made, y)
    # a hidden unit of degree 0 (input-independent) and one of degree D (never read)
    degrees = list(args[3])
    degrees[4], degrees[5] = 0, 4
    args = (*args[:3], degrees, args[4])
    kw = _kw(made, "affine")
    x, lad = nflux.ops.made_inverse(*args, **kw)
    x_ref, lad_ref = reference.made_inverse_naive(*args, **kw)
    torch.testing.assert_close(x, x_ref)
    torch.testing.assert_close(lad, lad_ref)


def test_single_feature_and_empty_batch():
    made = _made(D=1, hidden=(4,))
    kw = _kw(made, "affine")
    y = torch.randn(3, 1, dtype=torch.float64)
    torch.testing.assert_close(nflux.ops.made_inverse(*_args(made, y), **kw),
                               reference.made_inverse_naive(*_args(made, y), **kw))
    made = _made(D=3)
    x, lad = nflux.ops.made_inverse(*_args(made, torch.zeros(0, 3, dtype=torch.float64)), **kw)
    assert x.shape == (0, 3) and lad.shape == (0,)


@pytest.mark.parametrize("transformer,residual,context", [("affine", False, True), ("rq_spline", True, False)])
def test_gradcheck(transformer, residual, context):
    made = _made(D=3, hidden=(5, 5), transformer=transformer, residual=residual, context=context,
                 ordering="reversed", activation="tanh")
    y = torch.randn(4, 3, dtype=torch.float64)
    c = torch.randn(4, 3, dtype=torch.float64) if context else None
    y, weights, biases, degrees, terms = _args(made, y, c)
    leaves = [t.detach().requires_grad_() for t in (y, *weights, *biases, *terms)]
    n, kw = len(weights), _kw(made, transformer)

    def fn(*t):
        return nflux.ops.made_inverse(t[0], t[1 : 1 + n], t[1 + n : 1 + 2 * n], degrees, t[1 + 2 * n :], **kw)

    assert torch.autograd.gradcheck(fn, leaves)


def test_module_gradients_reach_parameters():
    made = _made(D=4, context=True)
    y = torch.randn(6, 4, dtype=torch.float64)
    x, lad = made.inverse_autoregressive(y, "affine", torch.randn(6, 3, dtype=torch.float64))
    (x.sum() + lad.sum()).backward()
    assert all(p.grad is not None for p in made.parameters())


@pytest.mark.parametrize("transformer,residual,context", [("affine", False, True), ("rq_spline", True, False)])
def test_opcheck(transformer, residual, context):
    made = _made(D=3, hidden=(5, 5), transformer=transformer, residual=residual, context=context,
                 dtype=torch.float32)
    y = torch.randn(4, 3)
    c = torch.randn(4, 3) if context else None
    y, weights, biases, degrees, terms = _args(made, y, c)
    kw = _kw(made, transformer)
    options = (kw["residual"], kw["activation"], transformer, *(SPLINE.values() if transformer == "rq_spline"
                                                                   else (3.0, 1e-3, 1e-3, 1e-3)))
    weights = [w.detach().requires_grad_() for w in weights]
    args = (y, weights, [b.detach() for b in biases], degrees, [t.detach() for t in terms], *options)
    torch.library.opcheck(torch.ops.nflux.made_inverse.default, args)


def test_bad_inputs():
    made = _made(D=3)
    y = torch.randn(4, 3, dtype=torch.float64)
    y_, w, b, deg, terms = _args(made, y)
    kw = _kw(made, "affine")
    with pytest.raises(ValueError, match="y must have shape"):
        nflux.ops.made_inverse(y[0], w, b, deg, terms, **kw)
    with pytest.raises(ValueError, match="permutation"):
        nflux.ops.made_inverse(y, w, b, [1, 1, 3, *deg[3:]], terms, **kw)
    with pytest.raises(ValueError, match="degrees must hold"):
        nflux.ops.made_inverse(y, w, b, deg[:-1], terms, **kw)
    with pytest.raises(ValueError, match="3K-1"):
        nflux.ops.made_inverse(y, w[:-1] + [torch.cat([w[-1], w[-1][:3]])], b[:-1] + [torch.cat([b[-1], b[-1][:3]])], deg, terms,
                               **{**kw, "transformer": "rq_spline"})
    with pytest.raises(ValueError, match="needs 2 params"):
        nflux.ops.made_inverse(y, w[:-1] + [torch.cat([w[-1], w[-1][:3]])], b[:-1] + [torch.cat([b[-1], b[-1][:3]])], deg, terms, **kw)
    with pytest.raises(ValueError, match="transformer"):
        nflux.ops.made_inverse(y, w, b, deg, terms, **{**kw, "transformer": "cubic"})
    with pytest.raises(ValueError, match="weights\\[1\\]"):
        nflux.ops.made_inverse(y, [w[0], w[1][:, :3], w[2]], b, deg, terms, **kw)
    with pytest.raises(ValueError, match="dtype"):
        nflux.ops.made_inverse(y.float(), w, b, deg, terms, **kw)
    with pytest.raises(ValueError, match="residual"):
        nflux.ops.made_inverse(y, w, b, deg, terms, **{**kw, "residual": True})
    with pytest.raises(RuntimeError, match="permutation"):
        torch.ops.nflux.made_inverse(y, w, b, [1, 1, 3, *deg[3:]], [], False, "relu", "affine", 3.0, 1e-3, 1e-3, 1e-3)
    with pytest.raises(RuntimeError, match="activation"):
        torch.ops.nflux.made_inverse(y, w, b, deg, [], False, "swish", "affine", 3.0, 1e-3, 1e-3, 1e-3)
    # The raw op names the layer (it printed a literal "weights[i]").
    with pytest.raises(RuntimeError, match=r"weights\[1\] has dtype Float"):
        torch.ops.nflux.made_inverse(y, [w[0], w[1].float(), *w[2:]], b, deg, [], False, "relu", "affine", 3.0,
                                     1e-3, 1e-3, 1e-3)


@pytest.mark.parametrize("transformer,residual,context", [("affine", True, True), ("rq_spline", False, True)])
def test_composite_path_matches(transformer, residual, context):
    """The ATen-composed implementation (the one CUDA runs) agrees with the CPU kernel."""
    made = _made(D=6, transformer=transformer, residual=residual, context=context, ordering="random")
    y = torch.randn(70, 6, dtype=torch.float64)  # more than one 64-row tile, with a ragged end
    c = torch.randn(70, 3, dtype=torch.float64) if context else None
    kw = _kw(made, transformer)
    options = (kw["residual"], kw["activation"], transformer, *(SPLINE.values() if transformer == "rq_spline"
                                                                   else (3.0, 1e-3, 1e-3, 1e-3)))
    with torch.no_grad():
        got = torch.ops.nflux._made_inverse_composite(*_args(made, y, c), *options)
        want = nflux.ops.made_inverse(*_args(made, y, c), **kw)
    torch.testing.assert_close(got, want)


def test_torch_compile_fullgraph():
    made = _made(D=4, transformer="rq_spline", residual=True, context=True, dtype=torch.float32)
    y, c = torch.randn(8, 4), torch.randn(8, 3)

    def sample(y, c):
        return made.inverse_autoregressive(y, "rq_spline", c, **SPLINE)

    with torch.no_grad():
        torch.testing.assert_close(torch.compile(sample, fullgraph=True)(y, c), sample(y, c))


@pytest.mark.parametrize("batched_network", [False, True])
def test_vmap_matches_loop(batched_network):
    """vmap: vmapped rows join the batch (shared network), or one call per index (vmapped
    weights); MAF sampling and IAF density under torch.func.vmap need it."""
    made = _made(D=3, hidden=(6,), transformer="affine", context=True, dtype=torch.float64)
    y, weights, biases, degrees, _ = _args(made, torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64))
    ys, cs = torch.randn(5, 4, 3, dtype=torch.float64), torch.randn(5, 4, 3, dtype=torch.float64)
    kw = _kw(made, "affine")
    scale = torch.linspace(0.5, 1.5, 5, dtype=torch.float64)

    def one(y, c, s):
        ws = [w.detach() * (s if batched_network else 1) for w in weights]
        return nflux.ops.made_inverse(y, ws, [b.detach() for b in biases], degrees,
                                      [t.detach() for t in made.context_terms(c, y.shape[0])], **kw)

    got = torch.func.vmap(one)(ys, cs, scale)
    want = [torch.stack(t) for t in zip(*(one(ys[i], cs[i], scale[i]) for i in range(5)))]
    torch.testing.assert_close(got, tuple(want))


def test_vmap_over_the_last_dim_of_a_context_term():
    # The rule read the context term's width before moving the vmapped dim to the front: with
    # in_dims=2 it took the vmapped size (5) for the width.
    made = _made(D=2, hidden=(3,), transformer="affine", context=True, dtype=torch.float64)
    y, weights, biases, degrees, _ = _args(made, torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64))
    weights, biases, kw = [w.detach() for w in weights], [b.detach() for b in biases], _kw(made, "affine")
    terms = torch.randn(4, 3, 5, dtype=torch.float64)  # [rows, hidden, vmapped]

    def one(term):
        return nflux.ops.made_inverse(y, weights, biases, degrees, [term], **kw)

    got = torch.func.vmap(one, in_dims=2)(terms)
    want = [torch.stack(t) for t in zip(*(one(terms[..., i]) for i in range(5)))]
    torch.testing.assert_close(got, tuple(want))


def test_forward_mode_is_refused():
    """No forward-mode rule: torch.func.jvp would return zero tangents, so the op refuses."""
    made = _made(D=3, hidden=(6,), transformer="affine", dtype=torch.float64)
    y, weights, biases, degrees, _ = _args(made, torch.randn(2, 3, dtype=torch.float64))
    weights, biases = [w.detach() for w in weights], [b.detach() for b in biases]
    with pytest.raises(NotImplementedError, match="forward-mode"):
        torch.func.jvp(lambda y: nflux.ops.made_inverse(y, weights, biases, degrees, **_kw(made, "affine"))[0],
                       (y,), (torch.ones_like(y),))


@pytest.mark.parametrize("activation", ["relu", "elu", "tanh", "gelu"])
def test_nan_in_a_row_reaches_every_later_feature(activation):
    # relu turned a NaN pre-activation into 0, so a NaN first feature gave finite later
    # features and a finite logabsdet (torch.relu, and the reference, keep the NaN).
    made = _made(activation=activation)
    y = torch.randn(3, 5, dtype=torch.float64)
    y[1, 0] = float("nan")
    x, lad = nflux.ops.made_inverse(*_args(made, y), **_kw(made, "affine"))
    x_ref, lad_ref = reference.made_inverse(*_args(made, y), **_kw(made, "affine"))
    assert torch.isnan(x[1]).all() and torch.isnan(lad[1])
    torch.testing.assert_close(x, x_ref, equal_nan=True)
    torch.testing.assert_close(lad, lad_ref, equal_nan=True)
