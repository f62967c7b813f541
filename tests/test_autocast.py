"""torch.autocast: flow transforms compute in float32 whatever dtype their conditioner hands them,
masked_linear (a conditioner layer) in the autocast dtype, float64 is left alone; every model
trains, inverts and compiles under autocast."""

from __future__ import annotations

import pytest
import torch

import nflux
from nflux import _extension, ops
from nflux.nets.made import MADE

from _flow_helpers import perturb
from test_lu_conv1x1 import data, params

pytestmark = pytest.mark.skipif(not _extension.loaded, reason="native extension not built")

BF16 = torch.bfloat16


def autocast(dtype=BF16):
    return torch.autocast("cpu", dtype=dtype)


@pytest.fixture(params=["wrapper", "torch.ops"])
def entry(request):
    return request.param


@pytest.mark.parametrize("half", [BF16, torch.float16])
@pytest.mark.parametrize("scale,inverse", [("exp", False), ("sigmoid", True)])
def test_affine_coupling_computes_in_float32(entry, scale, inverse, half):
    x = data((6, 5), torch.float32, seed=0)
    shift = data((6, 5), torch.float32, seed=1).to(half).requires_grad_()
    logits = data((6, 5), torch.float32, seed=2).to(half).requires_grad_()

    def run(x, s, l):
        if entry == "wrapper":
            return ops.affine_coupling(x, s, l, scale=scale, clamp=3.0, inverse=inverse)
        return torch.ops.nflux.affine_coupling(x, s, l, 1 if scale == "exp" else 2, 3.0, inverse)

    with autocast(half):
        y, lad = run(x, shift, logits)
    assert y.dtype == lad.dtype == torch.float32
    shift32, logits32 = (t.detach().float().requires_grad_() for t in (shift, logits))
    y32, lad32 = run(x, shift32, logits32)
    assert torch.equal(y, y32) and torch.equal(lad, lad32)
    (y.sum() + lad.sum()).backward()
    (y32.sum() + lad32.sum()).backward()
    assert shift.grad.dtype == logits.grad.dtype == half  # autograd casts back to the input's dtype
    assert torch.equal(shift.grad, shift32.grad.to(half)) and torch.equal(logits.grad, logits32.grad.to(half))


def test_rq_spline_computes_in_float32(entry):
    K = 5
    x = data((7, 3), torch.float32, seed=0) * 2
    w, h, d = (data((7, 3, n), torch.float32, seed=s).to(BF16) for n, s in ((K, 1), (K, 2), (K - 1, 3)))
    with autocast():
        if entry == "wrapper":
            y, lad = ops.rq_spline(x, w, h, d)
        else:
            y, lad = torch.ops.nflux.rq_spline(x, w, h, d, False, 3.0, 1e-3, 1e-3, 1e-3)
    assert y.dtype == lad.dtype == torch.float32
    y32, lad32 = ops.rq_spline(x, w.float(), h.float(), d.float())
    assert torch.equal(y, y32) and torch.equal(lad, lad32)
    with autocast():  # and the inverse, from the same bfloat16 parameters, gives x back
        x_back, lad_back = ops.rq_spline(y, w, h, d, inverse=True)
    torch.testing.assert_close(x_back, x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lad_back, -lad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("inverse", [False, True])
def test_lu_conv1x1_products_stay_float32(entry, inverse):
    perm, lower, upper, log_scale, sign, bias = params(8, dtype=torch.float32)
    x = data((4, 8, 3, 3), torch.float32, seed=5)
    args = (x, perm, lower, upper, log_scale, sign, bias)

    def run():
        if entry == "wrapper":
            return ops.lu_conv1x1(*args, inverse=inverse)
        return torch.ops.nflux.lu_conv1x1(*args, inverse)

    y32, lad32 = run()
    with autocast():
        y, lad = run()
    # Bitwise: the channel-mixing GEMM inside the op is not autocast to bfloat16.
    assert y.dtype == torch.float32 and torch.equal(y, y32) and torch.equal(lad, lad32)
    with autocast():  # a bfloat16 input is widened, not the parameters narrowed
        y_from_half, _ = ops.lu_conv1x1(x.to(BF16), *args[1:], inverse=inverse)
    assert torch.equal(y_from_half, ops.lu_conv1x1(x.to(BF16).float(), *args[1:], inverse=inverse)[0])
    actnorm = (torch.full((8,), 0.1), torch.full((8,), -0.2))
    with autocast():  # the fused ActNorm step too: its checks run on the widened input
        y_step, _ = ops.actnorm_lu_conv1x1(x.to(BF16), *args[1:], *actnorm, inverse=inverse)
    assert torch.equal(y_step, ops.actnorm_lu_conv1x1(x.to(BF16).float(), *args[1:], *actnorm, inverse=inverse)[0])


def test_masked_linear_computes_in_the_autocast_dtype(entry):
    made = MADE(6, 2, (16, 16))
    w, b, mask = made.weights[1], made.biases[1], made.masks()[1]
    blocks = ops.masked_linear_blocks(mask, overhead=0)
    assert blocks, "a sorted MADE mask has rectangles"
    x = data((9, 16), torch.float32, seed=3)
    with autocast():
        if entry == "wrapper":
            y = ops.masked_linear(x, w, b, mask, blocks)
        else:
            y = torch.ops.nflux.masked_linear(x, w, b, mask, blocks)
    assert y.dtype == BF16
    expected = torch.nn.functional.linear(x.to(BF16), (w * mask).to(BF16), b.to(BF16))
    torch.testing.assert_close(y, expected, atol=0, rtol=0)
    y.float().square().sum().backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    assert torch.count_nonzero(w.grad[mask == 0]) == 0 and torch.count_nonzero(w.grad[mask == 1]) > 0


def test_masked_linear_in_half_types_takes_one_dense_product():
    made = MADE(6, 2, (16, 16))
    w, b, mask = (t.detach().to(BF16) for t in (made.weights[1], made.biases[1], made.masks()[1]))
    blocks = [0, 1, 0, 16]  # covers row 0 only: honoured, it would leave the other rows at the bias
    x = data((9, 16), torch.float32, seed=3).to(BF16)
    assert torch.equal(ops.masked_linear(x, w, b, mask, blocks), ops.masked_linear(x, w, b, mask))
    g = data((9, 16), torch.float32, seed=4).to(BF16)
    with_blocks = torch.ops.nflux.masked_linear_backward(g, x, w, mask, blocks)
    dense = torch.ops.nflux.masked_linear_backward(g, x, w, mask, [])
    assert all(torch.equal(a, d) for a, d in zip(with_blocks, dense))


def test_float64_is_left_alone(entry):
    x, shift, logits = (data((4, 3), torch.float64, seed=s) for s in range(3))
    made = MADE(3, 2, (8,)).double()
    w, b, mask = made.weights[0], made.biases[0], made.masks()[0]
    blocks = ops.masked_linear_blocks(mask, overhead=0)

    def run(shift):
        if entry == "wrapper":
            return ops.affine_coupling(x, shift, logits)[0], ops.masked_linear(x, w, b, mask, blocks)
        return (torch.ops.nflux.affine_coupling(x, shift, logits, 1, None, False)[0],
                torch.ops.nflux.masked_linear(x, w, b, mask, blocks))

    with autocast():
        y, out = run(shift)
    assert y.dtype == out.dtype == torch.float64
    assert torch.equal(y, ops.affine_coupling(x, shift, logits)[0])
    assert torch.equal(out, ops.masked_linear(x, w, b, mask, blocks))
    with autocast():  # a float32 shift meeting a float64 x is promoted, not narrowed
        y_mixed, _ = run(shift.float())
    assert y_mixed.dtype == torch.float64 and torch.equal(y_mixed, ops.affine_coupling(x, shift.float().double(), logits)[0])


def test_made_inverse_and_transformer_compute_in_float32():
    made = perturb(MADE(4, 2, (12, 12)), 0.2)
    y = data((5, 4), torch.float32, seed=7)
    args = (list(made.weights), list(made.biases), made.degrees)
    with autocast():
        x, lad = ops.made_inverse(y.to(BF16), *args)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, ops.made_inverse(y.to(BF16).float(), *args)[0], atol=0, rtol=0)
    ar_params = data((5, 4, 2), torch.float32, seed=8).to(BF16)
    with autocast():
        out, lad = ops.autoregressive_transformer(y, ar_params, "affine")
        back, lad_back = ops.autoregressive_transformer(out, ar_params, "affine", inverse=True)
    assert out.dtype == lad.dtype == torch.float32
    torch.testing.assert_close(out, ops.autoregressive_transformer(y, ar_params.float(), "affine")[0], atol=0, rtol=0)
    torch.testing.assert_close(back, y, atol=1e-6, rtol=1e-6)  # exact inverse: exp in float32


def test_fallback_follows_the_same_policy(monkeypatch):
    x = data((6, 5), torch.float32, seed=0)
    shift, logits = (data((6, 5), torch.float32, seed=s).to(BF16) for s in (1, 2))
    w, h, d = (data((6, 5, n), torch.float32, seed=s).to(BF16) for n, s in ((4, 3), (4, 4), (3, 5)))
    conv_args = (data((4, 8, 3, 3), torch.float32, seed=5), *params(8, dtype=torch.float32))
    made = perturb(MADE(5, 2, (12, 12)), 0.2)
    made_args = (x, list(made.weights), list(made.biases), made.degrees)

    def run():
        with autocast():
            return (ops.affine_coupling(x, shift, logits), ops.rq_spline(x, w, h, d), ops.lu_conv1x1(*conv_args),
                    ops.made_inverse(*made_args), (ops.masked_linear(x, made.weights[0], None, made.masks()[0]),))

    native = run()
    monkeypatch.setattr(_extension, "cpu_kernels", False)
    monkeypatch.setattr(_extension, "loaded", False)  # lu_conv1x1's switch
    monkeypatch.setattr(_extension, "_warned", True)
    fallback = run()
    for got, want in zip(fallback, native):
        assert got[0].dtype == want[0].dtype
        # The reference's products in float32 too (a bfloat16 GEMM would be off by ~1e-2).
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("half", [BF16, torch.float16])
def test_half_inputs_outside_autocast_compute_in_float32(half):
    # The CPU kernels take float32 and float64 only; half inputs fall back to the reference,
    # which ran in their own dtype: bfloat16 merged spline knots (NaN in ~19% of logabsdets) and
    # had no triangular solve for lu_conv1x1's inverse. Now: float32 inside, outputs in `half`,
    # equal to the native float32 result up to one rounding to `half`.
    HALF_TOL = dict(atol=1e-3, rtol=1.6e-2)
    g = torch.Generator().manual_seed(0)
    K = 8
    x = torch.rand(1000, generator=g) * 6 - 3
    w, h = (torch.randn(1000, K, generator=g) * 3 for _ in range(2))
    d = torch.randn(1000, K - 1, generator=g) * 3
    y, lad = ops.rq_spline(*(t.to(half) for t in (x, w, h, d)))
    want_y, want_lad = ops.rq_spline(*(t.to(half).float() for t in (x, w, h, d)))
    assert y.dtype == lad.dtype == half and torch.isfinite(lad).all()
    torch.testing.assert_close(y, want_y.to(half), **HALF_TOL)
    torch.testing.assert_close(lad, want_lad.to(half), **HALF_TOL)
    conv_args = (data((4, 8, 3, 3), torch.float32, seed=5), *params(8, dtype=torch.float32))
    half_args = tuple(t.to(half) if t.is_floating_point() else t for t in conv_args)
    for inverse in (False, True):
        got = ops.lu_conv1x1(*half_args, inverse=inverse)
        want = ops.lu_conv1x1(*(t.float() if t.is_floating_point() else t for t in half_args), inverse=inverse)
        assert got[0].dtype == half
        torch.testing.assert_close(got, tuple(t.to(half) for t in want), **HALF_TOL)
    made = perturb(MADE(4, 2, (12, 12)), 0.2).to(half)
    got = ops.made_inverse(data((5, 4), torch.float32, seed=7).to(half), list(made.weights), list(made.biases),
                           made.degrees)
    want = ops.made_inverse(data((5, 4), torch.float32, seed=7).to(half).float(), [t.float() for t in made.weights],
                            [t.float() for t in made.biases], made.degrees)
    assert got[0].dtype == half
    torch.testing.assert_close(got, tuple(t.to(half) for t in want), **HALF_TOL)
    # The LU transforms' inference cache too: a half Glow samples (no half triangular solve).
    flow = nflux.Glow(4, layers=2, hidden=(8,))
    flow.log_prob(torch.randn(64, 4))
    flow = flow.to(half).eval()
    with torch.no_grad():
        z = torch.randn(5, 4).to(half)
        x_half, _ = flow.inverse(z)
        x_float, _ = flow.float().inverse(z.float())
    assert x_half.dtype == half
    torch.testing.assert_close(x_half.float(), x_float, atol=0.1, rtol=0.05)
    shift, logits = (data((6, 5), torch.float32, seed=s).to(half) for s in (1, 2))
    got = ops.affine_coupling(data((6, 5), torch.float32, seed=0).to(half), shift, logits)
    want = ops.affine_coupling(data((6, 5), torch.float32, seed=0).to(half).float(), shift.float(), logits.float())
    torch.testing.assert_close(got, tuple(t.to(half) for t in want), **HALF_TOL)


D = 4
MODELS = {
    "NICE": lambda: nflux.NICE(D, layers=2, hidden=(16, 16)),
    "RealNVP": lambda: nflux.RealNVP(D, layers=2, hidden=(16, 16)),
    "Glow": lambda: nflux.Glow(D, layers=2, hidden=(16, 16)),
    "MAF": lambda: nflux.MAF(D, layers=2, hidden=(16, 16)),
    "IAF": lambda: nflux.IAF(D, layers=2, hidden=(16, 16)),
    "NSF": lambda: nflux.NSF(D, layers=2, hidden=(16, 16), bins=4),
    "NSF_ar": lambda: nflux.NSF(D, layers=2, hidden=(16, 16), bins=4, autoregressive=True),
    "glow_image": lambda: nflux.Glow.image((2, 4, 4), levels=2, steps=2, hidden=8),
    "realnvp_image": lambda: nflux.RealNVP.image((2, 4, 4), levels=2, hidden=8, blocks=1),
}
COUPLING = {"NICE", "RealNVP", "Glow", "NSF", "glow_image", "realnvp_image"}


def _flow_and_data(name):
    torch.manual_seed(0)
    flow = MODELS[name]()
    image = name.endswith("image")
    x = torch.rand(16, 2, 4, 4) if image else 1 + 2 * torch.randn(16, D)
    flow.train().log_prob(x)  # ActNorm's data-dependent init
    return perturb(flow, 0.1), x


@pytest.mark.parametrize("name", list(MODELS))
def test_models_train_and_invert_under_autocast(name):
    flow, x = _flow_and_data(name)
    flow.eval()  # the image flows' dequantisation noise: same draw both ways below
    torch.manual_seed(1)
    lp32 = flow.log_prob(x)
    torch.manual_seed(1)
    with autocast():
        lp = flow.log_prob(x)
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all()
    # Only the conditioners' precision differs: the log-densities agree to bfloat16's 3 digits.
    assert (lp - lp32).abs().max() < 1e-2 * lp32.abs().max() + 0.1
    (-lp.mean()).backward()
    for p in flow.parameters():
        assert p.grad is None or (p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in flow.parameters())
    if name in COUPLING:
        # The conditioners see the same input both ways, so the inverse is exact to float32;
        # without gradients the LU layers take their cached W, which must follow the policy.
        for grad in (True, False):
            with torch.set_grad_enabled(grad), autocast():
                z, lad = flow.transform(x)
                back, lad_back = flow.inverse(z)
            assert z.dtype == lad.dtype == lad_back.dtype == torch.float32
            torch.testing.assert_close(back, x, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(lad_back, -lad, atol=1e-3, rtol=1e-4)
            if grad:
                z_grad = z
        torch.testing.assert_close(z, z_grad, atol=1e-5, rtol=1e-5)
        with torch.no_grad():  # and float32 calls after autocast ones (the cache's entries)
            torch.testing.assert_close(flow.inverse(flow.transform(x)[0])[0], x, atol=1e-4, rtol=1e-4)
    if name in ("MAF", "NSF_ar"):
        # Sampling inverts the MADEs with made_inverse, in float32: autocast changes nothing.
        torch.manual_seed(2)
        s32 = flow.sample((5,))
        torch.manual_seed(2)
        with autocast():
            s = flow.sample((5,))
        assert torch.equal(s, s32)


def test_class_conditional_image_prior_stays_float32():
    torch.manual_seed(0)
    flow = nflux.Glow.image((2, 4, 4), levels=2, steps=1, hidden=8, num_classes=3)
    x, labels = torch.rand(6, 2, 4, 4), torch.arange(6) % 3
    flow.train().log_prob(x, labels)
    flow = perturb(flow, 0.1).eval()
    with autocast():
        lp = flow.log_prob(x, labels)
        z, lad = flow.transform(x, labels)
        back, lad_back = flow.inverse(z, labels)
    assert lp.dtype == lad.dtype == torch.float32
    torch.testing.assert_close(back, x, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lad_back, -lad, atol=1e-3, rtol=1e-4)


def test_meta_tensors_pass_through(monkeypatch):
    # Devices without autocast (meta: shape inference) skip the policy instead of failing.
    monkeypatch.setattr(_extension, "_warned", True)  # meta takes the reference: no warning here
    x, shift, logits = (torch.empty(4, 3, device="meta") for _ in range(3))
    y, lad = ops.affine_coupling(x, shift, logits)
    assert y.device.type == "meta" and lad.shape == (4,)


@pytest.mark.parametrize("name", ["NSF", "MAF"])
def test_compile_fullgraph_under_autocast(name):
    torch._dynamo.reset()
    flow, x = _flow_and_data(name)

    def loss(x):
        with autocast():
            return -flow.log_prob(x).mean()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, loss(x), atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_cuda_autocast_follows_the_same_policy():
    dev = torch.device("cuda")
    x = data((6, 5), torch.float32, seed=0).to(dev)
    shift, logits = (data((6, 5), torch.float32, seed=s).to(dev, BF16) for s in (1, 2))
    w, h, d = (data((6, 5, n), torch.float32, seed=s).to(dev, BF16) for n, s in ((4, 3), (4, 4), (3, 5)))
    perm, lower, upper, log_scale, sign, bias = (t.to(dev) for t in params(8, dtype=torch.float32))
    xc = data((4, 8, 3, 3), torch.float32, seed=5).to(dev)
    made = MADE(6, 2, (16, 16)).to(dev)
    wm, bm, mask = made.weights[1], made.biases[1], made.masks()[1]
    xm = data((9, 16), torch.float32, seed=3).to(dev)
    with torch.autocast("cuda", dtype=BF16):
        coupled = ops.affine_coupling(x, shift, logits)
        spline = ops.rq_spline(x, w, h, d)
        conv = ops.lu_conv1x1(xc, perm, lower, upper, log_scale, sign, bias)
        masked = torch.ops.nflux.masked_linear(xm, wm, bm, mask, ops.masked_linear_blocks(mask, overhead=0))
    for got, want in ((coupled, ops.affine_coupling(x, shift.float(), logits.float())),
                      (spline, ops.rq_spline(x, w.float(), h.float(), d.float())),
                      (conv, ops.lu_conv1x1(xc, perm, lower, upper, log_scale, sign, bias))):
        assert got[0].dtype == torch.float32
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert masked.dtype == BF16
    flow = perturb(nflux.NSF(4, layers=2, hidden=(16, 16), bins=4, autoregressive=True), 0.1).to(dev)
    with torch.autocast("cuda", dtype=BF16):
        lp = flow.log_prob(torch.randn(32, 4, device=dev))
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all()
