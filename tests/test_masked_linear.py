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


def _staircase(out, inp, features, last=False, reverse_cols=False):
    """A MADE mask with units sorted by degree (hidden layer, or output layer with last=True)."""
    d_out = torch.tensor(sorted((i % (features - 1)) + 1 for i in range(out)))
    d_in = torch.tensor(sorted((i % (features - 1)) + 1 for i in range(inp)))
    if reverse_cols:
        d_in = d_in.flip(0)
    return (d_out[:, None] > d_in[None, :] if last else d_out[:, None] >= d_in[None, :]).double()


def _covers(blocks, mask):
    covered = torch.zeros_like(mask, dtype=torch.bool)
    for k in range(0, len(blocks), 4):
        r0, r1, c0, c1 = blocks[k : k + 4]
        covered[r0:r1, c0:c1] = True
    return bool(torch.all(covered | (mask == 0))), covered.double().mean().item()


@pytest.mark.parametrize("last", [False, True])
@pytest.mark.parametrize("reverse_cols", [False, True])
def test_blocks_cover_staircase_and_skip_work(last, reverse_cols):
    mask = _staircase(256, 256, 16, last=last, reverse_cols=reverse_cols)
    blocks = nflux.ops.masked_linear_blocks(mask)
    covers, area = _covers(blocks, mask)
    assert covers
    assert area < 0.75  # the rectangles skip at least a quarter of the dense multiply-adds
    rows = [(blocks[k], blocks[k + 1]) for k in range(0, len(blocks), 4)]
    assert all(a[1] <= b[0] for a, b in zip(rows[:-1], rows[1:]))


def test_blocks_random_mask_falls_back_to_dense():
    m = (torch.rand(64, 64, generator=torch.Generator().manual_seed(1)) > 0.5).double()
    assert nflux.ops.masked_linear_blocks(m) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("last", [False, True])
@pytest.mark.parametrize("reverse_cols", [False, True])
def test_block_path_matches_dense(dtype, last, reverse_cols):
    g = torch.Generator().manual_seed(2)
    mask = _staircase(48, 40, 9, last=last, reverse_cols=reverse_cols).to(dtype)
    blocks = nflux.ops.masked_linear_blocks(mask, overhead=16)
    assert len(blocks) >= 8  # several rectangles, and (last layer) rows covered by none
    x = torch.randn(7, 40, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(48, 40, generator=g, dtype=dtype, requires_grad=True)  # unmasked storage
    b = torch.randn(48, generator=g, dtype=dtype, requires_grad=True)
    gy = torch.randn(7, 48, generator=g, dtype=dtype)
    dense = nflux.ops.masked_linear(x, w, b, mask)
    grads_dense = torch.autograd.grad(dense, (x, w, b), gy)
    blocked = nflux.ops.masked_linear(x, w, b, mask, blocks)
    grads_blocked = torch.autograd.grad(blocked, (x, w, b), gy)
    torch.testing.assert_close(blocked, x @ (w * mask).T + b)
    torch.testing.assert_close(blocked, dense)
    for a, e in zip(grads_blocked, grads_dense):
        torch.testing.assert_close(a, e)
    assert torch.all(grads_blocked[1][mask == 0] == 0)


@pytest.mark.parametrize("bias", [True, False])
def test_block_path_gradcheck_and_opcheck(bias):
    g = torch.Generator().manual_seed(3)
    mask = _staircase(10, 8, 5, last=True)
    blocks = nflux.ops.masked_linear_blocks(mask, overhead=2)
    x = torch.randn(2, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, 8, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(10, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    assert torch.autograd.gradcheck(lambda *t: nflux.ops.masked_linear(t[0], t[1], b, mask, blocks), (x, w))
    if bias:
        assert torch.autograd.gradcheck(lambda bb: nflux.ops.masked_linear(x, w, bb, mask, blocks), (b,))
    torch.library.opcheck(torch.ops.nflux.masked_linear.default, (x.detach().float(), w.detach().float().requires_grad_(),
                                                                   None if b is None else b.detach().float(), mask.float(), blocks))


def test_bad_blocks():
    x, w, b, m = _args(out=4, inp=3)
    with pytest.raises(ValueError, match="per block"):
        nflux.ops.masked_linear(x, w, b, m, [0, 1, 0])
    with pytest.raises(ValueError, match="ascending, disjoint"):
        nflux.ops.masked_linear(x, w, b, m, [0, 3, 0, 3, 2, 4, 0, 3])
    with pytest.raises(ValueError, match="column ranges"):
        nflux.ops.masked_linear(x, w, b, m, [0, 4, 0, 5])
    with pytest.raises(RuntimeError, match="ascending, disjoint"):
        torch.ops.nflux.masked_linear(x, w, b, m, [0, 5, 0, 3])


def test_block_path_output_takes_in_place_ops():
    """A MADE applies its activation in place on the layer output: it must not be a view."""
    mask = _staircase(24, 24, 5)
    blocks = nflux.ops.masked_linear_blocks(mask, overhead=4)
    x = torch.randn(3, 2, 24, dtype=torch.float64)
    w = torch.randn(24, 24, dtype=torch.float64, requires_grad=True)
    y = nflux.ops.masked_linear(x, w, None, mask, blocks).relu_()
    (grad,) = torch.autograd.grad(y.sum(), w)
    expected = torch.relu(x @ (w * mask).T)
    (grad_expected,) = torch.autograd.grad(expected.sum(), w)
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(grad, grad_expected)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_path_cuda_matches_cpu(dtype):
    """The block path's strided GEMMs on cuBLAS: values and all three gradients as on the CPU."""
    g = torch.Generator().manual_seed(4)
    mask = _staircase(64, 64, 9, last=True).to(dtype)
    blocks = nflux.ops.masked_linear_blocks(mask, overhead=64)
    assert blocks
    tensors = [torch.randn(5, 64, generator=g, dtype=dtype), torch.randn(64, 64, generator=g, dtype=dtype),
               torch.randn(64, generator=g, dtype=dtype)]
    gy = torch.randn(5, 64, generator=g, dtype=dtype)
    results = {}
    for device in ("cpu", "cuda"):
        x, w, b = (t.to(device).requires_grad_() for t in tensors)
        y = nflux.ops.masked_linear(x, w, b, mask.to(device), blocks)
        results[device] = [y, *torch.autograd.grad(y, (x, w, b), gy.to(device))]
    for a, e in zip(results["cuda"], results["cpu"]):
        torch.testing.assert_close(a.cpu(), e)


@pytest.mark.parametrize("batched_weight", [False, True])
@pytest.mark.parametrize("staircase", [False, True])
def test_vmap_matches_loop(batched_weight, staircase):
    g = torch.Generator().manual_seed(3)
    # A MADE staircase takes the rectangles' path (blocks), a random mask the dense one.
    mask = _staircase(256, 256, 16) if staircase else (torch.rand(256, 256, generator=g) > 0.4).double()
    blocks = nflux.ops.masked_linear_blocks(mask)
    assert bool(blocks) == staircase
    xs = torch.randn(4, 7, 256, generator=g, dtype=torch.float64)
    ws = torch.randn(4, 256, 256, generator=g, dtype=torch.float64)
    bias = torch.randn(256, generator=g, dtype=torch.float64)
    if batched_weight:
        got = torch.func.vmap(lambda x, w: nflux.ops.masked_linear(x, w, bias, mask, blocks))(xs, ws)
        want = [reference.masked_linear(xs[i], ws[i], bias, mask) for i in range(4)]
    else:
        got = torch.func.vmap(lambda x: nflux.ops.masked_linear(x, ws[0], bias, mask, blocks), in_dims=1)(xs)
        want = [reference.masked_linear(xs[:, i], ws[0], bias, mask) for i in range(7)]
    torch.testing.assert_close(got, torch.stack(want))
