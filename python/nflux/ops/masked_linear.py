"""Masked linear layer (MADE): y = x (W * M)^T + b, native on CPU and CUDA."""

from __future__ import annotations

from typing import Sequence

import torch

from nflux import _extension
from nflux.ops import _autocast, reference
from nflux.ops._registration import batch_first, batch_index
from nflux.ops._checks import check_masked_linear_args, check_masked_linear_blocks

# What one extra GEMM call costs, in multiply-adds per batch row (call, packing and the
# narrower product's lower throughput; measured with MKL on one core, it is worth about a
# 64 x 64 tile). masked_linear_blocks trades rectangles' waste against this.
BLOCK_OVERHEAD = 2048

# The op is composed of ATen products, so it runs natively in every floating dtype ATen has,
# half types included (as one dense GEMM, see csrc/masked_linear.cpp).
_NATIVE_DTYPES = {device: _extension.NATIVE_DTYPES["cuda"] for device in ("cpu", "cuda")}


def masked_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask: torch.Tensor,
    blocks: Sequence[int] | None = None,
) -> torch.Tensor:
    """Linear layer with a fixed connectivity mask.

    Args:
        input: `[..., in]`.
        weight: `[out, in]`, stored unmasked; only entries where `mask` is 1 matter.
        bias: `[out]` or None.
        mask: `[out, in]` of 0/1 in the dtype of `weight` (e.g. a MADE mask buffer).
        blocks: optional `masked_linear_blocks(mask)`, computed once for a fixed mask: flat
            `[row_start, row_end, col_start, col_end]` per rectangle, outside which the mask
            must be zero. Each rectangle is then one GEMM over only its admitted inputs (forward
            and both gradients), skipping the masked-out multiply-adds. None or []: one dense GEMM.

    Returns:
        `[..., out]` = input @ (weight * mask)^T + bias. The gradient of `weight` is masked:
        it is 0 wherever `mask` is 0, so masked entries never move.
    """
    autocast = _autocast.enabled(input) and not _autocast.any_float64(input, weight, bias, mask)
    check_masked_linear_args(input, weight, bias, mask, same_dtype=not autocast)
    blocks = [] if blocks is None else [int(b) for b in blocks]
    check_masked_linear_blocks(blocks, weight)
    if autocast:
        # Autocast's dtype (bfloat16, float16) runs on AMX or tensor cores, where one dense GEMM
        # beats the rectangles' several narrow ones (2.3x less time than float32 rectangles for
        # a [512, 256] x [256, 256] forward+backward on one AMX core): the reference, torch's
        # linear of the masked weight, which autocast casts as for any linear layer.
        return reference.masked_product(input, weight, bias, mask)
    if _extension.native(input, _NATIVE_DTYPES):
        return torch.ops.nflux.masked_linear(input, weight, bias, mask, blocks)
    _extension.warn_fallback("masked_linear", input)
    return reference.masked_product(input, weight, bias, mask)  # the arguments are checked above


def masked_linear_blocks(mask: torch.Tensor, overhead: int = BLOCK_OVERHEAD) -> list[int]:
    """Rectangles covering every nonzero of `mask`, for `masked_linear(..., blocks=...)`.

    Rows are grouped into contiguous ranges, each spanning the columns its rows admit; the
    grouping minimises (multiply-adds computed + `overhead` per rectangle), exactly, by dynamic
    programming over runs of rows with equal spans. Rows admitting nothing need no rectangle.
    Returns [] (the dense path) when rectangles would not save anything, e.g. for a random mask.
    Reads the mask on the host: call it once when the mask is made, not per forward pass.
    """
    if mask.dim() != 2:
        raise ValueError(f"nflux: mask must have shape [out, in], got {list(mask.shape)}")
    out, in_ = mask.shape
    nonzero = mask.detach().cpu() != 0
    any_col = nonzero.any(1)
    cols = torch.arange(in_)
    lo = torch.where(nonzero, cols, in_).amin(1).tolist() if in_ else [0] * out
    hi = (torch.where(nonzero, cols, -1).amax(1) + 1).tolist() if in_ else [0] * out
    # Runs of rows with the same span [lo, hi) (empty rows: None).
    runs: list[tuple[int, int, tuple[int, int] | None]] = []
    for r in range(out):
        span = (lo[r], hi[r]) if bool(any_col[r]) else None
        if runs and runs[-1][2] == span:
            runs[-1] = (runs[-1][0], r + 1, span)
        else:
            runs.append((r, r + 1, span))
    # best[j]: cheapest cover of runs[:j]; choice[j]: where its last rectangle starts (None: the
    # last run is empty and needs none).
    n = len(runs)
    best = [0.0] + [float("inf")] * n
    choice: list[int | None] = [None] * (n + 1)
    for j in range(1, n + 1):
        if runs[j - 1][2] is None:
            best[j], choice[j] = best[j - 1], None
        c0, c1 = in_, 0
        for i in range(j - 1, -1, -1):
            if runs[i][2] is not None:
                c0, c1 = min(c0, runs[i][2][0]), max(c1, runs[i][2][1])
            if c1 <= c0:
                continue
            cost = best[i] + (runs[j - 1][1] - runs[i][0]) * (c1 - c0) + overhead
            if cost < best[j]:
                best[j], choice[j] = cost, i
    blocks: list[int] = []
    j = n
    while j > 0:
        i = choice[j]
        if i is None:
            j -= 1
            continue
        span = [runs[k][2] for k in range(i, j) if runs[k][2] is not None]
        blocks[:0] = [runs[i][0], runs[j - 1][1], min(s[0] for s in span), max(s[1] for s in span)]
        j = i
    if best[n] >= out * in_:  # no saving over one dense GEMM
        return []
    return blocks


def _fake(input, weight, bias, mask, blocks=()):
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


def _fake_backward(grad_output, input, weight, mask, blocks=()):
    # Contiguous, as the kernel's products are, whatever the inputs' layout.
    return input.new_empty(input.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape[0])


def _vmap(info, in_dims, input, weight, bias, mask, blocks=()):
    """vmap rule: a vmapped input is one more leading dim (the op takes `[..., in]`); a vmapped
    weight, bias or mask takes one call per index."""
    in_dim, *param_dims = in_dims[:4]
    op = torch.ops.nflux.masked_linear
    if all(d is None for d in param_dims):
        return op(batch_first(input, in_dim, info.batch_size), weight, bias, mask, blocks), 0
    outs = [op(batch_index(input, in_dim, i),
               *(batch_index(t, d, i) for t, d in zip((weight, bias, mask), param_dims)), blocks)
            for i in range(info.batch_size)]
    return torch.stack(outs), 0


if _extension.loaded:
    torch.library.register_vmap("nflux::masked_linear", _vmap)
    torch.library.register_fake("nflux::masked_linear")(_fake)
    torch.library.register_fake("nflux::masked_linear_backward")(_fake_backward)
    # Its autograd kernel is C++ (csrc/masked_linear_autograd.cpp): no Python per call.
