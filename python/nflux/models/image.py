"""Image flows: `ImageFlow`, and the RealNVP / Glow multi-scale architectures.

Build them with `nflux.RealNVP.image(shape=(C, H, W), ...)` and
`nflux.Glow.image(shape=(C, H, W), ...)` (the functions `realnvp_image`, `glow_image`).
Data units: see `nflux.transforms.preprocess` (log_prob on dequantised [0, 1)^D images;
`bits_per_dim` on integer images).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from nflux.flow import Flow, StandardNormal
from nflux.transforms.base import Compose
from nflux.transforms.image import (
    ActNorm2d,
    ActNormInvConv1x1,
    ChannelCoupling,
    CheckerboardCoupling,
    FactorOut,
    InvConv1x1,
    MultiScale,
    Squeeze,
)
from nflux.transforms.preprocess import Dequantize, Logit, Shift
from nflux.transforms.preprocess import bits_per_dim as _bits_per_dim


class ImageFlow(Flow):
    """A flow on images `[*batch, C, H, W]` (continuous, in [0, 1)) with a `MultiScale`
    transform to a `[*batch, C*H*W]` standard-normal latent.

    `log_prob(x)` takes x `[*batch, C, H, W]`; `transform(x)` gives z `[*batch, D]`;
    `inverse(z)` and `sample` give images. `levels` is the number of intensity levels of the
    discrete data, used by `dequantize`, `quantize` and `bits_per_dim`. Context is not
    supported (pass None).
    """

    def __init__(self, transform, shape: Sequence[int], levels: int = 256):
        super().__init__(transform, StandardNormal(math.prod(shape)))
        self.shape = tuple(int(s) for s in shape)
        self.dequantizer = Dequantize(levels)
        self.levels = int(levels)

    def _flatten(self, x, context):
        if context is not None:
            raise ValueError("nflux: image flows take no context")
        if tuple(x.shape[-3:]) != self.shape:
            raise ValueError(f"nflux: expected images [..., {', '.join(map(str, self.shape))}], got {list(x.shape)}")
        batch = x.shape[:-3]
        return x.reshape(-1, *self.shape), None, batch

    def inverse(self, z: torch.Tensor, context: torch.Tensor | None = None):
        """(x, log|det dx/dz|) for z `[*batch, D]`: x `[*batch, C, H, W]`."""
        if context is not None:
            raise ValueError("nflux: image flows take no context")
        batch = z.shape[:-1]
        x, lad = self.transforms.inverse(z.reshape(-1, self.features))
        return x.reshape(*batch, *self.shape), lad.reshape(batch)

    def _draw(self, sample_shape, context, temperature: float = 1.0):
        if context is not None:
            raise ValueError("nflux: image flows take no context")
        shape = torch.Size([sample_shape] if isinstance(sample_shape, int) else sample_shape)
        z = self.base.sample((math.prod(shape),)) * temperature
        x, lad = self.transforms.inverse(z)
        log_prob = self.base.log_prob(z) - lad
        return x.reshape(*shape, *self.shape), log_prob.reshape(shape)

    def sample(self, sample_shape=(), context=None, *, temperature: float = 1.0) -> torch.Tensor:
        """Images `[*sample_shape, C, H, W]` (an int n means `(n,)`), without gradients. Every
        latent, the factored-out ones included, is drawn from N(0, temperature^2 I);
        temperature 0 gives the image of the base's mode z = 0."""
        with torch.no_grad():
            return self._draw(sample_shape, context, temperature)[0]

    def rsample(self, sample_shape=(), context=None, *, temperature: float = 1.0) -> torch.Tensor:
        return self._draw(sample_shape, context, temperature)[0]

    def dist(self, context: torch.Tensor | None = None):
        """This flow as a `torch.distributions.Distribution` with event shape (C, H, W)."""
        d = super().dist(context)
        d._event_shape = torch.Size(self.shape)
        return d

    def dequantize(self, x: torch.Tensor, noise: bool | None = None) -> torch.Tensor:
        """Integer images (0..levels-1) -> [0, 1) with uniform noise (see `Dequantize`)."""
        return self.dequantizer(x, noise)

    def quantize(self, y: torch.Tensor) -> torch.Tensor:
        """[0, 1) images -> integer levels."""
        return self.dequantizer.quantize(y)

    def bits_per_dim(self, x: torch.Tensor, noise: bool | None = None) -> torch.Tensor:
        """Bits/dim `[*batch]` of integer images x, through uniform dequantisation (an upper
        bound on the discrete model's; every preprocessing Jacobian included)."""
        return _bits_per_dim(self.log_prob(self.dequantize(x, noise)), self.shape, self.levels)


def _check_shape(shape, squeezes: int, name: str):
    if len(shape) != 3:
        raise ValueError(f"nflux: {name}.image shape must be (C, H, W), got {tuple(shape)}")
    C, H, W = shape
    k = 2**squeezes
    if H % k or W % k:
        raise ValueError(f"nflux: {name}.image with these levels needs H and W divisible by {k}, got {tuple(shape)}")


def realnvp_image(shape: Sequence[int], *, levels: int = 2, hidden: int = 64, blocks: int = 2,
                  data_levels: int = 256, alpha: float = 0.05, clamp: float | None = 5.0,
                  actnorm: bool = True) -> ImageFlow:
    """RealNVP's multi-scale image flow (Dinh et al. 2016).

    Logit preprocessing (`alpha`), then `levels` scales. Each scale but the last: 3 checkerboard
    couplings, squeeze, 3 channel couplings, factor out half the channels (learned conditional
    Gaussian prior). The last scale: 4 checkerboard couplings. Conditioners are `ResNetConv`
    (`hidden` channels, `blocks` residual blocks); with `actnorm`, an ActNorm2d precedes each
    coupling (in place of RealNVP's batch norm). `data_levels`: intensity levels of the data.
    """
    _check_shape(shape, levels - 1, "RealNVP")
    C, H, W = shape
    kw = dict(hidden=hidden, blocks=blocks, clamp=clamp)

    def norm(c):
        return [ActNorm2d(c)] if actnorm else []

    scales, factors = [], []
    for i in range(levels):
        ts = []
        n_checker = 4 if i == levels - 1 else 3
        for k in range(n_checker):
            ts += norm(C) + [CheckerboardCoupling((C, H, W), k % 2, **kw)]
        if i < levels - 1:
            ts.append(Squeeze())
            C, H, W = 4 * C, H // 2, W // 2
            for k in range(3):
                ts += norm(C) + [ChannelCoupling(C, k % 2, conditioner="resnet", scale="exp", **kw)]
            factors.append(FactorOut(C))
            C = C - C // 2
        scales.append(Compose(*ts))
    transform = Compose(Logit(alpha), MultiScale(shape, scales, factors))
    flow = ImageFlow(transform, shape, data_levels)
    flow.config = dict(shape=tuple(shape), levels=levels, hidden=hidden, blocks=blocks, alpha=alpha, clamp=clamp)
    return flow


def glow_image(shape: Sequence[int], *, levels: int = 3, steps: int = 8, hidden: int = 512,
               data_levels: int = 256, fused: bool = True) -> ImageFlow:
    """Glow's multi-scale image flow (Kingma & Dhariwal 2018).

    x - 1/2, then `levels` scales of: squeeze, `steps` steps of (ActNorm2d with data init,
    invertible LU 1x1 conv, affine coupling on a channel split with a `GlowConv` conditioner
    of `hidden` channels and sigmoid scale), then (except after the last) factor out half the
    channels with a learned conditional Gaussian prior. `fused`: ActNorm and the 1x1 conv run
    as one op (`nflux.ops.actnorm_lu_conv1x1`). `data_levels`: intensity levels of the data.
    """
    _check_shape(shape, levels, "Glow")
    C, H, W = shape
    scales, factors, seed = [], [], 0
    for i in range(levels):
        C, H, W = 4 * C, H // 2, W // 2
        ts = [Squeeze()]
        for k in range(steps):
            if fused:
                ts.append(ActNormInvConv1x1(C, seed=seed))
            else:
                ts += [ActNorm2d(C), InvConv1x1(C, seed=seed)]
            seed += 1
            ts.append(ChannelCoupling(C, 0, hidden=hidden, conditioner="glow", scale="sigmoid"))
        if i < levels - 1:
            factors.append(FactorOut(C))
            C = C - C // 2
        scales.append(Compose(*ts))
    transform = Compose(Shift(-0.5), MultiScale(shape, scales, factors))
    flow = ImageFlow(transform, shape, data_levels)
    flow.config = dict(shape=tuple(shape), levels=levels, steps=steps, hidden=hidden, fused=fused)
    return flow
