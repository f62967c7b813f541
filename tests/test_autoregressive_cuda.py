"""made_inverse on CUDA (the persistent kernel, csrc/cuda/made_inverse.cu) against the CPU kernel.
Skipped without a CUDA device."""

import pytest
import torch

import nflux
from test_autoregressive_inverse import SPLINE, _args, _kw, _made

pytestmark = pytest.mark.cuda

CASES = [  # transformer, residual, ordering, context, activation
    ("affine", False, "natural", False, "relu"),
    ("affine", True, "random", True, "tanh"),
    ("rq_spline", False, "random", True, "gelu"),
    ("rq_spline", True, "reversed", True, "elu"),
]


def _to(tensors, device):
    return [t.detach().to(device) for t in tensors]


def _forward_and_grads(made, y, c, transformer, device):
    """made_inverse's outputs and the gradients of a fixed random linear function of them."""
    y, w, b, degrees, terms = _args(made, y, c)
    leaves = [t.detach().to(device).requires_grad_() for t in (y, *w, *b, *terms)]
    n = len(w)
    x, lad = nflux.ops.made_inverse(leaves[0], leaves[1 : 1 + n], leaves[1 + n : 1 + 2 * n], degrees,
                                    leaves[1 + 2 * n :], **_kw(made, transformer))
    g = torch.Generator().manual_seed(5)
    gx = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x)
    gl = torch.randn(lad.shape, generator=g, dtype=torch.float64).to(lad)
    grads = torch.autograd.grad((x, lad), leaves, (gx, gl))
    return [t.detach().cpu() for t in (x, lad, *grads)]


@pytest.mark.parametrize("transformer,residual,ordering,context,activation", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_equals_cpu(transformer, residual, ordering, context, activation, dtype):
    """Forward and backward kernels: outputs and every gradient equal the CPU kernels'."""
    made = _made(D=7, transformer=transformer, residual=residual, ordering=ordering, context=context,
                 activation=activation, hidden=(24, 24), dtype=dtype)
    g = torch.Generator().manual_seed(4)
    y = torch.randn(1000, 7, generator=g, dtype=dtype) * 1.5  # many tiles, the last ragged
    c = torch.randn(1000, 3, generator=g, dtype=dtype) if context else None
    want = _forward_and_grads(made, y, c, transformer, "cpu")
    got = _forward_and_grads(made, y, c, transformer, "cuda")
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-4, rtol=2e-4)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"output/gradient {i}: {m}")


def test_cuda_wide_layers_take_small_tiles():
    """Hidden layers too wide for a 32-row tile in shared memory: the kernels take fewer rows."""
    made = _made(D=6, hidden=(2048, 2048), transformer="rq_spline", residual=True, context=True,
                 dtype=torch.float64, scale=0.05)
    y = torch.randn(300, 6, dtype=torch.float64)
    c = torch.randn(300, 3, dtype=torch.float64)
    want = _forward_and_grads(made, y, c, "rq_spline", "cpu")
    got = _forward_and_grads(made, y, c, "rq_spline", "cuda")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_cuda_kernel_matches_composite_and_round_trips():
    made = _made(D=5, transformer="affine", residual=False, ordering="random", context=True).cuda()
    y = torch.randn(129, 5, dtype=torch.float64, device="cuda")
    c = torch.randn(129, 3, dtype=torch.float64, device="cuda")
    kw = _kw(made, "affine")
    options = (kw["residual"], kw["activation"], "affine", *SPLINE.values())
    with torch.no_grad():
        x, lad = nflux.ops.made_inverse(*_args(made, y, c), **kw)
        torch.testing.assert_close((x, lad), torch.ops.nflux._made_inverse_composite(*_args(made, y, c), *options))
        y_back, lad_fwd = made.transform(x, "affine", c)
    torch.testing.assert_close(y_back, y, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(lad, -lad_fwd, atol=1e-9, rtol=1e-9)


def test_cuda_gradcheck():
    made = _made(D=3, hidden=(5, 5), transformer="rq_spline", residual=True, context=True,
                 ordering="random", activation="tanh").cuda()
    y = torch.randn(4, 3, dtype=torch.float64, device="cuda")
    c = torch.randn(4, 3, dtype=torch.float64, device="cuda")
    y, w, b, degrees, terms = _args(made, y, c)
    leaves = [t.detach().requires_grad_() for t in (y, *w, *b, *terms)]
    n, kw = len(w), _kw(made, "rq_spline")

    def fn(*t):
        return nflux.ops.made_inverse(t[0], t[1 : 1 + n], t[1 + n : 1 + 2 * n], degrees, t[1 + 2 * n :], **kw)

    assert torch.autograd.gradcheck(fn, leaves)
