"""Image flows: `ImageFlow`, and the RealNVP / Glow multi-scale architectures.

Build them with `nflux.RealNVP.image(shape=(C, H, W), ...)` and
`nflux.Glow.image(shape=(C, H, W), ...)` (the functions `realnvp_image`, `glow_image`).
Data units: see `nflux.transforms.preprocess` (log_prob on dequantised [0, 1)^D images;
`bits_per_dim` on integer images).

Keyword arguments common to both constructors: `context` (K > 0: a conditional flow on
context vectors `[*, K]`, fed to every coupling conditioner and factor-out prior, plus a
learned conditional top prior `ContextPrior2d`) or `num_classes` (the same on one-hot class
labels, which may be passed as integers); `dequantization` ("uniform", or "variational": a
learned q(u | x), `VariationalDequantize`, counted in `bits_per_dim`); `channels_last` (run the
conv conditioners in channels-last layout: faster on CPU and GPU, the same function).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from nflux._args import check_count
from nflux.flow import Flow, StandardNormal
from nflux.transforms.base import Compose
from nflux.transforms.image import (
    ActNorm2d,
    ActNormInvConv1x1,
    ChannelCoupling,
    CheckerboardCoupling,
    ContextPrior2d,
    FactorOut,
    InvConv1x1,
    MultiScale,
    Squeeze,
)
from nflux.transforms.dequantization import VariationalDequantize
from nflux.transforms.preprocess import Dequantize, Logit, Shift
from nflux.transforms.preprocess import bits_per_dim as _bits_per_dim


class ImageFlow(Flow):
    """A flow on images `[*batch, C, H, W]` (continuous, in [0, 1)) with a `MultiScale`
    transform to a `[*batch, C*H*W]` standard-normal latent.

    `log_prob(x, context)` takes x `[*batch, C, H, W]`; `transform(x)` gives z `[*batch, D]`;
    `inverse(z)` and `sample` give images. `levels` is the number of intensity levels of the
    discrete data, used by `dequantize`, `quantize` and `bits_per_dim`; `dequantizer` is a
    `Dequantize` (uniform noise) or a `VariationalDequantize` (learned q(u | x)).

    Conditional flows (`context_features = K > 0`) take a context `[*cbatch, K]` that
    broadcasts against the images' batch, as `nflux.Flow` does; with `num_classes` set, an
    integer label tensor `[*cbatch]` is accepted too (one-hot encoded, K = num_classes).
    """

    def __init__(self, transform, shape: Sequence[int], levels: int = 256, *, context_features: int = 0,
                 num_classes: int | None = None, dequantizer: nn.Module | None = None):
        super().__init__(transform, StandardNormal(math.prod(shape)))
        self.shape = tuple(int(s) for s in shape)
        self.dequantizer = Dequantize(levels) if dequantizer is None else dequantizer
        self.levels = int(levels)
        self.num_classes = num_classes
        self.context_features = int(num_classes if num_classes is not None else context_features)

    def _context(self, context):
        """Context as float features `[*cbatch, K]` (labels one-hot encoded), or None. With
        `num_classes`, an integer tensor (or int) holds class labels `[*cbatch]` and a floating
        one holds one-hot (or soft) labels `[*cbatch, K]`: the dtype decides, never the shape."""
        K = self.context_features
        if K == 0:
            if context is not None:
                raise ValueError("nflux: this image flow was built without context (context=0, num_classes=None)")
            return None
        if context is None:
            raise ValueError(f"nflux: this image flow needs a context ({K} features or labels)")
        if self.num_classes is not None and isinstance(context, int):
            context = torch.tensor(context)
        if self.num_classes is not None and not context.is_floating_point():
            if torch.compiler.is_compiling():
                return F.one_hot(context.long(), K).to(torch.get_default_dtype())
            try:  # one_hot checks the range itself; its error does not say which argument
                return F.one_hot(context.long(), K).to(torch.get_default_dtype())
            except RuntimeError as error:
                raise ValueError(f"nflux: class labels must lie in [0, {K}) ({error})") from None
        if context.shape[-1:] != (K,):
            if self.num_classes is not None:
                raise ValueError(
                    f"nflux: labels must be an integer tensor [...] of classes, or a floating one-hot tensor "
                    f"[..., {K}]; got a {context.dtype} tensor of shape {list(context.shape)}")
            raise ValueError(f"nflux: context must be [..., {K}], got {list(context.shape)}")
        return context

    def _flatten(self, x, context):
        if tuple(x.shape[-3:]) != self.shape:
            raise ValueError(f"nflux: expected images [..., {', '.join(map(str, self.shape))}], got {list(x.shape)}")
        return self._flatten_events(x, self._context(context), self.shape)

    def inverse(self, z: torch.Tensor, context: torch.Tensor | None = None):
        """(x, log|det dx/dz|) for z `[*batch, D]`: x `[*batch, C, H, W]`."""
        if z.shape[-1:] != (self.features,):
            raise ValueError(f"nflux: expected latents [..., {self.features}], got {list(z.shape)}")
        z2, c2, batch = self._flatten_events(z, self._context(context), (self.features,))
        x, lad = self.transforms.inverse(z2, c2)
        return x.reshape(*batch, *self.shape), lad.reshape(batch)

    def _draw(self, sample_shape, context, temperature: float = 1.0):
        shape, context = self._sample_batch(sample_shape, self._context(context))
        z = self.base.sample((math.prod(shape),)) * temperature
        x, lad = self.transforms.inverse(z, context)
        log_prob = self.base.log_prob(z) - lad
        return x.reshape(*shape, *self.shape), log_prob.reshape(shape)

    def sample(self, sample_shape=(), context=None, *, temperature: float = 1.0) -> torch.Tensor:
        """Images `[*sample_shape, *context.batch, C, H, W]` (an int n means `(n,)`), without
        gradients. Every latent, the factored-out ones included, is drawn from
        N(0, temperature^2 I); temperature 0 gives the image of the base's mode z = 0."""
        with torch.no_grad():
            return self._draw(sample_shape, context, temperature)[0]

    def rsample(self, sample_shape=(), context=None, *, temperature: float = 1.0) -> torch.Tensor:
        return self._draw(sample_shape, context, temperature)[0]

    def dist(self, context: torch.Tensor | None = None, validate_args: bool | None = None):
        """This flow as a `torch.distributions.Distribution` with event shape (C, H, W)."""
        # Labels as one-hot vectors: batch shape right.
        d = super().dist(self._context(context), validate_args=validate_args)
        d._event_shape = torch.Size(self.shape)
        return d

    def _float_images(self, x: torch.Tensor) -> torch.Tensor:
        """Images (integer levels in any integer or floating dtype) in the flow's floating
        dtype: the noise and the transforms need floats, and the flow's own (a float64 Glow
        refused float32 images)."""
        dtype = next(self.parameters(), torch.empty(0)).dtype
        return x if x.dtype == dtype else x.to(dtype)

    def dequantize(self, x: torch.Tensor, noise: bool | None = None) -> torch.Tensor:
        """Integer images (0..levels-1, any integer or float dtype) -> [0, 1), with noise from
        `dequantizer`."""
        return self.dequantizer(self._float_images(x), noise)

    def quantize(self, y: torch.Tensor) -> torch.Tensor:
        """[0, 1) images -> integer levels."""
        return self.dequantizer.quantize(y)

    def bits_per_dim(self, x: torch.Tensor, context: torch.Tensor | None = None,
                     noise: bool | None = None) -> torch.Tensor:
        """Bits/dim `[*batch]` of integer images x (any integer or float dtype): an upper bound on
        the discrete model's, from dequantisation noise u ~ q(u | x) (uniform: log q = 0;
        variational: log q(u | x) is subtracted from the log density), every preprocessing
        Jacobian included."""
        x2, c2, batch = self._flatten(self._float_images(x), context)
        y, log_q = self.dequantizer.sample(x2, noise)
        z, lad = self.transforms(y, c2)
        log_prob = self.base.log_prob(z) + lad - log_q
        return _bits_per_dim(log_prob, self.shape, self.levels).reshape(batch)


def _check_args(name: str, shape, data_levels, **sizes):
    """One clear error for a bad shape or size argument (levels=0 would otherwise fail deep in
    MultiScale): shape (C, H, W) of positive sizes, every given size an int >= 1, and
    data_levels an int >= 2."""
    try:
        valid = len(shape) == 3 and all(check_count("shape", v, 1) for v in shape)
    except ValueError:
        valid = False
    if not valid:
        raise ValueError(f"nflux: {name}.image shape must be (C, H, W) of positive ints, got {tuple(shape)}")
    for key, v in sizes.items():
        if v is not None:
            check_count(f"{name}.image {key}", v, 1)
    check_count(f"{name}.image data_levels", data_levels, 2)


def _check_shape(shape, squeezes: int, name: str, levels: int):
    C, H, W = shape
    k = 2**squeezes
    if H % k or W % k:
        raise ValueError(f"nflux: {name}.image with levels={levels} (scales; --scales in the CLI) needs H and W "
                         f"divisible by {k}, got {tuple(shape)}: use fewer levels or crop / pad the images")


def _conditioning(context: int, num_classes: int | None, channels_last: bool):
    """(K, keyword arguments for the transforms) for a context of K features or K labels."""
    if num_classes is not None and context:
        raise ValueError(f"nflux: give context (features) or num_classes (labels), not both: got context={context}, "
                         f"num_classes={num_classes}")
    K = int(num_classes) if num_classes is not None else int(context)
    if K < 0:
        raise ValueError(f"nflux: context features must be >= 0, got {K}")
    return K, dict(context_channels=K, channels_last=channels_last)


def _dequantizer(kind: str, shape, data_levels: int, channels_last: bool):
    if kind == "uniform":
        return Dequantize(data_levels)
    if kind == "variational":
        return VariationalDequantize(shape, data_levels, channels_last=channels_last)
    raise ValueError(f"nflux: dequantization must be 'uniform' or 'variational', got {kind!r}")


def realnvp_image(shape: Sequence[int], *, levels: int = 2, hidden: int = 64, blocks: int = 2,
                  data_levels: int = 256, alpha: float = 0.05, clamp: float | None = 5.0,
                  actnorm: bool = True, context: int = 0, num_classes: int | None = None,
                  dequantization: str = "uniform", channels_last: bool = True) -> ImageFlow:
    """RealNVP's multi-scale image flow (Dinh et al. 2016).

    Logit preprocessing (`alpha`), then `levels` scales. Each scale but the last: 3 checkerboard
    couplings, squeeze, 3 channel couplings, factor out half the channels (learned conditional
    Gaussian prior). The last scale: 4 checkerboard couplings. Conditioners are `ResNetConv`
    (`hidden` channels, `blocks` residual blocks); with `actnorm`, an ActNorm2d precedes each
    coupling (in place of RealNVP's batch norm). `data_levels`: intensity levels of the data.
    """
    _check_args("RealNVP", shape, data_levels, levels=levels, hidden=hidden, num_classes=num_classes)
    _check_shape(shape, levels - 1, "RealNVP", levels)
    C, H, W = shape
    K, cond = _conditioning(context, num_classes, channels_last)
    kw = dict(hidden=hidden, blocks=blocks, clamp=clamp, **cond)

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
            factors.append(FactorOut(C, **cond))
            C = C - C // 2
        if K and i == levels - 1:  # the top latent's conditional prior
            ts.append(ContextPrior2d(C, K))
        scales.append(Compose(*ts))
    transform = Compose(Logit(alpha), MultiScale(shape, scales, factors))
    flow = ImageFlow(transform, shape, data_levels, context_features=K, num_classes=num_classes,
                     dequantizer=_dequantizer(dequantization, shape, data_levels, channels_last))
    flow.config = dict(shape=tuple(shape), levels=levels, hidden=hidden, blocks=blocks, alpha=alpha, clamp=clamp,
                       context=K, num_classes=num_classes, dequantization=dequantization)
    return flow


def glow_image(shape: Sequence[int], *, levels: int = 3, steps: int = 8, hidden: int = 512,
               data_levels: int = 256, fused: bool = True, context: int = 0, num_classes: int | None = None,
               dequantization: str = "uniform", channels_last: bool = True) -> ImageFlow:
    """Glow's multi-scale image flow (Kingma & Dhariwal 2018).

    x - 1/2, then `levels` scales of: squeeze, `steps` steps of (ActNorm2d with data init,
    invertible LU 1x1 conv, affine coupling on a channel split with a `GlowConv` conditioner
    of `hidden` channels and sigmoid scale), then (except after the last) factor out half the
    channels with a learned conditional Gaussian prior. `fused`: ActNorm and the 1x1 conv run
    as one op (`nflux.ops.actnorm_lu_conv1x1`). `data_levels`: intensity levels of the data.
    Conditioning, dequantisation and layout: see the module docstring.
    """
    _check_args("Glow", shape, data_levels, levels=levels, hidden=hidden, num_classes=num_classes)
    _check_shape(shape, levels, "Glow", levels)
    C, H, W = shape
    K, cond = _conditioning(context, num_classes, channels_last)
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
            ts.append(ChannelCoupling(C, 0, hidden=hidden, conditioner="glow", scale="sigmoid", **cond))
        if i < levels - 1:
            factors.append(FactorOut(C, **cond))
            C = C - C // 2
        if K and i == levels - 1:  # the top latent's conditional prior
            ts.append(ContextPrior2d(C, K))
        scales.append(Compose(*ts))
    transform = Compose(Shift(-0.5), MultiScale(shape, scales, factors))
    flow = ImageFlow(transform, shape, data_levels, context_features=K, num_classes=num_classes,
                     dequantizer=_dequantizer(dequantization, shape, data_levels, channels_last))
    flow.config = dict(shape=tuple(shape), levels=levels, steps=steps, hidden=hidden, fused=fused, context=K,
                       num_classes=num_classes, dequantization=dequantization)
    return flow
