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


@pytest.mark.parametrize("transformer,residual,ordering,context,activation", CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_equals_cpu(transformer, residual, ordering, context, activation, dtype):
    made = _made(D=7, transformer=transformer, residual=residual, ordering=ordering, context=context,
                 activation=activation, hidden=(24, 24), dtype=dtype)
    g = torch.Generator().manual_seed(4)
    y = torch.randn(1000, 7, generator=g, dtype=dtype) * 1.5  # many tiles, the last ragged
    c = torch.randn(1000, 3, generator=g, dtype=dtype) if context else None
    y, w, b, degrees, terms = _args(made, y, c)
    kw = _kw(made, transformer)
    with torch.no_grad():
        want = nflux.ops.made_inverse(y, w, b, degrees, terms, **kw)
        got = nflux.ops.made_inverse(*_to([y], "cuda"), _to(w, "cuda"), _to(b, "cuda"), degrees,
                                     _to(terms, "cuda"), **kw)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=5e-5, rtol=5e-5)
    torch.testing.assert_close(got[0].cpu(), want[0], **tol)
    torch.testing.assert_close(got[1].cpu(), want[1], **tol)


def test_cuda_wide_layers_take_small_tiles():
    """Hidden layers too wide for a 32-row tile in shared memory: the kernel takes fewer rows."""
    made = _made(D=6, hidden=(2048, 2048), transformer="rq_spline", residual=True, context=True,
                 dtype=torch.float64, scale=0.05)
    y = torch.randn(300, 6, dtype=torch.float64)
    c = torch.randn(300, 3, dtype=torch.float64)
    y, w, b, degrees, terms = _args(made, y, c)
    kw = _kw(made, "rq_spline")
    with torch.no_grad():
        want = nflux.ops.made_inverse(y, w, b, degrees, terms, **kw)
        got = nflux.ops.made_inverse(*_to([y], "cuda"), _to(w, "cuda"), _to(b, "cuda"), degrees,
                                     _to(terms, "cuda"), **kw)
    torch.testing.assert_close(got[0].cpu(), want[0], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(got[1].cpu(), want[1], atol=1e-9, rtol=1e-9)


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


def test_cuda_gradients_equal_cpu():
    made = _made(D=4, transformer="rq_spline", residual=True, context=True)
    y = torch.randn(70, 4, dtype=torch.float64)
    c = torch.randn(70, 3, dtype=torch.float64)
    y, w, b, degrees, terms = _args(made, y, c)
    kw = _kw(made, "rq_spline")
    grads = []
    for device in ("cpu", "cuda"):
        leaves = [t.detach().to(device).requires_grad_() for t in (y, *w, *b, *terms)]
        n = len(w)
        x, lad = nflux.ops.made_inverse(leaves[0], leaves[1 : 1 + n], leaves[1 + n : 1 + 2 * n], degrees,
                                        leaves[1 + 2 * n :], **kw)
        grads.append([g.cpu() for g in torch.autograd.grad((x.sum() + 0.5 * lad.sum()), leaves)])
    for a, b_ in zip(*grads):
        torch.testing.assert_close(b_, a, atol=1e-9, rtol=1e-9)
