"""Convolutional conditioners for image coupling layers.

Both nets map `[B, in_channels, H, W]` to a tuple of `[B, c, H, W]` heads (one per entry of
`out_channels`, each contiguous: the shift and the scale logits of a coupling). Their last
convolution starts at zero, so a coupling conditioned by them starts at the identity.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn


class ZeroConvHeads(nn.Module):
    """One zero-initialised 3x3 conv per head: `forward` returns a tuple of contiguous outputs
    with `out_channels[i]` channels each (the last layer of every image conditioner)."""

    def __init__(self, in_channels: int, out_channels: Sequence[int]):
        super().__init__()
        self.sizes = tuple(int(c) for c in out_channels)
        self.convs = nn.ModuleList(nn.Conv2d(in_channels, c, 3, padding=1) for c in self.sizes)
        for conv in self.convs:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, h):
        return tuple(conv(h) for conv in self.convs)


class GlowConv(nn.Module):
    """Glow's conditioner: conv3x3 -> ReLU -> conv1x1 -> ReLU -> zero-initialised conv3x3."""

    def __init__(self, in_channels: int, out_channels: Sequence[int], hidden: int = 512):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
        )
        self.head = ZeroConvHeads(hidden, out_channels)

    def forward(self, x):
        return self.head(self.body(x))


class _ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, h):
        return h + self.net(h)


class ResNetConv(nn.Module):
    """RealNVP's conditioner: conv3x3 in, `blocks` pre-activation residual blocks (two 3x3
    convs each), ReLU, zero-initialised conv3x3 out. No batch norm, so it is the same function
    in training and evaluation (the flow stays exactly invertible in both)."""

    def __init__(self, in_channels: int, out_channels: Sequence[int], hidden: int = 64, blocks: int = 2):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            *[_ResBlock(hidden) for _ in range(blocks)],
            nn.ReLU(),
        )
        self.head = ZeroConvHeads(hidden, out_channels)

    def forward(self, x):
        return self.head(self.body(x))
