"""Gradients of gradients through the native ops (python/nflux/ops/_double_backward.py):
gradient penalties, score matching and Hessians must get the reference's values, to any order."""

import sys

import pytest
import torch
from torch.autograd import gradgradcheck

import nflux
from nflux import _extension
from nflux.ops import reference

pytestmark = [
    pytest.mark.skipif(not _extension.loaded, reason="native extension not built"),
    pytest.mark.filterwarnings("error"),  # torch warns when a backward op has no autograd
]

F64 = dict(dtype=torch.float64)


def leaf(*shape, scale=1.0):
    return (torch.randn(*shape, **F64) * scale).requires_grad_()


@pytest.mark.parametrize("options", [dict(), dict(scale="sigmoid"), dict(clamp=1.5), dict(inverse=True),
                                     dict(scale="sigmoid", clamp=2.0, inverse=True)])
def test_affine_coupling(options):
    x, shift, logits = leaf(4, 3), leaf(4, 3), leaf(4, 3)
    assert gradgradcheck(lambda *a: nflux.ops.affine_coupling(*a, **options), (x, shift, logits))


@pytest.mark.parametrize("inverse", [False, True])
def test_additive_coupling(inverse):
    assert gradgradcheck(lambda x, t: nflux.ops.affine_coupling(x, t, inverse=inverse), (leaf(4, 3), leaf(4, 3)))


@pytest.mark.parametrize("inverse", [False, True])
def test_rq_spline(inverse):
    x = (torch.rand(6, 2, **F64) * 5 - 2.5).requires_grad_()  # some in the tails
    args = (x, leaf(6, 2, 4), leaf(6, 2, 4), leaf(6, 2, 3))
    assert gradgradcheck(lambda *a: nflux.ops.rq_spline(*a, inverse=inverse, tail_bound=2.0), args)


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("image", [False, True])
def test_lu_conv1x1(inverse, image):
    C = 3
    perm, sign = torch.tensor([2, 0, 1]), torch.tensor([1.0, -1.0, 1.0], **F64)
    x = leaf(2, C, 2, 2) if image else leaf(4, C)
    params = (leaf(C, C), leaf(C, C), leaf(C, scale=0.1), leaf(C), leaf(C), leaf(C, scale=0.1))

    def fn(x, lower, upper, log_scale, bias, shift, in_scale):
        return nflux.ops.lu_conv1x1(x, perm, lower, upper, log_scale, sign, bias, inverse=inverse) if image else \
            torch.ops.nflux.lu_conv1x1(x, perm, lower, upper, log_scale, sign, bias, inverse, shift, in_scale)

    assert gradgradcheck(fn, (x, *params))


@pytest.mark.parametrize("blocks", [False, True])
def test_masked_linear(blocks):
    mask = (torch.rand(5, 4, generator=torch.Generator().manual_seed(1)) > 0.4).double()
    extra = (nflux.ops.masked_linear_blocks(mask),) if blocks else ()
    assert gradgradcheck(lambda x, w, b: nflux.ops.masked_linear(x, w, b, mask, *extra), (leaf(3, 4), leaf(5, 4), leaf(5)))


def third_order(op, x, params, mixed):
    """d/dx of |d/dp of sum(g^3)|^2 where g = d/dp of (|y|^2 + sum lad): a chain whose
    cotangents (2y, 3g^2) depend on the op's own inputs, so each partial derivative must be
    kept apart from the paths autograd follows outside the op."""
    y, lad = op(x, *params)
    (g,) = torch.autograd.grad(y.square().sum() + lad.sum(), params[0], create_graph=True)
    (h,) = torch.autograd.grad(g.pow(3).sum(), mixed, create_graph=True)
    (k,) = torch.autograd.grad(h.square().sum(), params[0])
    return h, k


@pytest.mark.parametrize("op", ["affine_coupling", "rq_spline"])
def test_higher_orders_match_the_reference(op):
    torch.manual_seed(0)
    x = leaf(3, 2)
    if op == "affine_coupling":
        params = (leaf(3, 2), torch.randn(3, 2, **F64))
        native = lambda x, s, t: nflux.ops.affine_coupling(x, t, s, scale="sigmoid")  # noqa: E731
        ref = lambda x, s, t: reference.affine_coupling(x, t, s, scale="sigmoid")  # noqa: E731
    else:
        params = (leaf(3, 2, 4), torch.randn(3, 2, 4, **F64), torch.randn(3, 2, 3, **F64))
        native, ref = nflux.ops.rq_spline, reference.rq_spline
    for mixed in (params[0], x):
        for got, want in zip(third_order(native, x, params, mixed), third_order(ref, x, params, mixed)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("model", ["NICE", "RealNVP", "Glow", "MAF", "NSF", "NSF-AR"])
def test_models(model):
    torch.manual_seed(0)
    make = (lambda D, **kw: nflux.NSF(D, autoregressive=True, **kw)) if model == "NSF-AR" else getattr(nflux, model)
    flow = make(3, layers=2, hidden=(8,)).double()
    flow.log_prob(torch.randn(16, 3, **F64))  # ActNorm's data init
    assert gradgradcheck(flow.log_prob, (leaf(4, 3),))


def test_score_matching_gradient_matches_the_reference(monkeypatch):
    """The parameter gradient of the score-matching loss |grad_x log p(x)|^2 (second order
    through every op's backward) equals that of the same flow on the reference ops."""
    torch.manual_seed(0)
    flow = nflux.Glow(4, layers=2, hidden=(16,)).double()
    flow.log_prob(torch.randn(32, 4, **F64))
    x = leaf(8, 4)

    def loss_grads():
        (score,) = torch.autograd.grad(flow.log_prob(x).sum(), x, create_graph=True)
        return torch.autograd.grad(score.square().sum(), list(flow.parameters()))

    native = loss_grads()
    monkeypatch.setattr(nflux.ops, "affine_coupling", reference.affine_coupling)
    monkeypatch.setattr(nflux.ops, "lu_conv1x1", reference.lu_conv1x1)
    for got, want in zip(native, loss_grads()):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_first_order_backward_stays_in_cpp():
    """Without create_graph the native backward ops run below autograd: no nflux Python runs
    during backward (the per-call cost of tabular flows stays in C++)."""
    x = torch.randn(16, 4)
    models = [nflux.NSF(4, layers=2, hidden=(8,)), nflux.Glow(4, layers=2, hidden=(8,)), nflux.MAF(4, layers=2, hidden=(8,))]
    losses = [-m.log_prob(x).mean() for m in models]
    files = []
    sys.setprofile(lambda frame, event, arg: files.append(frame.f_code.co_filename) if event == "call" else None)
    try:
        for loss in losses:
            loss.backward()
    finally:
        sys.setprofile(None)
    assert not [f for f in files if "/nflux/" in f]
