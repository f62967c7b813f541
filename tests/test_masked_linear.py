import pytest
import torch

import nflux
from nflux.ops import reference


def _args(dtype=torch.float64, lead=(5,), out=4, inp=3, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, inp, generator=g, dtype=dtype)
    w = torch.randn(out, inp, generator=g, dtype=dtype)
    b = torch.randn(out, generator=g, dtype=dtype) if bias else None
    m = (torch.rand(out, inp, generator=g) > 0.4).to(dtype)
    return x, w, b, m


def test_extension_loaded():
    assert nflux._extension.loaded, nflux._extension.load_error


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(5,), (2, 3), (0,)])
def test_matches_reference(dtype, bias, lead):
    x, w, b, m = _args(dtype, lead, bias=bias)
    out = nflux.ops.masked_linear(x, w, b, m)
    torch.testing.assert_close(out, reference.masked_linear(x, w, b, m))
    torch.testing.assert_close(out, x @ (w * m).T + (b if bias else 0))


def test_weight_gradient_is_masked():
    x, w, b, m = _args()
    w.requires_grad_(True)
    nflux.ops.masked_linear(x, w, b, m).square().sum().backward()
    assert torch.all(w.grad[m == 0] == 0)
    assert torch.any(w.grad[m == 1] != 0)


def test_non_contiguous_input():
    x, w, b, m = _args(lead=(6,), inp=4)
    xt = torch.randn(4, 6, dtype=x.dtype).T  # [6, 4], transposed strides
    wt = torch.randn(4, 4, dtype=x.dtype).T[:4]
    m = m[:, :1].expand(4, 4)  # stride-0 mask
    torch.testing.assert_close(nflux.ops.masked_linear(xt, wt, b, m), reference.masked_linear(xt, wt, b, m))


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(bias):
    x, w, b, m = _args(bias=bias)
    inputs = [x.requires_grad_(), w.requires_grad_()] + ([b.requires_grad_()] if bias else [])

    def fn(*t):
        return nflux.ops.masked_linear(t[0], t[1], t[2] if bias else None, m)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    x, w, b, m = _args(dtype=torch.float32, bias=bias)
    torch.library.opcheck(torch.ops.nflux.masked_linear.default, (x, w.requires_grad_(), b, m))
    torch.library.opcheck(torch.ops.nflux.masked_linear.default, (x.requires_grad_(), w, b, m))


def test_bad_inputs():
    x, w, b, m = _args()
    with pytest.raises(ValueError, match="mask must have the shape"):
        nflux.ops.masked_linear(x, w, b, m[:, :2])
    with pytest.raises(ValueError, match="input must have shape"):
        nflux.ops.masked_linear(x[:, :2], w, b, m)
    with pytest.raises(ValueError, match="dtype"):
        nflux.ops.masked_linear(x.float(), w, b, m)
    with pytest.raises(ValueError, match="bias must have shape"):
        nflux.ops.masked_linear(x, w, b[:2], m)
    with pytest.raises(ValueError, match="floating"):
        nflux.ops.masked_linear(x.long(), w, b, m)
    with pytest.raises(RuntimeError, match="mask must have the shape"):
        torch.ops.nflux.masked_linear(x, w, b, m[:, :2])
