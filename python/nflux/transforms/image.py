"""Image transforms on `[B, C, H, W]`: squeeze, per-channel ActNorm, invertible 1x1 conv,
masked and channel-split affine couplings with conv conditioners, and Glow/RealNVP's
multi-scale architecture with factored-out latents.

All follow the transform convention (`forward(x, context=None) -> (y, logabsdet[B])`,
`inverse`). Couplings and `FactorOut` built with `context_channels = K > 0` take a context
`[B, K]` (a vector seen at every pixel, e.g. a one-hot label) or `[B, K, H, W]` (a feature
map) in their conditioner; `ContextPrior2d` takes a vector `[B, K]` only; the other transforms
ignore the context.
Every shape decision is made from static shapes, so each transform compiles with
`torch.compile(fullgraph=True)`.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from nflux import ops
from nflux.ops.lu_conv1x1 import _check_actnorm
from nflux.nets.conv import GlowConv, ResNetConv, ZeroConvHeads
from nflux.transforms.base import Compose, Transform, TwoWayTransform
from nflux.transforms.linear import LULinear
from nflux.transforms.lu_cache import cached_lu_conv1x1
from nflux.transforms.normalization import ActNorm


def _check_image(x: torch.Tensor, channels: int | None = None, name: str = "x") -> None:
    if x.dim() != 4 or (channels is not None and x.shape[1] != channels):
        want = f"[B, {channels}, H, W]" if channels is not None else "[B, C, H, W]"
        raise ValueError(f"nflux: {name} must be {want}, got {list(x.shape)}")


class Squeeze(Transform):
    """Space-to-depth: `[B, C, H, W] -> [B, 4C, H/2, W/2]`; output channel `4c + 2i + j` holds
    pixel `(2h + i, 2w + j)` of input channel c. A permutation: logabsdet 0."""

    def forward(self, x, context=None):
        _check_image(x)
        B, C, H, W = x.shape
        if H % 2 or W % 2:
            raise ValueError(f"nflux: Squeeze needs even H and W, got {list(x.shape)}")
        y = x.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(B, 4 * C, H // 2, W // 2)
        return y, x.new_zeros(B)

    def inverse(self, y, context=None):
        _check_image(y)
        B, C4, H, W = y.shape
        if C4 % 4:
            raise ValueError(f"nflux: Squeeze.inverse needs channels divisible by 4, got {list(y.shape)}")
        x = y.reshape(B, C4 // 4, 2, 2, H, W).permute(0, 1, 4, 2, 5, 3).reshape(B, C4 // 4, 2 * H, 2 * W)
        return x, y.new_zeros(B)


class ActNorm2d(ActNorm):
    """Per-channel ActNorm on `[B, C, H, W]`: y = (x + bias + b0) * exp(log_scale + s0), with
    b0, s0 set from the first training batch's per-channel mean and std (over batch and
    pixels), without host syncs (see `nflux.transforms.ActNorm`). logabsdet is
    H * W * sum(log_scale + s0)."""

    _stats_dims = (0, 2, 3)  # per channel, over batch and pixels

    def effective(self, x: torch.Tensor | None = None):
        """(log_scale, bias) of the affine map in use; runs the data init if `x` is given."""
        b0, s0 = self._offsets(x) if x is not None else (self.b0, self.s0)
        return self.log_scale + s0, self.bias + b0

    def forward(self, x, context=None):
        _check_image(x, self.features)
        log_scale, bias = self.effective(x)
        y = (x + bias[:, None, None]) * torch.exp(log_scale)[:, None, None]
        return y, (log_scale.sum() * (x.shape[2] * x.shape[3])).expand(x.shape[0]).clone()

    def inverse(self, y, context=None):
        _check_image(y, self.features)
        log_scale, bias = self.effective()
        x = y * torch.exp(-log_scale)[:, None, None] - bias[:, None, None]
        return x, (-log_scale.sum() * (y.shape[2] * y.shape[3])).expand(y.shape[0]).clone()


class InvConv1x1(LULinear):
    """Glow's invertible 1x1 convolution over the channels of `[B, C, H, W]`, LU-parameterised
    (see `LULinear`); logabsdet H * W * sum(log_scale). No bias by default (ActNorm has one)."""

    def __init__(self, channels: int, *, init: str = "orthogonal", seed: int | None = None, bias: bool = False):
        super().__init__(channels, init=init, seed=seed, bias=bias)

    def forward(self, x, context=None):
        _check_image(x, self.features)
        return super().forward(x)

    def inverse(self, y, context=None):
        _check_image(y, self.features)
        return super().inverse(y)


class ActNormInvConv1x1(Transform):
    """ActNorm2d followed by InvConv1x1 as one fused op (`nflux.ops.actnorm_lu_conv1x1`: one
    GEMM per direction). Same parameters, data init and result as the two run in sequence.
    Without gradients the folded W and W^-1 are cached as in `LULinear`."""

    def __init__(self, channels: int, *, seed: int | None = None):
        super().__init__()
        self.actnorm = ActNorm2d(channels)
        self.conv = InvConv1x1(channels, seed=seed)

    def _run(self, x, inverse):
        an, c = self.actnorm, self.conv
        # The forward pass of a training-mode ActNorm may run its data init: never cached.
        if inverse or not (an.training and an.data_init):
            cached = cached_lu_conv1x1(
                c._weight_cache, x, c.perm, c.lower, c.upper, c.log_scale, c.sign, c.bias, inverse=inverse,
                extra=(an.log_scale, an.bias, an.s0, an.b0), fold=self._folded,
            )
            if cached is not None:
                return cached
        log_scale, bias = an.effective(None if inverse else x)
        return ops.actnorm_lu_conv1x1(x, c.perm, c.lower, c.upper, c.log_scale, c.sign, c.bias, log_scale, bias,
                                      inverse=inverse)

    def _folded(self):
        # ActNorm's scale and bias as the op takes them: input_log_scale and input_shift.
        log_scale, bias = self.actnorm.effective()
        _check_actnorm(self.conv.lower, log_scale, bias)
        return dict(input_shift=bias, input_log_scale=log_scale)

    def forward(self, x, context=None):
        _check_image(x, self.conv.features)
        return self._run(x, False)

    def inverse(self, y, context=None):
        _check_image(y, self.conv.features)
        return self._run(y, True)


def checkerboard_mask(height: int, width: int, parity: int = 0) -> torch.Tensor:
    """`[1, 1, H, W]` float mask, 1 where (h + w) % 2 == parity: the pixels kept (conditioning)."""
    h, w = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return ((h + w) % 2 == parity).to(torch.get_default_dtype())[None, None]


def _conditioner(kind: str, in_channels: int, out_channels: Sequence[int], hidden: int, blocks: int,
                 context_channels: int, channels_last: bool):
    common = dict(context_channels=context_channels, channels_last=channels_last)
    if kind == "resnet":
        return ResNetConv(in_channels, out_channels, hidden=hidden, blocks=blocks, **common)
    if kind == "glow":
        return GlowConv(in_channels, out_channels, hidden=hidden, **common)
    raise ValueError(f"nflux: conditioner must be 'resnet' or 'glow', got {kind!r}")


class CheckerboardCoupling(TwoWayTransform):
    """RealNVP's checkerboard affine coupling on `[B, C, H, W]`.

    With m the checkerboard mask (1 on the kept pixels, `checkerboard_mask(H, W, parity)`),
    (t, s) = net(m * x) and y = x * exp(s') + t' with t' = (1 - m) t and s' = (1 - m) s:
    on kept pixels t' = s' = 0, so they pass unchanged (bit-exactly) and add nothing to
    logabsdet; that is y = m x + (1 - m)(x exp(s) + t). Only the exp scale can be masked this
    way (sigmoid(0 + 2) != 1). s is soft-clamped to `clamp` (None: no clamp).
    """

    def __init__(self, shape: Sequence[int], parity: int = 0, *, hidden: int = 64, blocks: int = 2,
                 conditioner: str = "resnet", clamp: float | None = 5.0, context_channels: int = 0,
                 channels_last: bool = True):
        super().__init__()
        C, H, W = shape
        self.channels, self.parity, self.clamp = C, parity, clamp
        self.register_buffer("mask", checkerboard_mask(H, W, parity), persistent=False)
        self.net = _conditioner(conditioner, C, (C, C), hidden, blocks, context_channels, channels_last)

    def _run(self, x, context, inverse):
        _check_image(x, self.channels)
        mask = self.mask.to(x.dtype)
        shift, logits = self.net(x * mask, context)
        keep = 1 - mask
        return ops.affine_coupling(x, shift * keep, logits * keep, scale="exp", clamp=self.clamp, inverse=inverse)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, parity={self.parity}, clamp={self.clamp}"


class ChannelCoupling(TwoWayTransform):
    """Affine coupling on a channel split of `[B, C, H, W]` (RealNVP's channel mask, Glow's
    coupling). The first C//2 channels condition the rest (`parity=1`: the last C - C//2
    condition the first); (t, s) = net(x_a) and x_b -> x_b * scale(s) + t, by
    `nflux.ops.affine_coupling` on x_b only, so every scale works.

    Args:
        scale: "exp" (RealNVP) or "sigmoid" (Glow, sigmoid(s + 2)).
        conditioner: "resnet" (`ResNetConv`) or "glow" (`GlowConv`).
    """

    def __init__(self, channels: int, parity: int = 0, *, hidden: int = 64, blocks: int = 2,
                 conditioner: str = "resnet", scale: str = "exp", clamp: float | None = None,
                 context_channels: int = 0, channels_last: bool = True):
        super().__init__()
        if channels < 2:
            raise ValueError(f"nflux: ChannelCoupling needs channels >= 2, got {channels}")
        self.channels, self.parity, self.scale, self.clamp = channels, parity, scale, clamp
        first = channels // 2
        self.n_cond = first if parity == 0 else channels - first
        self.n_change = channels - self.n_cond
        self.net = _conditioner(conditioner, self.n_cond, (self.n_change, self.n_change), hidden, blocks,
                                context_channels, channels_last)

    def _run(self, x, context, inverse):
        _check_image(x, self.channels)
        if self.parity == 0:
            xa, xb = x[:, : self.n_cond], x[:, self.n_cond :]
        else:
            xb, xa = x[:, : self.n_change], x[:, self.n_change :]
        shift, logits = self.net(xa, context)
        yb, lad = ops.affine_coupling(xb.contiguous(), shift, logits, scale=self.scale, clamp=self.clamp,
                                      inverse=inverse)
        return (torch.cat([xa, yb], 1) if self.parity == 0 else torch.cat([yb, xa], 1)), lad

    def extra_repr(self) -> str:
        return f"channels={self.channels}, parity={self.parity}, scale={self.scale}, clamp={self.clamp}"


class FactorOut(Transform):
    """Glow's split with a learned conditional Gaussian prior, as a bijection.

    x = [x1, x2] on channels (x1 the first `channels - factored`); (mu, log_sigma) = conv(x1),
    a zero-initialised 3x3 conv; eps = (x2 - mu) * exp(-log_sigma). Output is (x1, eps) with
    logabsdet -sum(log_sigma); with eps ~ N(0, I) under the flow's base,
    log N(eps) - sum(log_sigma) = log N(x2; mu, sigma^2), the prior's log density, which is
    how the factored prior enters the flow's log_prob. Sampling at temperature T draws
    eps ~ N(0, T^2) and sets x2 = mu + sigma * eps, as Glow does.
    """

    def __init__(self, channels: int, factored: int | None = None, *, context_channels: int = 0,
                 channels_last: bool = True):
        super().__init__()
        self.factored = channels // 2 if factored is None else factored
        self.kept = channels - self.factored
        if self.kept < 1 or self.factored < 1:
            raise ValueError(f"nflux: FactorOut needs 1 <= factored < channels, got {self.factored} of {channels}")
        self.channels = channels
        self.prior = ZeroConvHeads(self.kept, (self.factored, self.factored), context_channels=context_channels,
                                   channels_last=channels_last)

    def split(self, x, context=None):
        """(x1, eps, logabsdet) for x `[B, C, H, W]`."""
        _check_image(x, self.channels)
        x1, x2 = x[:, : self.kept], x[:, self.kept :].contiguous()
        mu, log_sigma = self.prior(x1, context)
        eps, lad = ops.affine_coupling(x2, mu, log_sigma, scale="exp", inverse=True)
        return x1, eps, lad

    def merge(self, x1, eps, context=None):
        """(x, logabsdet of the merge, i.e. +sum(log_sigma))."""
        mu, log_sigma = self.prior(x1, context)
        x2, lad = ops.affine_coupling(eps, mu, log_sigma, scale="exp")
        return torch.cat([x1, x2], 1), lad

    def forward(self, x, context=None):
        x1, eps, lad = self.split(x, context)
        return torch.cat([x1, eps], 1), lad

    def inverse(self, y, context=None):
        _check_image(y, self.channels)
        return self.merge(y[:, : self.kept], y[:, self.kept :].contiguous(), context)


class ContextPrior2d(Transform):
    """Glow's class-conditional top prior, as a bijection: h ~ N(mu(c), sigma(c)^2) per
    channel, with (mu, log sigma) = a zero-initialised linear map of the context `[B, K]`
    (e.g. a one-hot label). Forward: eps = (h - mu) * exp(-log_sigma), logabsdet
    -H * W * sum(log_sigma); under a standard normal base that is the prior's density of h.
    """

    def __init__(self, channels: int, context_channels: int):
        super().__init__()
        if context_channels < 1:
            raise ValueError(f"nflux: ContextPrior2d needs context_channels >= 1, got {context_channels}")
        self.channels, self.context_channels = channels, context_channels
        self.linear = nn.Linear(context_channels, 2 * channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def _params(self, h, context):
        _check_image(h, self.channels)
        if context is None or context.dim() != 2 or context.shape != (h.shape[0], self.context_channels):
            got = None if context is None else list(context.shape)
            raise ValueError(f"nflux: ContextPrior2d needs a context [{h.shape[0]}, {self.context_channels}], got {got}")
        # The linear map may run in autocast's dtype; the transform stays in h's (float32).
        mu, log_sigma = self.linear(context.to(h.dtype)).to(h.dtype).chunk(2, dim=1)
        return mu[:, :, None, None], log_sigma[:, :, None, None], h.shape[2] * h.shape[3]

    def forward(self, x, context=None):
        mu, log_sigma, pixels = self._params(x, context)
        return (x - mu) * torch.exp(-log_sigma), -pixels * log_sigma.flatten(1).sum(1)

    def inverse(self, y, context=None):
        mu, log_sigma, pixels = self._params(y, context)
        return y * torch.exp(log_sigma) + mu, pixels * log_sigma.flatten(1).sum(1)


class MultiScale(Transform):
    """Multi-scale architecture: image `[B, C, H, W]` -> latent vector `[B, C*H*W]`.

    `scales[i]` is a transform on images; after each scale but the last, `factors[i]` (a
    `FactorOut`) splits off its factored channels as eps_i (standardised by the learned prior)
    and the kept channels enter scale i + 1. The output is cat(eps_0.flatten(1), ...,
    h_last.flatten(1)), to be matched with a standard normal base. The image shape at each
    point is traced at construction from `shape`, so the inverse splits the vector statically;
    the trace assumes that only `Squeeze` (possibly inside nested `Compose`s) changes shapes.
    """

    def __init__(self, shape: Sequence[int], scales: Sequence[nn.Module], factors: Sequence[FactorOut]):
        super().__init__()
        if len(factors) != len(scales) - 1:
            raise ValueError(f"nflux: MultiScale needs len(factors) == len(scales) - 1, got {len(factors)}, {len(scales)}")
        self.shape = tuple(int(s) for s in shape)
        self.scales, self.factors = nn.ModuleList(scales), nn.ModuleList(factors)
        # Trace shapes with a meta tensor (no compute, no data init).
        self.eps_shapes, h = [], torch.empty(1, *self.shape, device="meta")
        self.scale_out_shapes = []
        for i, scale in enumerate(self.scales):
            h = _meta_forward(scale, h)
            self.scale_out_shapes.append(tuple(h.shape[1:]))
            if i < len(self.factors):
                f = self.factors[i]
                self.eps_shapes.append((f.factored, *h.shape[2:]))
                h = h[:, : f.kept]
        self.eps_shapes.append(tuple(h.shape[1:]))
        self.sizes = [math.prod(s) for s in self.eps_shapes]
        self.features = sum(self.sizes)

    def forward(self, x, context=None):
        _check_image(x, self.shape[0])
        total, parts = x.new_zeros(x.shape[0]), []
        for i, scale in enumerate(self.scales):
            x, lad = scale(x, context)
            total = total + lad
            if i < len(self.factors):
                x, eps, lad = self.factors[i].split(x, context)
                total = total + lad
                parts.append(eps.flatten(1))
        parts.append(x.flatten(1))
        return torch.cat(parts, 1), total

    def inverse(self, z, context=None):
        if z.dim() != 2 or z.shape[1] != self.features:
            raise ValueError(f"nflux: MultiScale.inverse needs z [B, {self.features}], got {list(z.shape)}")
        B = z.shape[0]
        parts = [p.reshape(B, *s) for p, s in zip(torch.split(z, self.sizes, 1), self.eps_shapes)]
        x, total = parts[-1], z.new_zeros(B)
        for i in reversed(range(len(self.scales))):
            if i < len(self.factors):
                x, lad = self.factors[i].merge(x, parts[i], context)
                total = total + lad
            x, lad = self.scales[i].inverse(x, context)
            total = total + lad
        return x, total


def _meta_forward(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """`h` reshaped as `module` would reshape it (a meta tensor: no compute, no data init)."""
    # Shape-only trace: Squeeze changes shape, every other image transform keeps it.
    parts = module.transforms if isinstance(module, Compose) else [module]
    for t in parts:
        if isinstance(t, Squeeze):
            B, C, H, W = h.shape
            h = torch.empty(B, 4 * C, H // 2, W // 2, device="meta")
        elif isinstance(t, Compose):
            h = _meta_forward(t, h)
    return h
