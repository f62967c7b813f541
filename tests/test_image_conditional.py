"""Conditional image flows (context vectors, class labels, feature-map contexts) and variational
dequantisation: brute-force Jacobians with a context, round trips, samples that depend on the
context, shapes, and the variational bound against a known q."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

import nflux
from nflux.transforms import ChannelCoupling, CheckerboardCoupling, ContextPrior2d, FactorOut, VariationalDequantize

from _flow_helpers import perturb

K = 3


def _jac_logabsdet(fn, x, context):
    """log|det d fn(x_b, c_b) / d x_b| per row: D copies of row b (and of its context) in one
    batched pass; the backward of sum_i y_i[i] gives row i of the Jacobian in copy i."""
    out = []
    for b in range(x.shape[0]):
        D = x[b].numel()
        xs = x[b].expand(D, *x.shape[1:]).clone().requires_grad_(True)
        cs = context[b].expand(D, *context.shape[1:])
        y = fn(xs, cs)[0].reshape(D, -1)
        (g,) = torch.autograd.grad(torch.diagonal(y).sum(), xs)
        out.append(torch.linalg.slogdet(g.reshape(D, -1))[1])
    return torch.stack(out)


def _conditional_transforms():
    # (transform, input shape, context shape): vector contexts and a feature-map context.
    return {
        "checker_vector": (CheckerboardCoupling((2, 4, 4), 0, hidden=8, blocks=1, context_channels=K), (2, 4, 4), (K,)),
        "checker_map": (CheckerboardCoupling((2, 4, 4), 1, hidden=8, blocks=1, context_channels=K), (2, 4, 4),
                        (K, 4, 4)),
        "channel_glow": (ChannelCoupling(4, 0, hidden=8, conditioner="glow", scale="sigmoid", context_channels=K),
                         (4, 2, 2), (K,)),
        "channel_resnet": (ChannelCoupling(4, 1, hidden=8, blocks=1, context_channels=K), (4, 2, 2), (K,)),
        "factor": (FactorOut(4, context_channels=K), (4, 2, 2), (K,)),
        "top_prior": (ContextPrior2d(4, K), (4, 2, 2), (K,)),
    }


@pytest.mark.parametrize("name", list(_conditional_transforms()))
def test_conditional_transform_jacobian_round_trip_and_context_dependence(name):
    t, shape, cshape = _conditional_transforms()[name]
    t = perturb(t.double().eval(), 0.2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, *shape, generator=gen, dtype=torch.float64)
    c = torch.randn(2, *cshape, generator=gen, dtype=torch.float64)
    y, lad = t(x, c)
    assert y.shape == x.shape and lad.shape == (2,)
    torch.testing.assert_close(lad, _jac_logabsdet(t, x, c))
    xr, lad_inv = t.inverse(y, c)
    torch.testing.assert_close(xr, x)
    torch.testing.assert_close(lad_inv, -lad)
    assert not torch.allclose(t(x, c + 1)[0], y)  # the context is used
    with pytest.raises(ValueError, match="context"):
        t(x)


MODELS = {
    "realnvp": lambda shape, **kw: nflux.RealNVP.image(shape, levels=2, hidden=8, blocks=1, **kw),
    "glow": lambda shape, **kw: nflux.Glow.image(shape, levels=2, steps=2, hidden=8, **kw),
}


@pytest.mark.parametrize("shape", [(1, 4, 4), (3, 4, 4)])
@pytest.mark.parametrize("name", list(MODELS))
def test_conditional_model_jacobian_round_trip_and_log_prob(name, shape):
    flow = perturb(MODELS[name](shape, context=K).double().eval(), 0.1)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, *shape, generator=gen, dtype=torch.float64)
    c = torch.randn(2, K, generator=gen, dtype=torch.float64)
    z, lad = flow.transform(x, c)
    assert z.shape == (2, math.prod(shape))
    torch.testing.assert_close(lad, _jac_logabsdet(lambda v, cv: flow.transforms(v, cv), x, c))
    torch.testing.assert_close(flow.log_prob(x, c), Normal(0.0, 1.0).log_prob(z).sum(1) + lad)
    xr, lad_inv = flow.inverse(z, c)
    torch.testing.assert_close(xr, x)
    torch.testing.assert_close(lad_inv, -lad)
    # log_prob broadcasts images against contexts, as nflux.Flow does.
    assert flow.log_prob(x[:1], c).shape == (2,)
    assert flow.log_prob(x[:, None], c[None, :].expand(1, 2, K)).shape == (2, 2)
    torch.testing.assert_close(flow.log_prob(x[:, None], c[None])[:, 1], flow.log_prob(x, c[1:].expand(2, K)))


@pytest.mark.parametrize("name", list(MODELS))
def test_class_conditional_samples_depend_on_label(name):
    flow = perturb(MODELS[name]((1, 4, 4), num_classes=4).double().eval(), 0.1)
    labels = torch.tensor([0, 1, 2])
    torch.manual_seed(0)
    x = flow.sample((5,), labels, temperature=0.7)
    assert x.shape == (5, 3, 1, 4, 4)
    # Integer labels are their one-hot vectors.
    onehot = torch.nn.functional.one_hot(labels, 4).double()
    torch.manual_seed(0)
    torch.testing.assert_close(flow.sample((5,), onehot, temperature=0.7), x)
    # The same latent decodes to different images under different labels.
    z = torch.randn(1, 16, dtype=torch.float64).expand(3, 16)
    images = flow.inverse(z, labels)[0]
    assert not torch.allclose(images[0], images[1]) and not torch.allclose(images[1], images[2])
    # Mode at temperature 0 differs by label, and inverts back to z = 0.
    modes = flow.sample(2, labels, temperature=0.0)
    assert not torch.allclose(modes[0, 0], modes[0, 1])
    torch.testing.assert_close(flow.transform(modes[0], labels)[0], torch.zeros(3, 16, dtype=torch.float64),
                               atol=1e-9, rtol=0)
    bpd = flow.bits_per_dim(torch.randint(0, 256, (3, 1, 4, 4)).double(), labels)
    assert bpd.shape == (3,) and torch.isfinite(bpd).all()


def test_context_errors():
    cond = MODELS["glow"]((1, 4, 4), context=K)
    plain = MODELS["glow"]((1, 4, 4))
    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match="needs a context"):
        cond.log_prob(x)
    with pytest.raises(ValueError, match="without context"):
        plain.log_prob(x, torch.randn(2, K))
    with pytest.raises(ValueError, match="context must be"):
        cond.log_prob(x, torch.randn(2, K + 1))


def test_labels_are_read_by_dtype_with_named_errors():
    flow = MODELS["glow"]((1, 4, 4), num_classes=K)
    x, labels = torch.rand(K, 1, 4, 4), torch.arange(K)
    expected = flow.log_prob(x, labels)
    one_hot = torch.nn.functional.one_hot(labels, K)
    torch.testing.assert_close(flow.log_prob(x, one_hot.float()), expected)
    torch.testing.assert_close(flow.log_prob(x[:1], 1), flow.log_prob(x[:1], torch.tensor(1)))  # a Python int
    # Float labels of the same length as K used to pass as one soft label; now the shape check
    # names both forms (a batch of K float labels is still a soft label, so use another length).
    with pytest.raises(ValueError, match="integer tensor .* of classes, or a floating one-hot"):
        flow.log_prob(x[:2], labels[:2].float())
    with pytest.raises(ValueError, match=rf"class labels must lie in \[0, {K}\)"):
        flow.log_prob(x, torch.tensor([0, 1, K]))
    with pytest.raises(ValueError, match="class labels must lie"):
        flow.sample(2, torch.tensor(-1))


def _logistic_normal_log_density(u):
    """log density of u = sigmoid(eps), eps ~ N(0, I), summed per row."""
    v = torch.logit(u)
    return (Normal(0.0, 1.0).log_prob(v) - torch.log(u) - torch.log1p(-u)).flatten(1).sum(1)


def test_variational_dequantizer_is_a_known_density_at_init_and_bounds_exactly():
    shape, levels = (2, 4, 4), 17
    deq = VariationalDequantize(shape, levels, hidden=8, steps=2).double()
    x = torch.randint(0, levels, (3, *shape), generator=torch.Generator().manual_seed(0)).double()
    # Identity couplings at init: q(u | x) is the logistic-normal density, whatever x.
    torch.manual_seed(0)
    y, log_q = deq.sample(x)
    u = y * levels - x
    assert ((u > 0) & (u < 1)).all() and torch.equal(deq.quantize(y), x)
    torch.testing.assert_close(log_q, _logistic_normal_log_density(u))
    # The bound: bits/dim = -(log p(y) - D log L - log q(u | x)) / (D log 2), with the same noise.
    flow = nflux.Glow.image(shape, levels=1, steps=1, hidden=8, data_levels=levels).double().eval()
    flow.dequantizer = perturb(deq, 0.2)
    torch.manual_seed(1)
    y, log_q = flow.dequantizer.sample(x)
    D = math.prod(shape)
    want = -(flow.log_prob(y) - D * math.log(levels) - log_q) / (D * math.log(2))
    torch.manual_seed(1)
    torch.testing.assert_close(flow.bits_per_dim(x), want)


def test_variational_dequantizer_log_q_matches_brute_force_jacobian():
    shape, levels = (1, 4, 4), 17
    deq = perturb(VariationalDequantize(shape, levels, hidden=8, steps=3).double(), 0.1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, levels, (2, *shape), generator=gen).double()
    eps = torch.randn(2, *shape, generator=gen, dtype=torch.float64)
    u, log_q = deq.log_q(x, eps)
    assert not torch.allclose(log_q, _logistic_normal_log_density(u))  # the couplings act
    # log q(u | x) = log N(eps) - log|det du/deps|, the Jacobian taken with x held fixed.
    lad = _jac_logabsdet(lambda e, xc: (deq.log_q(xc, e)[0],), eps, x)
    torch.testing.assert_close(log_q, Normal(0.0, 1.0).log_prob(eps).flatten(1).sum(1) - lad)


@pytest.mark.parametrize("name", list(MODELS))
def test_variational_dequantization_trains(name):
    flow = MODELS[name]((1, 4, 4), data_levels=17, dequantization="variational")
    assert isinstance(flow.dequantizer, VariationalDequantize)
    x = torch.randint(0, 17, (8, 1, 4, 4)).float()
    bpd = flow.bits_per_dim(x).mean()
    bpd.backward()
    q_grads = [p.grad for p in flow.dequantizer.parameters()]
    assert all(g is not None for g in q_grads) and any(g.abs().sum() > 0 for g in q_grads)
    with pytest.raises(ValueError, match="dequantization"):
        MODELS[name]((1, 4, 4), dequantization="gaussian")


def test_conditional_compile_fullgraph():
    flow = MODELS["glow"]((1, 4, 4), num_classes=3).train()
    x, labels = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 1])

    def loss(x, labels):
        return -flow.log_prob(x, labels).mean()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    compiled(x, labels).backward()  # first training batch: ActNorm data init inside the graph
    flow.eval()
    torch.testing.assert_close(compiled(x, labels), loss(x, labels))


def test_conditional_dist_batch_shape_with_labels():
    flow = MODELS["glow"]((1, 4, 4), num_classes=3).eval()
    d = flow.dist(torch.tensor([0, 2]))
    assert d.batch_shape == (2,) and d.event_shape == (1, 4, 4)
    x = d.sample((5,))
    assert x.shape == (5, 2, 1, 4, 4)
    torch.testing.assert_close(d.log_prob(x), flow.log_prob(x, torch.tensor([0, 2])))
    e = d.expand((3, 2))
    assert e.batch_shape == (3, 2) and e.event_shape == (1, 4, 4) and e.sample().shape == (3, 2, 1, 4, 4)
