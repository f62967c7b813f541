"""Flow and its Distribution adapter: shapes with and without context, rsample gradients,
sampling consistent with density, dist() semantics."""

from __future__ import annotations

import math

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
