"""Coupling models: NICE, RealNVP and vector Glow."""

from __future__ import annotations

from typing import Sequence

from nflux.flow import Flow, StandardNormal
from nflux.models.image import glow_image, realnvp_image
from nflux.transforms import ActNorm, AdditiveCoupling, AffineCoupling, LULinear, alternating_mask, half_mask


def _check(features: int, layers: int) -> None:
    if features < 2:
        raise ValueError(f"nflux: coupling models need features >= 2, got {features}")
    if layers < 1:
        raise ValueError(f"nflux: layers must be >= 1, got {layers}")


class NICE(Flow):
    """NICE (Dinh et al. 2014): ActNorm at the input, `layers` additive couplings on alternating
    masks, and a final learnable diagonal scaling (an ActNorm, NICE's scaling layer)."""

    def __init__(self, features: int, *, context: int = 0, layers: int = 4, hidden: Sequence[int] = (256, 256),
                 activation: str = "relu"):
        _check(features, layers)
        transforms = [ActNorm(features)]
        transforms += [
            AdditiveCoupling(features, alternating_mask(features, i % 2), context=context, hidden=hidden,
                             activation=activation)
            for i in range(layers)
        ]
        transforms.append(ActNorm(features, data_init=False))
        super().__init__(transforms, StandardNormal(features), context=context, context_norm=context > 0)
        self.config = dict(features=features, context=context, layers=layers, hidden=tuple(hidden))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())


class RealNVP(NICE):
    """RealNVP (Dinh et al. 2016): ActNorm at the input, then `layers` affine couplings
    (scale exp(s) with s soft-clamped to +-clamp) on alternating masks."""

    def __init__(self, features: int, *, context: int = 0, layers: int = 6, hidden: Sequence[int] = (256, 256),
                 activation: str = "relu", clamp: float | None = 5.0):
        _check(features, layers)
        transforms = [ActNorm(features)]
        transforms += [
            AffineCoupling(features, alternating_mask(features, i % 2), context=context, hidden=hidden,
                           activation=activation, scale="exp", clamp=clamp)
            for i in range(layers)
        ]
        Flow.__init__(self, transforms, StandardNormal(features), context=context, context_norm=context > 0)
        self.config = dict(features=features, context=context, layers=layers, hidden=tuple(hidden), clamp=clamp)

    #: `RealNVP.image(shape=(C, H, W), *, levels=2, hidden=64, ...)`: the multi-scale image
    #: flow, an `ImageFlow` (see `nflux.models.image.realnvp_image`).
    image = staticmethod(realnvp_image)


class Glow(NICE):
    """Vector Glow (Kingma & Dhariwal 2018): `layers` steps of ActNorm (data-initialised), LU
    linear (random rotation at init) and affine coupling (sigmoid scale, half mask)."""

    def __init__(self, features: int, *, context: int = 0, layers: int = 6, hidden: Sequence[int] = (256, 256),
                 activation: str = "relu"):
        _check(features, layers)
        transforms = []
        for i in range(layers):
            transforms += [
                ActNorm(features),
                LULinear(features, seed=i),
                AffineCoupling(features, half_mask(features, i % 2 == 0), context=context, hidden=hidden,
                               activation=activation, scale="sigmoid"),
            ]
        Flow.__init__(self, transforms, StandardNormal(features), context=context, context_norm=context > 0)
        self.config = dict(features=features, context=context, layers=layers, hidden=tuple(hidden))

    #: `Glow.image(shape=(C, H, W), *, levels=3, steps=8, hidden=512, ...)`: the multi-scale
    #: image flow, an `ImageFlow` (see `nflux.models.image.glow_image`).
    image = staticmethod(glow_image)
