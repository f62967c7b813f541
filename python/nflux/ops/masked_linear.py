"""Masked linear layer (MADE): y = x (W * M)^T + b, native on CPU and CUDA."""

from __future__ import annotations

import torch

from nflux import _extension
from nflux.ops import reference
from nflux.ops._checks import check_masked_linear_args

def masked_linear(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor
) -> torch.Tensor:
    """Linear layer with a fixed connectivity mask.

    Args:
        input: `[..., in]`.
        weight: `[out, in]`, stored unmasked; only entries where `mask` is 1 matter.
        bias: `[out]` or None.
        mask: `[out, in]` of 0/1 in the dtype of `weight` (e.g. a MADE mask buffer).

    Returns:
        `[..., out]` = input @ (weight * mask)^T + bias. The gradient of `weight` is masked:
        it is 0 wherever `mask` is 0, so masked entries never move.
    """
    check_masked_linear_args(input, weight, bias, mask)
    if _extension.native(input):
        return torch.ops.nflux.masked_linear(input, weight, bias, mask)
    _extension.warn_fallback("masked_linear", input.device)
    return reference.masked_linear(input, weight, bias, mask)


def _setup_context(ctx, inputs, output):
    input, weight, bias, mask = inputs
    ctx.save_for_backward(input, weight, mask)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_output):
    input, weight, mask = ctx.saved_tensors
    grad_input, grad_weight, grad_bias = torch.ops.nflux.masked_linear_backward(
        grad_output, input, weight, mask
    )
    return grad_input, grad_weight, grad_bias if ctx.has_bias else None, None


def _fake(input, weight, bias, mask):
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


def _fake_backward(grad_output, input, weight, mask):
    return torch.empty_like(input), torch.empty_like(weight), weight.new_empty(weight.shape[0])


if _extension.loaded:
    torch.library.register_fake("nflux::masked_linear")(_fake)
    torch.library.register_fake("nflux::masked_linear_backward")(_fake_backward)
    torch.library.register_autograd("nflux::masked_linear", _backward, setup_context=_setup_context)
