"""Convolutional conditioners for image coupling layers.

Every net maps `[B, in_channels, H, W]` (plus an optional context) to a tuple of `[B, c, H, W]`
heads (one per entry of `out_channels`, each contiguous: the shift and the scale logits of a
coupling). Their last convolution starts at zero, so a coupling conditioned by them starts at
the identity.

Context: with `context_channels = K > 0`, `forward(x, context)` takes a context `[B, K]` (a
vector, e.g. a one-hot class label, seen at every pixel) or `[B, K, H, W]` (a feature map);
it enters as K extra input channels.

Memory format: with `channels_last` (the default) the convolutions run in channels-last
layout, which oneDNN (CPU) and cuDNN run markedly faster than NCHW, forward and backward; the
input is converted on entry and each head is returned as a contiguous NCHW tensor. The function
computed is the same in either layout.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F


def _with_context(x: torch.Tensor, context: torch.Tensor | None, context_channels: int) -> torch.Tensor:
    """x with the context appended as channels (a vector context is broadcast over pixels)."""
    if context_channels == 0:
        if context is not None:
            raise ValueError("nflux: this conditioner was built without context (context_channels=0)")
        return x
    if context is None:
        raise ValueError(f"nflux: this conditioner needs a context with {context_channels} features")
    B, _, H, W = x.shape
    if context.dim() == 2:
        context = context[:, :, None, None].expand(-1, -1, H, W)
    if context.shape != (B, context_channels, H, W):
        raise ValueError(f"nflux: context must be [{B}, {context_channels}] or [{B}, {context_channels}, {H}, {W}], "
                         f"got {list(context.shape)}")
    return torch.cat([x, context.to(x.dtype)], 1)


def _set_layout(module: nn.Module, channels_last: bool) -> None:
    # Weights stored channels-last too: no layout conversion of every weight on every call.
    if channels_last:
        module.to(memory_format=torch.channels_last)


class ZeroConvHeads(nn.Module):
    """One zero-initialised 3x3 conv per head, run as one conv: `forward` returns a tuple of
    contiguous NCHW outputs with `out_channels[i]` channels each (the last layer of every image
    conditioner, and on its own the conditional prior of `FactorOut`)."""

    def __init__(self, in_channels: int, out_channels: Sequence[int], *, context_channels: int = 0,
                 channels_last: bool = True):
        super().__init__()
        self.sizes = tuple(int(c) for c in out_channels)
        self.context_channels, self.channels_last = int(context_channels), channels_last
        self.convs = nn.ModuleList(nn.Conv2d(in_channels + self.context_channels, c, 3, padding=1)
                                   for c in self.sizes)
        for conv in self.convs:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        _set_layout(self, channels_last)

    def forward(self, h, context=None):
        h = _with_context(h, context, self.context_channels)
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        # All heads as one conv on their stacked weights (the same outputs): one pass over h
        # forward, and one hidden-sized input gradient backward instead of one per head.
        weight = torch.cat([conv.weight for conv in self.convs])
        bias = torch.cat([conv.bias for conv in self.convs])
        out = F.conv2d(h, weight, bias, padding=1)
        return tuple(part.contiguous() for part in torch.split(out, self.sizes, 1))


class _ConvConditioner(nn.Module):
    """A conv body then zero-initialised heads; the context (if any) joins the input as
    channels. Subclasses set body, head, context_channels and channels_last."""

    def forward(self, x, context=None):
        x = _with_context(x, context, self.context_channels)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.head(self.body(x))


class GlowConv(_ConvConditioner):
    """Glow's conditioner: conv3x3 -> ReLU -> conv1x1 -> ReLU -> zero-initialised conv3x3.

    The ReLUs run in place (a conv's output is not saved by its backward, so this is safe and
    saves two hidden-sized activations per coupling)."""

    def __init__(self, in_channels: int, out_channels: Sequence[int], hidden: int = 512, *,
                 context_channels: int = 0, channels_last: bool = True):
        super().__init__()
        self.context_channels, self.channels_last = int(context_channels), channels_last
        self.body = nn.Sequential(
            nn.Conv2d(in_channels + self.context_channels, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 1), nn.ReLU(inplace=True),
        )
        self.head = ZeroConvHeads(hidden, out_channels, channels_last=channels_last)
        _set_layout(self, channels_last)


class _ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        # The first ReLU must not be in place: h is also the residual branch. The second follows
        # a conv, whose output its backward does not need.
        self.net = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, h):
        return h + self.net(h)


class ResNetConv(_ConvConditioner):
    """RealNVP's conditioner: conv3x3 in, `blocks` pre-activation residual blocks (two 3x3
    convs each), ReLU, zero-initialised conv3x3 out. No batch norm, so it is the same function
    in training and evaluation (the flow stays exactly invertible in both)."""

    def __init__(self, in_channels: int, out_channels: Sequence[int], hidden: int = 64, blocks: int = 2, *,
                 context_channels: int = 0, channels_last: bool = True):
        super().__init__()
        self.context_channels, self.channels_last = int(context_channels), channels_last
        self.body = nn.Sequential(
            nn.Conv2d(in_channels + self.context_channels, hidden, 3, padding=1),
            *[_ResBlock(hidden) for _ in range(blocks)],
            nn.ReLU(inplace=True),  # on a residual sum or a conv output: neither is saved for backward
        )
        self.head = ZeroConvHeads(hidden, out_channels, channels_last=channels_last)
        _set_layout(self, channels_last)
