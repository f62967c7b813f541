"""The six models: brute-force Jacobians, round trip, sampling vs density, distributions,
compile(fullgraph=True), state_dict, repr, .to(); and a 2-D maximum-likelihood fit against a
density of known entropy."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import nflux

from _flow_helpers import brute_logabsdet, perturb

D, B, C = 3, 3, 2
SMALL = dict(layers=2, hidden=(8, 8))
MODELS = {
    "NICE": lambda c: nflux.NICE(D, context=c, **SMALL),
    "RealNVP": lambda c: nflux.RealNVP(D, context=c, **SMALL),
    "Glow": lambda c: nflux.Glow(D, context=c, **SMALL),
    "MAF": lambda c: nflux.MAF(D, context=c, **SMALL),
    "MAF_residual": lambda c: nflux.MAF(D, context=c, residual=True, **SMALL),
    "IAF": lambda c: nflux.IAF(D, context=c, **SMALL),
    "NSF": lambda c: nflux.NSF(D, context=c, bins=4, **SMALL),
    "NSF_ar": lambda c: nflux.NSF(D, context=c, bins=4, autoregressive=True, **SMALL),
}
CASES = [(name, c) for name in MODELS for c in (0, C)]


def _model(name, context, seed=0):
    torch.manual_seed(seed)
    flow = MODELS[name](context).double()
    x = 10 + 3 * torch.randn(64, D, dtype=torch.float64)  # unstandardised data: ActNorm init
    flow.train().log_prob(x, torch.randn(64, C, dtype=torch.float64) if context else None)
    return perturb(flow, 0.1).eval()


def _inputs(context, n=B):
    x = 10 + 3 * torch.randn(n, D, dtype=torch.float64)
    return x, (torch.randn(n, C, dtype=torch.float64) if context else None)


@pytest.mark.parametrize("name,context", CASES)
def test_jacobian_round_trip_sampling(name, context):
    flow = _model(name, context)
    x, c = _inputs(context)
    z, lad = flow.transform(x, c)
    torch.testing.assert_close(lad, brute_logabsdet(flow.transform, x, c), atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(flow.inverse(z, c)[0], x, atol=1e-7, rtol=1e-7)
    base = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(flow.log_prob(x, c), base + lad)
    s, lp = flow.sample_and_log_prob((2,), c)
    assert s.shape == ((2, B, D) if context else (2, D))
    torch.testing.assert_close(flow.log_prob(s, c), lp, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("name", list(MODELS))
def test_distribution_rsample_state_dict_repr(name):
    flow = _model(name, C)
    c = torch.randn(4, C, dtype=torch.float64)
    d = flow.dist(c)
    assert d.batch_shape == (4,) and d.event_shape == (D,)
    r = d.rsample((2,))
    assert r.shape == (2, 4, D)
    r.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in flow.parameters())
    other = _model(name, C, seed=1)
    other.load_state_dict(copy.deepcopy(flow.state_dict()))
    x, cx = _inputs(C)
    torch.testing.assert_close(other.log_prob(x, cx), flow.log_prob(x, cx), rtol=0, atol=0)
    torch.manual_seed(3)
    s1 = flow.sample((2,), c)
    torch.manual_seed(3)
    torch.testing.assert_close(other.sample((2,), c), s1, rtol=0, atol=0)
    text = repr(flow)
    assert name.split("_")[0] in text and f"features={D}" in text


@pytest.mark.parametrize("name", list(MODELS))
def test_compile_fullgraph(name):
    torch._dynamo.reset()
    flow = _model(name, C).float()
    x = 10 + 3 * torch.randn(5, D)
    c = torch.randn(5, C)

    def run(x, c):
        return flow.log_prob(x, c), flow.sample((2,), c)

    lp, s = torch.compile(run, fullgraph=True, backend="aot_eager")(x, c)
    torch.testing.assert_close(lp, flow.log_prob(x, c), atol=1e-4, rtol=1e-4)
    assert s.shape == (2, 5, D)


@pytest.mark.parametrize("name", list(MODELS))
def test_bad_context_width_is_named(name):
    # A negative width failed inside torch (MAF) or built a flow no call could satisfy (RealNVP).
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=rf"^nflux: context must be an int >= 0, got {bad!r}$"):
            MODELS[name](bad)


@pytest.mark.parametrize("autoregressive", [False, True])
def test_spline_bins_are_checked(autoregressive):
    with pytest.raises(ValueError, match=r"^nflux: bins must be an int >= 1, got 0$"):
        nflux.NSF(D, bins=0, autoregressive=autoregressive)
    assert nflux.NSF(D, bins=1, autoregressive=autoregressive, layers=1).log_prob(torch.randn(2, D)).shape == (2,)


def test_to_device_and_dtype():
    flow = nflux.NSF(D, context=C, **SMALL).to(torch.float64)
    s = flow.sample((2,), torch.randn(1, C, dtype=torch.float64))
    assert s.dtype == torch.float64
    if torch.cuda.is_available():
        flow = flow.to("cuda")
        assert flow.sample((2,), torch.randn(1, C, dtype=torch.float64, device="cuda")).is_cuda


def test_defaults_start_at_identity_after_actnorm():
    # Identity-like init: after ActNorm's data init the whole flow standardises the data.
    torch.manual_seed(0)
    x = 20 + 10 * torch.randn(512, D)
    for ctor in (nflux.NICE, nflux.RealNVP, nflux.MAF, nflux.IAF, nflux.NSF):
        flow = ctor(D)
        z, lad = flow.train().transform(x)
        torch.testing.assert_close(z.mean(0), torch.zeros(D), atol=1e-4, rtol=0)
        assert torch.isfinite(lad).all()


def _banana(n, gen):
    """x1 ~ N(0,1), x2 = x1^2/2 + N(0, 0.5^2), then scaled by 10 and shifted by 20 (values in
    the tens). Entropy: 0.5 log(2 pi e) + 0.5 log(2 pi e 0.25) + 2 log 10; exact log density."""
    a = torch.randn(n, generator=gen)
    b = 0.5 * a.square() + 0.5 * torch.randn(n, generator=gen)
    return 20 + 10 * torch.stack([a, b], -1)


def _banana_log_prob(x):
    u = (x - 20) / 10
    n = torch.distributions.Normal(0.0, 1.0)
    return n.log_prob(u[:, 0]) + n.log_prob((u[:, 1] - 0.5 * u[:, 0].square()) / 0.5) - math.log(0.5) - 2 * math.log(10)


@pytest.fixture
def one_thread():
    # Tiny GEMMs on a small shared box: OpenMP threads contending for 2 loaded cores make each
    # step ~100x slower than one thread does.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


RING_K, RING_R, RING_S = 8, 4.0, 0.5
_RING_CENTERS = RING_R * torch.stack(
    [torch.cos(torch.arange(RING_K) * 2 * math.pi / RING_K), torch.sin(torch.arange(RING_K) * 2 * math.pi / RING_K)], -1)


def _ring(n, gen):
    """8 Gaussians (std 0.5) on a circle of radius 4 (neighbours 6 std apart), scaled by 10 and
    shifted by 20. Entropy ~ log 8 + log(2 pi e 0.25) + 2 log 10 (tiny overlap); exact log density."""
    k = torch.randint(0, RING_K, (n,), generator=gen)
    return 20 + 10 * (_RING_CENTERS[k] + RING_S * torch.randn(n, 2, generator=gen))


def _ring_log_prob(x):
    u = (x - 20) / 10
    comp = torch.distributions.Normal(_RING_CENTERS, RING_S).log_prob(u[:, None, :]).sum(-1)
    return torch.logsumexp(comp, -1) - math.log(RING_K) - 2 * math.log(10)


def _fit_gap(flow, sample, log_prob, steps, seed=0):
    """Trains by maximum likelihood; returns test NLL minus the data's entropy (a KL estimate:
    both are averages over the same test points, so the difference has a small variance)."""
    gen = torch.Generator().manual_seed(seed)
    train, test = sample(20000, gen), sample(10000, gen)
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    flow.train()
    for _ in range(steps):
        idx = torch.randint(0, train.shape[0], (256,), generator=gen)
        loss = -flow.log_prob(train[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    flow.eval()
    with torch.no_grad():
        return float(-flow.log_prob(test).mean() + log_prob(test).mean())


@pytest.mark.parametrize("autoregressive", [False, True])
def test_nsf_fits_multimodal_ring(one_thread, autoregressive):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    exact = math.log(RING_K) + math.log(2 * math.pi * math.e * RING_S**2) + 2 * math.log(10)
    assert abs(float(-_ring_log_prob(_ring(10000, gen)).mean()) - exact) < 0.05
    flow = nflux.NSF(2, layers=4, hidden=(64, 64), autoregressive=autoregressive)
    gap = _fit_gap(flow, _ring, _ring_log_prob, steps=1000)
    assert -0.03 < gap < 0.1, f"test NLL - entropy = {gap:.3f} nats"


def test_maximum_likelihood_fit_reaches_entropy(one_thread):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    train, test = _banana(20000, gen), _banana(10000, gen)
    entropy = -_banana_log_prob(test).mean()
    exact = 0.5 * math.log(2 * math.pi * math.e) * 2 + 0.5 * math.log(0.25) + 2 * math.log(10)
    assert abs(float(entropy) - exact) < 0.05  # the test set is representative
    flow = nflux.NSF(2, layers=4, hidden=(32, 32), bins=8)
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 600)
    flow.train()
    for step in range(600):
        idx = torch.randint(0, train.shape[0], (256,), generator=gen)
        loss = -flow.log_prob(train[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    flow.eval()
    with torch.no_grad():
        nll = -flow.log_prob(test).mean()
    gap = float(nll - entropy)
    print(f"gap {gap:.4f} nll {float(nll):.4f} entropy {float(entropy):.4f}")
    assert gap < 0.1, f"test NLL {float(nll):.3f} vs entropy {float(entropy):.3f}: gap {gap:.3f}"
