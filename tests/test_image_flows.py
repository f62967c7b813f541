"""Image transforms and flows: brute-force Jacobians on tiny images, round trips, bits/dim of
known densities, temperature sampling, ActNorm data init and torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import AffineTransform, Normal, SigmoidTransform, TransformedDistribution

import nflux
import nflux.data
from nflux.transforms import (
    ActNorm2d,
    ActNormInvConv1x1,
    ChannelCoupling,
    CheckerboardCoupling,
    Compose,
    Dequantize,
    FactorOut,
    InvConv1x1,
    Logit,
    MultiScale,
    Shift,
    Squeeze,
    VariationalDequantize,
    bits_per_dim,
    reduce_bits,
)

from _flow_helpers import perturb

SHAPES = [(1, 4, 4), (3, 4, 4)]


def _jac_logabsdet(fn, x):
    """log|det d fn(x_b) / d x_b| per row, x `[B, ...]`, fn's output flattened per row.

    One batched pass per row: D copies of x_b, and the backward of sum_i y_i[i] gives row i
    of the Jacobian in copy i's gradient (fn must treat batch rows independently)."""
    out = []
    for b in range(x.shape[0]):
        D = x[b].numel()
        xs = x[b].expand(D, *x.shape[1:]).clone().requires_grad_(True)
        y = fn(xs)[0].reshape(D, -1)
        (g,) = torch.autograd.grad(torch.diagonal(y).sum(), xs)
        out.append(torch.linalg.slogdet(g.reshape(D, -1))[1])
    return torch.stack(out)


def _transforms(shape):
    C, H, W = shape
    return {
        "squeeze": Squeeze(),
        "actnorm2d": ActNorm2d(C),
        "invconv": InvConv1x1(C, seed=0) if C > 1 else InvConv1x1(C, init="identity"),
        "actnorm_invconv": ActNormInvConv1x1(C, seed=1),
        "checker0": CheckerboardCoupling(shape, 0, hidden=8, blocks=1),
        "checker1": CheckerboardCoupling(shape, 1, hidden=8, blocks=1, clamp=None),
        "channel_exp": ChannelCoupling(4 * C, 0, hidden=8, blocks=1),
        "channel_sigmoid": ChannelCoupling(4 * C, 1, hidden=8, conditioner="glow", scale="sigmoid"),
        "factor": FactorOut(4 * C),
        "logit": Logit(0.05),
        "shift": Shift(-0.5),
    }


def _input(name, shape, gen):
    C, H, W = shape
    if name.startswith(("channel", "factor")):
        return torch.randn(2, 4 * C, H // 2, W // 2, generator=gen, dtype=torch.float64)
    if name == "logit":
        return torch.rand(2, *shape, generator=gen, dtype=torch.float64)
    return torch.randn(2, *shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", list(_transforms((1, 4, 4))))
def test_transform_jacobian_and_round_trip(name, shape):
    t = perturb(_transforms(shape)[name].double().eval(), 0.2)
    x = _input(name, shape, torch.Generator().manual_seed(0))
    y, lad = t(x)
    assert lad.shape == (2,)
    torch.testing.assert_close(lad, _jac_logabsdet(t, x))
    xr, lad_inv = t.inverse(y)
    torch.testing.assert_close(xr, x)
    torch.testing.assert_close(lad_inv, -lad)


MODELS = {
    "realnvp": lambda shape, **kw: nflux.RealNVP.image(shape, levels=2, hidden=8, blocks=1, **kw),
    "glow": lambda shape, **kw: nflux.Glow.image(shape, levels=2, steps=2, hidden=8, **kw),
    "glow_unfused": lambda shape, **kw: nflux.Glow.image(shape, levels=2, steps=1, hidden=8, fused=False, **kw),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["realnvp", "glow", "glow_unfused"])
def test_model_jacobian_round_trip_and_log_prob(name, shape):
    flow = perturb(MODELS[name](shape).double().eval(), 0.1)
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z, lad = flow.transform(x)
    D = math.prod(shape)
    assert z.shape == (2, D)
    torch.testing.assert_close(lad, _jac_logabsdet(lambda v: flow.transforms(v), x))
    torch.testing.assert_close(flow.log_prob(x), Normal(0.0, 1.0).log_prob(z).sum(1) + lad)
    xr, lad_inv = flow.inverse(z)
    torch.testing.assert_close(xr, x)
    torch.testing.assert_close(lad_inv, -lad)
    # z -> x -> z reconstructs the latent (RealNVP: up to the logit's conditioning near 0, 1).
    z2 = 0.5 * torch.randn(3, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    tol = dict(atol=1e-6, rtol=1e-6) if name == "realnvp" else {}
    torch.testing.assert_close(flow.transform(flow.inverse(z2)[0])[0], z2, **tol)


def test_temperature_zero_gives_base_mode_and_temperature_scales():
    flow = perturb(nflux.Glow.image((1, 4, 4), levels=2, steps=1, hidden=8).double().eval(), 0.1)
    x0 = flow.sample(4, temperature=0.0)
    assert x0.shape == (4, 1, 4, 4)
    mode = flow.inverse(torch.zeros(1, 16, dtype=torch.float64))[0]
    torch.testing.assert_close(x0, mode.expand(4, 1, 4, 4))
    torch.manual_seed(0)
    x = flow.sample((2, 3), temperature=0.5)
    assert x.shape == (2, 3, 1, 4, 4)
    z = flow.transform(x)[0]
    assert 0.2 < z.std().item() < 0.9


def test_bits_per_dim_exact_for_known_densities():
    shape, levels = (1, 4, 4), 17
    assert torch.allclose(bits_per_dim(torch.zeros(3), shape, levels), torch.full((3,), math.log2(levels)))
    # Identity flow after x - 1/2: log p(x) = sum log N(x - 1/2; 0, 1) exactly.
    flow = nflux.ImageFlow(Compose(Shift(-0.5), MultiScale(shape, [Compose()], [])), shape, levels).double()
    xi = torch.randint(0, levels, (5, *shape), generator=torch.Generator().manual_seed(0)).double()
    y = flow.dequantize(xi, noise=False)
    want = Normal(0.0, 1.0).log_prob(y - 0.5).flatten(1).sum(1)
    torch.testing.assert_close(flow.log_prob(y), want)
    torch.testing.assert_close(flow.bits_per_dim(xi, noise=False), -(want - 16 * math.log(levels)) / (16 * math.log(2)))
    # Uniform-noise images: E[bits/dim] = (log(2 pi)/2 + E[(y - 1/2)^2]/2 + log L) / log 2 with y ~ U[0, 1).
    torch.manual_seed(0)
    noise = torch.randint(0, levels, (4000, *shape)).double()
    expect = (0.5 * math.log(2 * math.pi) + 1 / 24 + math.log(levels)) / math.log(2)
    assert abs(flow.bits_per_dim(noise).mean().item() - expect) < 2e-3
    # Logit preprocessing: the density of x = (sigmoid(z) - a) / (1 - 2a), z ~ N(0, 1), exactly.
    a = 0.05
    flow = nflux.ImageFlow(Compose(Logit(a), MultiScale(shape, [Compose()], [])), shape, levels).double()
    ref = TransformedDistribution(Normal(torch.tensor(0.0, dtype=torch.float64), 1.0),
                                  [SigmoidTransform(), AffineTransform(-a / (1 - 2 * a), 1 / (1 - 2 * a))])
    torch.testing.assert_close(flow.log_prob(y), ref.log_prob(y).flatten(1).sum(1))


def test_dequantize_quantize_and_reduce_bits():
    deq = Dequantize(17)
    x = torch.randint(0, 17, (8, 1, 8, 8)).float()
    y = deq(x)
    assert ((y >= 0) & (y < 1)).all()
    assert torch.equal(deq.quantize(y), x)
    assert torch.equal(reduce_bits(torch.tensor([0.0, 31.0, 32.0, 255.0]), 256, 3), torch.tensor([0.0, 0.0, 1.0, 7.0]))
    with pytest.raises(ValueError, match="levels"):
        reduce_bits(x, 17, 3)


def test_dequantized_top_level_stays_below_one(monkeypatch):
    # 255 + u rounds to 256 in float32 for u within an ulp of 1: y was exactly 1, and RealNVP's
    # logit preprocessing (alpha = 0 allowed) gave NaN bits/dim.
    x = torch.full((2, 1, 4, 4), 255.0)
    monkeypatch.setattr(torch, "rand_like", lambda t: torch.full_like(t, 1 - 2.0**-20))
    y = Dequantize(256)(x)
    assert (y < 1).all() and torch.equal(Dequantize(256).quantize(y), x)
    flow = nflux.RealNVP.image((1, 4, 4), levels=1, hidden=4, blocks=1, alpha=0.0).eval()
    with torch.no_grad():
        assert torch.isfinite(flow.bits_per_dim(x)).all()
    # u = 0 exactly (once in 2^24 draws) at level 0 gave y = 0: logit -inf, NaN bits/dim too.
    monkeypatch.setattr(torch, "rand_like", lambda t: torch.zeros_like(t))
    with torch.no_grad():
        assert torch.isfinite(flow.bits_per_dim(torch.zeros_like(x))).all()
    # Variational noise u = sigmoid(v) is exactly 1 in float32 once v > ~17.
    variational = VariationalDequantize((1, 4, 4), 256, hidden=4, steps=1)
    monkeypatch.setattr(variational, "log_q", lambda x, eps: (torch.ones_like(x), x.new_zeros(x.shape[0])))
    assert (variational.sample(x)[0] < 1).all()


def test_actnorm2d_data_init_and_fused_matches_unfused():
    x = torch.randn(16, 3, 4, 4, dtype=torch.float64) * 3 + 2
    an = ActNorm2d(3).double().train()
    y, lad = an(x)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(y.std((0, 2, 3), correction=0), torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(lad, _jac_logabsdet(an, x[:2]).new_full((16,), lad[0].item()))
    fused = ActNormInvConv1x1(3, seed=0).double().train()
    unfused = Compose(ActNorm2d(3), InvConv1x1(3, seed=0)).double().train()
    yf, lf = fused(x)
    yu, lu = unfused(x)
    torch.testing.assert_close(yf, yu)
    torch.testing.assert_close(lf, lu)
    assert bool(fused.actnorm.initialized)


def test_bad_shapes():
    with pytest.raises(ValueError, match="divisible"):
        nflux.Glow.image((1, 6, 6), levels=2, steps=1, hidden=8)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        nflux.RealNVP.image((4, 4), levels=1)
    flow = nflux.Glow.image((1, 4, 4), levels=2, steps=1, hidden=8)
    with pytest.raises(ValueError, match="images"):
        flow.log_prob(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="Squeeze"):
        Squeeze()(torch.rand(1, 1, 3, 4))


def test_digits_train_step():
    data = nflux.data.load("digits")
    x = data.train[:64]
    flow = nflux.Glow.image((1, 8, 8), levels=2, steps=1, hidden=8, data_levels=data.meta["levels"])
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    bpd = flow.bits_per_dim(x).mean()
    bpd.backward()
    opt.step()
    assert torch.isfinite(bpd) and 0 < bpd.item() < 10


@pytest.mark.parametrize("name", ["glow", "realnvp"])
def test_compile_fullgraph(name):
    shape = (1, 4, 4)
    # RealNVP without its ActNorms keeps the compile short; Glow's cover the data init.
    flow = (MODELS[name](shape, actnorm=False) if name == "realnvp" else MODELS[name](shape)).train()
    x = torch.rand(4, *shape)

    def loss(x):
        return -flow.log_prob(x).mean()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(x)  # first training batch: ActNorm data init inside the graph
    got.backward()
    flow.eval()
    torch.testing.assert_close(compiled(x), loss(x))


def test_state_dict_and_dist():
    flow = MODELS["glow"]((1, 4, 4)).train()
    x = torch.rand(8, 1, 4, 4)
    flow.log_prob(x)  # data init
    flow.eval()
    other = MODELS["glow"]((1, 4, 4))
    other.load_state_dict(flow.state_dict())
    other.eval()
    torch.testing.assert_close(other.log_prob(x), flow.log_prob(x))
    d = flow.dist()
    assert d.event_shape == (1, 4, 4) and d.sample((3,)).shape == (3, 1, 4, 4)
    torch.testing.assert_close(d.log_prob(x), flow.log_prob(x))


@pytest.mark.parametrize("dequantization", ["uniform", "variational"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_integer_typed_images_equal_float_ones(dequantization, dtype):
    flow = nflux.Glow.image((1, 4, 4), levels=1, steps=1, hidden=8, dequantization=dequantization).double()
    x = torch.randint(0, 256, (3, 1, 4, 4))
    torch.manual_seed(0)
    got = flow.bits_per_dim(x.to(dtype))
    torch.manual_seed(0)
    want = flow.bits_per_dim(x.double())  # in the flow's dtype, float64 here
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    y = flow.dequantize(x.to(dtype))
    assert y.dtype == torch.float64 and torch.equal(flow.quantize(y), x.double())
    assert Dequantize(256)(x.to(dtype)).dtype == torch.get_default_dtype()
    # Floating images of another dtype too (a float64 Glow refused float32 ones).
    torch.manual_seed(0)
    torch.testing.assert_close(flow.bits_per_dim(x.float()), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="levels must be an int >= 2, got 16.5"):
        Dequantize(16.5)


@pytest.mark.parametrize("cls", [nflux.RealNVP, nflux.Glow])
def test_image_constructor_arguments_are_checked(cls):
    name = cls.__name__
    for kwargs, needle in [({"levels": 0}, "levels must be an int >= 1, got 0"),
                           ({"levels": -2}, "levels must be an int >= 1, got -2"),
                           ({"hidden": 0}, "hidden must be an int >= 1"),
                           ({"num_classes": 0}, "num_classes must be an int >= 1"),
                           ({"num_classes": 3, "context": 4}, "not both"),
                           ({"data_levels": 1}, "data_levels must be an int >= 2, got 1"),
                           ({"data_levels": 16.5}, "data_levels must be an int >= 2, got 16.5")]:
        with pytest.raises(ValueError, match=f"^nflux: .*{needle}"):
            cls.image((1, 4, 4), **{"levels": 1, **kwargs})
    with pytest.raises(ValueError, match=rf"^nflux: {name}.image shape must be \(C, H, W\) of positive ints"):
        cls.image((0, 4, 4), levels=1)
    # The CLI's name for the scales is in the message (it said "these levels", and the CLI's
    # levels are intensity levels).
    with pytest.raises(ValueError, match=r"levels=3 \(scales; --scales in the CLI\) needs H and W divisible by"):
        cls.image((1, 6, 6), levels=3)
    assert cls.image(torch.Size([1, 4, 4]), levels=1, num_classes=3).context_features == 3
