"""Every transform: brute-force Jacobian log-determinant, round trip, context, state_dict, compile."""

from __future__ import annotations

import math

import pytest
import torch

from nflux import transforms as T

from _flow_helpers import brute_logabsdet, perturb

D, B, C = 4, 3, 2


def _make(name: str, context: int):
    h = (16, 16)
    makers = {
        "additive_alternating": lambda: T.AdditiveCoupling(D, T.alternating_mask(D), context=context, hidden=h),
        "affine_half": lambda: T.AffineCoupling(D, T.half_mask(D), context=context, hidden=h),
        "affine_random_sigmoid": lambda: T.AffineCoupling(D, T.random_mask(D, 3), context=context, hidden=h,
                                                         scale="sigmoid"),
        "affine_user_clamp": lambda: T.AffineCoupling(D, [True, True, False, True], context=context, hidden=h,
                                                      clamp=2.0),
        "spline_coupling": lambda: T.SplineCoupling(D, T.alternating_mask(D, 1), context=context, hidden=h, bins=5),
        "maf": lambda: T.MaskedAffineAutoregressive(D, context=context, hidden=h),
        "maf_residual": lambda: T.MaskedAffineAutoregressive(D, context=context, hidden=h, residual=True,
                                                             ordering="random"),
        "spline_ar": lambda: T.MaskedSplineAutoregressive(D, context=context, hidden=h, bins=5, ordering="reversed"),
        "iaf": lambda: T.Inverse(T.MaskedAffineAutoregressive(D, context=context, hidden=h)),
        "actnorm": lambda: T.ActNorm(D),
        "lu_linear": lambda: T.LULinear(D, seed=1),
        "reverse": lambda: T.ReversePermutation(D),
        "random_perm": lambda: T.RandomPermutation(D, seed=2),
        "compose": lambda: T.Compose(T.ActNorm(D), T.LULinear(D),
                                     T.AffineCoupling(D, T.half_mask(D), context=context, hidden=h)),
        "context_affine": lambda: T.ContextAffine(D, context, hidden=h),
    }
    torch.manual_seed(0)
    return perturb(makers[name]().double()).eval()


NAMES = ["additive_alternating", "affine_half", "affine_random_sigmoid", "affine_user_clamp", "spline_coupling",
         "maf", "maf_residual", "spline_ar", "iaf", "actnorm", "lu_linear", "reverse", "random_perm", "compose",
         "context_affine"]
CONDITIONAL = {"additive_alternating", "affine_half", "affine_random_sigmoid", "affine_user_clamp",
               "spline_coupling", "maf", "maf_residual", "spline_ar", "iaf", "compose", "context_affine"}
ONLY_CONDITIONAL = {"context_affine"}


def _cases():
    for name in NAMES:
        if name not in ONLY_CONDITIONAL:
            yield name, 0
        if name in CONDITIONAL:
            yield name, C


@pytest.mark.parametrize("name,context", list(_cases()))
def test_jacobian_and_round_trip(name, context):
    t = _make(name, context)
    x = torch.randn(B, D, dtype=torch.float64)
    c = torch.randn(B, C, dtype=torch.float64) if context else None
    y, lad = t(x, c)
    assert y.shape == (B, D) and lad.shape == (B,)
    torch.testing.assert_close(lad, brute_logabsdet(t, x, c), atol=1e-8, rtol=1e-7)
    x_back, lad_inv = t.inverse(y, c)
    torch.testing.assert_close(x_back, x, atol=1e-8, rtol=1e-7)
    torch.testing.assert_close(lad_inv, -lad, atol=1e-8, rtol=1e-7)
    torch.testing.assert_close(lad_inv, brute_logabsdet(t.inverse, y, c), atol=1e-8, rtol=1e-7)


@pytest.mark.parametrize("name", ["affine_half", "spline_coupling", "maf", "context_affine"])
def test_context_changes_output(name):
    t = _make(name, C)
    x = torch.randn(B, D, dtype=torch.float64)
    y1, _ = t(x, torch.zeros(B, C, dtype=torch.float64))
    y2, _ = t(x, torch.ones(B, C, dtype=torch.float64))
    assert not torch.allclose(y1, y2)


@pytest.mark.parametrize("name", ["compose", "spline_ar", "actnorm"])
def test_state_dict_round_trip(name):
    t = _make(name, 0)
    u = _make(name, 0)
    perturb(u, seed=5)
    u.load_state_dict(t.state_dict())
    x = torch.randn(B, D, dtype=torch.float64)
    torch.testing.assert_close(u(x)[0], t(x)[0], rtol=0, atol=0)


def test_identity_init():
    x = torch.randn(B, D)
    for t in [T.SplineCoupling(D, T.alternating_mask(D)), T.MaskedSplineAutoregressive(D),
              T.MaskedAffineAutoregressive(D), T.AffineCoupling(D, T.half_mask(D)), T.LULinear(D, init="identity")]:
        y, lad = t.eval()(x)
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lad, torch.zeros(B), atol=1e-5, rtol=0)


def test_actnorm_data_init_no_sync_and_compiles():
    torch._dynamo.reset()
    x = 10 + 5 * torch.randn(256, D)
    a = T.ActNorm(D).train()
    y, lad = torch.compile(a, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(D), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.std(0, correction=0), torch.ones(D), atol=1e-4, rtol=0)
    assert bool(a.initialized)
    b0 = a.b0.clone()
    a(x + 100)  # later batches do not re-initialise
    torch.testing.assert_close(a.b0, b0)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_actnorm_data_init_leaves_out_non_finite_entries(bad):
    # One bad value in the first batch set b0 to -inf (or s0 to NaN) for good: every later
    # log_prob was NaN. The statistics now come from the finite entries of each feature.
    x = 10 + 5 * torch.randn(64, D)
    x[3, 1] = bad
    x[:, 2] = bad  # a feature with no finite entry: mean 0, std 1
    a = T.ActNorm(D).train()
    y, lad = a(x)
    for feature, rows in ((0, x[:, 0]), (1, x[torch.arange(64) != 3, 1]), (3, x[:, 3])):
        torch.testing.assert_close(a.b0[feature], -rows.mean())
        torch.testing.assert_close(a.s0[feature], -torch.log(rows.std(correction=0) + a.eps))
    assert a.b0[2] == 0 and a.s0[2] == pytest.approx(-a.eps, abs=1e-7)  # -log(1 + eps) in float32
    assert torch.isfinite(lad).all() and torch.isfinite(a(10 + torch.randn(8, D))[0]).all()


def test_actnorm2d_data_init_leaves_out_non_finite_entries():
    from nflux.transforms import ActNorm2d

    x = 3 + 2 * torch.randn(4, 2, 3, 3)
    x[1, 0, 2, 2] = math.nan
    a = ActNorm2d(2).train()
    a(x)
    channel0 = x[:, 0].flatten()
    channel0 = channel0[torch.isfinite(channel0)]
    torch.testing.assert_close(a.b0[0], -channel0.mean())
    torch.testing.assert_close(a.s0[0], -torch.log(channel0.std(correction=0) + a.eps))
    torch.testing.assert_close(a.b0[1], -x[:, 1].mean())


def test_actnorm_skips_batch_statistics_once_initialised(monkeypatch):
    x = 10 + 5 * torch.randn(64, D)
    a = T.ActNorm(D).train()
    calls = []
    original = a._batch_stats
    monkeypatch.setattr(a, "_batch_stats", lambda v: calls.append(1) or original(v))
    a(x)
    a(x + 1)
    assert len(calls) == 1  # the first training batch only
    # A state loaded from an uninitialised layer initialises again; an initialised one does not.
    fresh = T.ActNorm(D)
    a.load_state_dict(fresh.state_dict())
    a(x)
    assert len(calls) == 2 and bool(a.initialized)
    other = T.ActNorm(D).train()
    other.load_state_dict(a.state_dict())
    monkeypatch.setattr(other, "_batch_stats", lambda v: calls.append(1) or original(v))
    y, _ = other(x + 3)
    assert len(calls) == 2
    torch.testing.assert_close(y, a(x + 3)[0])


def test_lu_linear_weight_is_orthogonal_at_init():
    t = T.LULinear(5, seed=3).double()
    w = t.weight()
    torch.testing.assert_close(w @ w.T, torch.eye(5, dtype=torch.float64), atol=1e-6, rtol=0)  # stored in float32
    x = torch.randn(2, 5, dtype=torch.float64)
    torch.testing.assert_close(t(x)[0], x @ w.T)


def test_bad_masks():
    with pytest.raises(ValueError, match="mask"):
        T.AffineCoupling(3, [True, True, True])
    with pytest.raises(ValueError, match="mask"):
        T.AffineCoupling(3, [True, False])


@pytest.mark.parametrize("make", [
    lambda: T.AdditiveCoupling(D, T.alternating_mask(D)), lambda: T.AffineCoupling(D, T.half_mask(D)),
    lambda: T.SplineCoupling(D, T.alternating_mask(D)), lambda: T.ReversePermutation(D),
    lambda: T.RandomPermutation(D), lambda: T.LULinear(D), lambda: T.MaskedAffineAutoregressive(D),
    lambda: T.MaskedSplineAutoregressive(D)])
@pytest.mark.parametrize("width", [D - 1, D + 1])
def test_input_width_is_checked(make, width):
    """A wrong width is an error naming the transform, both ways (index_select used to drop
    extra features silently)."""
    t = make()
    for direction in (t.forward, t.inverse):
        with pytest.raises(ValueError, match=rf"{type(t).__name__} expects inputs \[B, {D}\], got \[{B}, {width}\]"):
            direction(torch.randn(B, width))


def test_one_bin_autoregressive_spline():
    t = perturb(T.MaskedSplineAutoregressive(D, bins=1, hidden=(8,)).double())
    x = torch.randn(B, D, dtype=torch.float64)
    y, lad = t(x)
    x_back, lad_back = t.inverse(y)
    torch.testing.assert_close(x_back, x)
    torch.testing.assert_close(lad_back, -lad)
    torch.testing.assert_close(lad, brute_logabsdet(t, x))


def test_float64_default_dtype():
    """Built under a float64 default, the transforms start where float64 puts them: LULinear's
    identity factors are two tensors (they were one), spline couplings are the identity to
    float64 rounding (their output bias was cast through float32)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        lu = T.LULinear(D, init="identity")
        assert lu.lower.untyped_storage().data_ptr() != lu.upper.untyped_storage().data_ptr()
        lu.load_state_dict(T.LULinear(D, seed=0).state_dict())
        torch.testing.assert_close(lu.weight(), T.LULinear(D, seed=0).weight())
        x = torch.randn(B, D)
        y, lad = T.SplineCoupling(D, T.alternating_mask(D)).eval()(x)
        torch.testing.assert_close(y, x, rtol=0, atol=1e-14)
        torch.testing.assert_close(lad, torch.zeros(B), rtol=0, atol=1e-13)
    finally:
        torch.set_default_dtype(previous)


def test_conditioner_context_width_is_checked():
    t = T.AffineCoupling(D, T.half_mask(D), context=C, hidden=(8,))
    with pytest.raises(ValueError, match=rf"needs a context \[\.\.\., {C}\], got \[{B}, {C + 1}\]"):
        t(torch.randn(B, D), torch.randn(B, C + 1))


@pytest.mark.parametrize("autoregressive", [False, True])
def test_conditional_nsf_follows_the_context_beyond_the_tail_bound(autoregressive):
    """The splines are the identity outside [-tail_bound, tail_bound], where they ignore the
    context; the ContextAffine in front lets a conditional NSF's density there depend on it."""
    import nflux

    def density_beyond_the_bound(context_affine):
        torch.manual_seed(0)
        flow = perturb(nflux.NSF(2, context=C, layers=2, hidden=(16,), autoregressive=autoregressive,
                                 context_affine=context_affine).double(), 0.5).eval()
        x = torch.full((4, 2), 50.0, dtype=torch.float64)  # far past tail_bound 3, after the ActNorm too
        return flow.log_prob(x, torch.randn(4, C, dtype=torch.float64) * 2)

    lp = density_beyond_the_bound(False)
    torch.testing.assert_close(lp, lp[:1].expand(4))  # the base density's tail, whatever the context
    lp = density_beyond_the_bound(True)
    assert (lp - lp[0]).abs().max() > 1e-3


def test_alternating_mask_parity_is_checked():
    assert T.alternating_mask(4, 1).tolist() == [False, True, False, True]
    with pytest.raises(ValueError, match="parity must be 0 or 1"):
        T.alternating_mask(4, 2)
