"""Every op on transposed and channels-last inputs: the fake kernels must describe the
contiguous outputs the kernels write, or torch.compile fails its stride check."""

import pytest
import torch
from torch.library import opcheck

import nflux
from nflux import _extension
from test_autoregressive_backward import OPTIONS
from test_autoregressive_inverse import _args, _made

pytestmark = pytest.mark.skipif(not _extension.loaded, reason="native extension not built")

OPS = torch.ops.nflux


def laid_out(shape, layout, requires_grad=False):
    """A random tensor of `shape` whose memory is transposed ("t": the last two dims swapped)
    or channels-last ("cl", 4-d)."""
    t = torch.randn(shape)
    t = t.mT.contiguous().mT if layout == "t" else t.contiguous(memory_format=torch.channels_last)
    assert not t.is_contiguous()
    return t.requires_grad_(requires_grad)


LAYOUTS = [("t", (6, 5)), ("cl", (4, 3, 5, 5))]


@pytest.mark.parametrize("layout,shape", LAYOUTS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_rq_spline(layout, shape, requires_grad):
    x, widths = laid_out(shape, layout, requires_grad), laid_out((*shape, 4), "t", requires_grad)
    derivatives = torch.randn(*shape, 3, requires_grad=requires_grad)
    opcheck(OPS.rq_spline.default, (x, widths, widths, derivatives, False, 3.0, 1e-3, 1e-3, 1e-3))
    grads = (laid_out(shape, layout), laid_out(shape, layout))
    opcheck(OPS.rq_spline_backward.default, (*grads, x.detach(), widths.detach(), widths.detach(),
                                             derivatives.detach(), True, 3.0, 1e-3, 1e-3, 1e-3))


@pytest.mark.parametrize("layout,shape", LAYOUTS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_affine_coupling(layout, shape, requires_grad):
    x, shift, logits = (laid_out(shape, layout, requires_grad) for _ in range(3))
    opcheck(OPS.affine_coupling.default, (x, shift, logits, 2, None, False))
    opcheck(OPS.affine_coupling_backward.default,
            (laid_out(shape, layout), torch.randn(shape[0]), x.detach(), shift.detach(), logits.detach(), 1, 2.0, True))


@pytest.mark.parametrize("layout,shape", LAYOUTS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_lu_conv1x1(layout, shape, requires_grad):
    C = shape[1]
    lower = laid_out((C, C), "t", requires_grad)
    args = (laid_out(shape, layout, requires_grad), torch.randperm(C), lower, lower, torch.zeros(C, requires_grad=requires_grad),
            torch.ones(C), torch.randn(C), False, None)
    opcheck(OPS.lu_conv1x1.default, args)
    # The backward op, with every optional input absent too (each empty gradient its own tensor).
    grads = (laid_out(shape, layout), torch.randn(shape[0]))
    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    for bias, shift, in_scale in ((detached[6], None, None), (None, None, None), (None, torch.randn(C), torch.randn(C))):
        opcheck(OPS.lu_conv1x1_backward.default, (*grads, *detached[:6], bias, False, shift, in_scale))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_masked_linear(requires_grad):
    x, weight = laid_out((7, 3), "t", requires_grad), laid_out((5, 3), "t", requires_grad)
    mask = (torch.rand(5, 3, generator=torch.Generator().manual_seed(0)) > 0.3).float()
    opcheck(OPS.masked_linear.default, (x, weight, torch.randn(5), mask, []))
    opcheck(OPS.masked_linear_backward.default, (laid_out((7, 5), "t"), x.detach(), weight.detach(), mask, []))


def test_made_inverse():
    made = _made(D=3, hidden=(5, 5), transformer="affine", residual=False, context=False, dtype=torch.float32)
    y, weights, biases, degrees, terms = _args(made, laid_out((4, 3), "t"), None)
    weights = [w.detach() for w in weights]
    biases = [b.detach() for b in biases]
    options = (False, made.activation, "affine", *OPTIONS)
    opcheck(OPS.made_inverse.default, (y, weights, biases, degrees, [], *options))
    opcheck(OPS.made_inverse_backward.default,
            (laid_out((4, 3), "t"), torch.randn(4), y, weights, biases, degrees, [], *options))


def test_compiled_spline_on_a_transposed_input():
    x, widths, derivatives = torch.randn(5, 6).t(), torch.randn(6, 5, 4), torch.randn(6, 5, 3)
    compiled = torch.compile(lambda *a: nflux.ops.rq_spline(*a, tail_bound=2.0), fullgraph=True)
    for got, want in zip(compiled(x, widths, widths, derivatives),
                         nflux.ops.rq_spline(x, widths, widths, derivatives, tail_bound=2.0)):
        torch.testing.assert_close(got, want)
