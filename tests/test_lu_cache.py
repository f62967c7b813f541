"""The inference cache of W and W^-1 in LULinear, InvConv1x1 and ActNormInvConv1x1: cached
results equal the op's, the matrices are reused, and any parameter change rebuilds them."""

from __future__ import annotations

import pytest
import torch

from nflux.transforms import LULinear
from nflux.transforms.image import ActNormInvConv1x1, InvConv1x1


def lu_linear():
    torch.manual_seed(0)
    t = LULinear(5, seed=1)
    with torch.no_grad():  # off the identity-like init, so every factor matters
        for p in t.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return t, torch.randn(7, 5)


def inv_conv():
    torch.manual_seed(0)
    t = InvConv1x1(4, seed=2, bias=True)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return t, torch.randn(3, 4, 2, 5)


def actnorm_conv():
    torch.manual_seed(0)
    t = ActNormInvConv1x1(4, seed=3)
    t(torch.randn(6, 4, 3, 3) * 2 + 1)  # data init (training mode)
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return t, torch.randn(3, 4, 3, 3)


CASES = [lu_linear, inv_conv, actnorm_conv]


def cache_of(t):
    return t.conv._weight_cache if isinstance(t, ActNormInvConv1x1) else t._weight_cache


def uncached(t, x, inverse):
    # With grad on and parameters requiring grad the cache is bypassed: this is the op's result.
    with torch.enable_grad():
        y, lad = (t.inverse if inverse else t.forward)(x)
    return y.detach(), lad.detach()


def check_equal(t, x):
    for inverse in (False, True):
        with torch.no_grad():
            y, lad = (t.inverse if inverse else t.forward)(x)
        y_ref, lad_ref = uncached(t, x, inverse)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lad, lad_ref)


@pytest.mark.parametrize("make", CASES)
def test_cached_equals_uncached_and_is_reused(make):
    t, x = make()
    t.eval()
    check_equal(t, x)
    cache = cache_of(t)
    entries = dict(cache._entries)
    assert set(entries) == {False, True}
    with torch.no_grad():
        t(x)
        t.inverse(x)
    # Same parameters: the very same matrices, not rebuilt.
    assert all(cache._entries[k][0] is entries[k][0] for k in entries)
    with torch.no_grad():
        x_back, lad_inv = t.inverse(t(x)[0])
    torch.testing.assert_close(x_back, x, rtol=1e-4, atol=1e-4)


# Fused optimizers update the parameters without bumping their version counters (nflux's
# trainer uses fused Adam): the cache must still see the step.
OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd-fused": lambda ps: torch.optim.SGD(ps, lr=0.1, fused=True),
    "adam-foreach": lambda ps: torch.optim.Adam(ps, lr=0.1, foreach=True),
    "adam-fused": lambda ps: torch.optim.Adam(ps, lr=0.1, fused=True),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=0.1, fused=True),
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("make", CASES)
def test_optimizer_step_invalidates(make, optimizer):
    t, x = make()
    t.eval()
    with torch.no_grad():
        before = t(x)[0]
    opt = OPTIMIZERS[optimizer](list(t.parameters()))
    y, lad = t(x)
    (y.square().sum() - lad.sum()).backward()
    opt.step()
    with torch.no_grad():
        after = t(x)[0]
    assert not torch.allclose(before, after)
    check_equal(t, x)


@pytest.mark.parametrize("make", CASES)
def test_load_state_dict_invalidates(make):
    t, x = make()
    other, _ = make()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    t.eval()
    other.eval()
    with torch.no_grad():
        t(x), t.inverse(x)
        t.load_state_dict(other.state_dict())
        for inverse in (False, True):
            got = (t.inverse if inverse else t.forward)(x)
            want = uncached(other, x, inverse)
            torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[1], want[1])


@pytest.mark.parametrize("make", CASES)
def test_in_place_edit_invalidates(make):
    t, x = make()
    t.eval()
    names = [n for n, _ in t.named_parameters()]
    for name in names:
        with torch.no_grad():
            t(x), t.inverse(x)
            t.get_parameter(name).add_(0.05)
        check_equal(t, x)


def test_actnorm_buffers_invalidate():
    t, x = actnorm_conv()
    t.eval()
    with torch.no_grad():
        t(x), t.inverse(x)
        t.actnorm.s0.add_(0.1)
    check_equal(t, x)


def test_training_mode_forward_of_actnorm_step_is_not_cached():
    t = ActNormInvConv1x1(4, seed=0)  # training mode, data init pending
    x = torch.randn(8, 4, 2, 2) * 3 + 2
    with torch.no_grad():
        y, _ = t(x)
    # The data init ran (the output is standardised per channel), as without the cache.
    assert bool(t.actnorm.initialized)
    assert len(cache_of(t)._entries) == 0


def test_grad_reaches_input_when_parameters_are_frozen():
    t, x = lu_linear()
    for p in t.parameters():
        p.requires_grad_(False)
    x = x.requires_grad_()
    y, _ = t(x)
    assert len(t._weight_cache._entries) == 1
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, t.weight().sum(0).expand_as(x))


def test_inference_mode():
    t, x = inv_conv()
    with torch.inference_mode():
        y, lad = t(x)
    y_ref, lad_ref = uncached(t, x, False)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    # Matrices made in inference mode are not reused outside it (they cannot be saved for backward).
    x = x.requires_grad_()
    for p in t.parameters():
        p.requires_grad_(False)
    (g,) = torch.autograd.grad(t(x)[0].sum(), x)
    assert torch.isfinite(g).all()


def test_compile_fullgraph_bypasses_cache():
    t, x = inv_conv()
    t.eval()
    compiled = torch.compile(lambda v: t.inverse(t(v)[0]), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        x_back, _ = compiled(x)
        eager = t.inverse(t(x)[0])[0]
    torch.testing.assert_close(x_back, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_back, x, rtol=1e-4, atol=1e-4)
