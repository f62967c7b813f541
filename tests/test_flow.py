"""Flow and its Distribution adapter: shapes with and without context, rsample gradients,
sampling consistent with density, dist() semantics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import nflux
from nflux import transforms as T

from _flow_helpers import perturb

D, C = 3, 2


def _flow(context=0):
    torch.manual_seed(0)
    t = [T.ActNorm(D), T.AffineCoupling(D, T.alternating_mask(D), context=context, hidden=(8,)),
         T.MaskedAffineAutoregressive(D, context=context, hidden=(8,))]
    return perturb(nflux.Flow(t, D).double()).eval()


def test_standard_normal_base():
    flow = nflux.Flow(T.ReversePermutation(D), D).double()
    x = torch.randn(4, D, dtype=torch.float64)
    ref = torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1)
    torch.testing.assert_close(flow.log_prob(x), ref)


def test_shapes_without_context():
    flow = _flow()
    assert flow.sample().shape == (D,)
    assert flow.sample((5,)).shape == (5, D)
    assert flow.sample((2, 3)).shape == (2, 3, D)
    x = torch.randn(2, 3, D, dtype=torch.float64)
    assert flow.log_prob(x).shape == (2, 3)
    assert flow.log_prob(x[0, 0]).shape == ()
    z, lad = flow.transform(x)
    assert z.shape == x.shape and lad.shape == (2, 3)


def test_shapes_with_context_batch():
    flow = _flow(C)
    c = torch.randn(4, C, dtype=torch.float64)
    s = flow.sample((5,), context=c)
    assert s.shape == (5, 4, D)
    assert flow.log_prob(s, c).shape == (5, 4)
    # one context for many points broadcasts
    assert flow.log_prob(torch.randn(7, D, dtype=torch.float64), c[0]).shape == (7,)
    x, lp = flow.sample_and_log_prob((5,), context=c)
    torch.testing.assert_close(lp, flow.log_prob(x, c))


def test_sample_log_prob_matches_density_and_inverse():
    flow = _flow(C)
    c = torch.randn(6, C, dtype=torch.float64)
    x, lp = flow.sample_and_log_prob((), context=c)
    torch.testing.assert_close(flow.log_prob(x, c), lp)
    z, lad = flow.transform(x, c)
    x_back, lad_inv = flow.inverse(z, c)
    torch.testing.assert_close(x_back, x)
    torch.testing.assert_close(lad_inv, -lad)


def test_distribution_adapter():
    flow = _flow(C)
    c = torch.randn(4, C, dtype=torch.float64)
    d = flow.dist(c)
    assert isinstance(d, torch.distributions.Distribution)
    assert d.batch_shape == (4,) and d.event_shape == (D,) and d.has_rsample
    s = d.sample((3,))
    assert s.shape == (3, 4, D) and not s.requires_grad
    assert d.log_prob(s).shape == (3, 4)
    r = d.rsample((3,))
    loss = r.square().sum()
    loss.backward()
    grads = [p.grad for p in flow.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    d0 = _flow().dist()
    assert d0.batch_shape == () and d0.sample((2,)).shape == (2, D)


def test_rsample_gradient_wrt_context():
    flow = _flow(C)
    c = torch.randn(2, C, dtype=torch.float64, requires_grad=True)
    flow.rsample((3,), c).sum().backward()
    assert c.grad is not None and c.grad.abs().sum() > 0


def test_mc_normalisation_2d():
    # The density integrates to one: importance-sample with the flow's own samples vs a box.
    torch.manual_seed(1)
    flow = perturb(nflux.NSF(2, layers=2, hidden=(8,), bins=4).double(), 0.2).eval()
    grid = torch.linspace(-8, 8, 321, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([xx, yy], -1).reshape(-1, 2)
    with torch.no_grad():
        mass = flow.log_prob(pts).exp().sum() * (grid[1] - grid[0]) ** 2
    assert abs(float(mass) - 1) < 1e-2, float(mass)
    assert math.isfinite(float(mass))


def test_torch_distribution_base():
    base = torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros(D, dtype=torch.float64), 2 * torch.ones(D, dtype=torch.float64)), 1)
    flow = nflux.Flow([T.ReversePermutation(D)], base)
    x = torch.randn(4, D, dtype=torch.float64)
    torch.testing.assert_close(flow.log_prob(x), base.log_prob(x.flip(-1)))
    assert flow.sample((5,)).shape == (5, D)


def test_distribution_expand():
    """pyro's plates expand a distribution: a conditional flow's context broadcasts, an
    unconditional flow draws independently over the new batch dims."""
    torch.manual_seed(0)
    c = torch.randn(4, C, dtype=torch.float64)
    conditional = _flow(C).dist(c).expand((5, 4))
    assert conditional.batch_shape == (5, 4) and conditional.sample((2,)).shape == (2, 5, 4, D)
    x = torch.randn(5, 4, D, dtype=torch.float64)
    torch.testing.assert_close(conditional.log_prob(x), _flow(C).log_prob(x, c))
    plain = _flow().dist().expand((6,))
    draws = plain.sample((2,))
    assert draws.shape == (2, 6, D) and not torch.equal(draws[:, 0], draws[:, 1])
    one = torch.randn(D, dtype=torch.float64)
    assert plain.log_prob(one).shape == (6,)  # a value broadcasts against the batch
    torch.testing.assert_close(plain.log_prob(one), _flow().log_prob(one).expand(6))
    with pytest.raises(ValueError, match="cannot expand"):
        plain.expand((6,)).expand((3,))


def test_distribution_validation_follows_torch_default():
    bad = torch.tensor([0.0, float("nan"), 1.0], dtype=torch.float64)
    assert torch.isnan(_flow().dist(validate_args=False).log_prob(bad))
    previous = torch.distributions.Distribution._validate_args
    try:
        for default in (False, True):
            torch.distributions.Distribution.set_default_validate_args(default)
            if default:
                with pytest.raises(ValueError, match="support"):
                    _flow().dist().log_prob(bad)
            else:
                assert torch.isnan(_flow().dist().log_prob(bad))
    finally:
        torch.distributions.Distribution.set_default_validate_args(previous)


def test_sample_shape_int_and_integral_features():
    flow = _flow()
    assert flow.sample(7).shape == (7, D)
    assert flow.rsample_and_log_prob(2)[1].shape == (2,)
    assert nflux.Flow(T.ReversePermutation(D), np.int64(D)).sample(3).shape == (3, D)


@pytest.mark.parametrize("model", [nflux.RealNVP, nflux.MAF, nflux.NSF, nflux.Glow])
def test_context_is_checked_against_the_model(model):
    flow = model(D, context=C, layers=1, hidden=(8,))
    x = torch.randn(5, D)
    with pytest.raises(ValueError, match=rf"expected a context \[\.\.\., {C}\], got \[5, 3\]"):
        flow.log_prob(x, torch.randn(5, 3))
    with pytest.raises(ValueError, match="needs a context"):
        flow.sample((2,))
    with pytest.raises(ValueError, match="built without context"):
        model(D, layers=1, hidden=(8,)).log_prob(x, torch.randn(5, C))


def test_nsf_residual_needs_autoregressive():
    with pytest.raises(ValueError, match="autoregressive=True"):
        nflux.NSF(D, residual=True)
    assert nflux.NSF(D, residual=True, autoregressive=True, layers=1).config["residual"] is True


def test_actnorm_init_on_a_broadcast_point_keeps_unit_scale():
    """One point scored against many contexts reaches ActNorm as identical rows: their std is 0,
    which must not become a permanent scale of 1/eps."""
    flow = nflux.MAF(2, context=1, layers=1, hidden=(8,))
    lp = flow.log_prob(torch.tensor([0.5, -1.0]), torch.randn(100, 1))
    actnorm = flow.transforms[0]
    torch.testing.assert_close(actnorm.s0, torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(actnorm.b0, torch.tensor([-0.5, 1.0]))
    assert (lp < 0).all()  # a unit-scale Gaussian-ish density, not +25 nats from a 1e6 scale
    constant = T.ActNorm(3)
    y, _ = constant(torch.cat([torch.randn(50, 2), torch.full((50, 1), 4.0)], 1))
    torch.testing.assert_close(constant.s0[2], torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(y[:, 2], torch.zeros(50))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [0.1, -1.3, 3.7, 1e30])
def test_actnorm_constant_feature_of_any_value_keeps_unit_scale(value, dtype):
    # The rounded mean of 100 copies of 0.1 is not 0.1: the std came out ~1e-16 and the
    # scale 1e6, for good (an sbi point broadcast against its contexts gave log_prob -4.9e7).
    x = torch.cat([torch.randn(100, 1, dtype=dtype), torch.full((100, 1), value, dtype=dtype)], 1)
    a = T.ActNorm(2).to(dtype)
    y, _ = a(x)
    assert a.s0[1] == pytest.approx(0.0, abs=1e-5) and a.b0[1] == -torch.tensor(value, dtype=dtype)
    assert (y[:, 1] == 0).all()
    flow = nflux.NSF(2, context=3, layers=1, hidden=(8,)).to(dtype)
    lp = flow.log_prob(torch.tensor([value, -value], dtype=dtype).clamp(-5, 5), torch.randn(100, 3, dtype=dtype))
    assert (flow.transforms[0].s0.abs() < 1e-5).all() and (lp < 0).all()


def test_actnorm_statistics_of_huge_values_and_empty_batches():
    # Squaring deviations of 3e19 overflowed float32: s0 = -inf and every log_prob -inf.
    a = T.ActNorm(2)
    x = torch.randn(256, 2) * 3e19
    y, lad = a(x)
    torch.testing.assert_close(y.std(0, correction=0), torch.ones(2), rtol=1e-4, atol=0)
    assert torch.isfinite(lad).all()
    c = T.ActNorm(1)
    c(1e37 + torch.randn(256, 1) * 1e36)  # the mean's sum overflowed: b0 = -inf for good
    assert torch.isfinite(c.b0).all() and torch.isfinite(c.s0).all()
    # An empty first batch has no statistics: the next batch initialises.
    b = T.ActNorm(2)
    b(torch.empty(0, 2))
    assert not bool(b.initialized)
    y, _ = b(torch.randn(256, 2) * 100 + 50)
    torch.testing.assert_close(y.mean(0), torch.zeros(2), atol=1e-4, rtol=0)


def test_actnorm_checks_width_and_returns_writable_logabsdet():
    a = T.ActNorm(3)
    with pytest.raises(ValueError, match=r"ActNorm expects inputs \[B, 3\], got \[4, 1\]"):
        a(torch.randn(4, 1))
    with pytest.raises(ValueError, match=r"ActNorm expects inputs \[B, 3\]"):
        a.inverse(torch.randn(4, 1))
    for direction in (a.forward, a.inverse):
        _, lad = direction(torch.randn(4, 3))
        lad += 1.0  # an expanded logabsdet refused this


@pytest.mark.parametrize("model", [nflux.NSF, nflux.MAF, nflux.RealNVP])
def test_context_in_raw_units_is_standardised(model):
    """The models standardise the context with an ActNorm set by the first training-mode density
    call: contexts in raw units (observations in the hundreds) give the flow standardised ones,
    so a flow fed c * 100 + 1000 computes what one fed c does."""
    c = torch.randn(64, C, dtype=torch.float64)
    x = torch.randn(64, D, dtype=torch.float64)
    flows = []
    for context in (c, c * 100 + 1000):
        torch.manual_seed(0)
        flow = model(D, context=C, layers=2, hidden=(16,)).double()
        assert not bool(flow.context_norm.initialized)
        flow.sample((2,), context=context[:3])  # sampling does not set the statistics
        assert not bool(flow.context_norm.initialized)
        flow.log_prob(x, context)
        normed = flow.context_norm(context)[0]
        torch.testing.assert_close(normed.mean(0), torch.zeros(C, dtype=torch.float64), atol=1e-9, rtol=0)
        torch.testing.assert_close(normed.std(0, correction=0), torch.ones(C, dtype=torch.float64), atol=1e-5, rtol=0)  # eps
        perturb(flow.transforms)  # off the identity init, so the conditioners use the context
        flows.append((flow, context))
    (a, ca), (b, cb) = flows
    torch.testing.assert_close(a.log_prob(x, ca), b.log_prob(x, cb), atol=1e-4, rtol=1e-5)  # ActNorm's eps
    assert nflux.NSF(D).context_norm is None
