"""Autoregressive models: MAF and IAF."""

from __future__ import annotations

from typing import Sequence

from nflux.flow import Flow, StandardNormal
from nflux.transforms import ActNorm, Inverse, MaskedAffineAutoregressive


class MAF(Flow):
    """Masked autoregressive flow (Papamakarios et al. 2017): ActNorm at the input, then
    `layers` MADE-affine layers with orderings alternating natural / reversed. Density is one
    MADE pass per layer; sampling uses the one-pass inversion (`nflux.ops.made_inverse`)."""

    inverted = False

    def __init__(self, features: int, *, context: int = 0, layers: int = 5, hidden: Sequence[int] = (256, 256),
                 residual: bool = False, activation: str = "relu"):
        if layers < 1:
            raise ValueError(f"nflux: layers must be >= 1, got {layers}")
        transforms = [ActNorm(features)]
        for i in range(layers):
            t = MaskedAffineAutoregressive(features, context=context, hidden=hidden, residual=residual,
                                           ordering="natural" if i % 2 == 0 else "reversed", activation=activation)
            transforms.append(Inverse(t) if self.inverted else t)
        super().__init__(transforms, StandardNormal(features), context=context, context_norm=context > 0)
        self.config = dict(features=features, context=context, layers=layers, hidden=tuple(hidden),
                           residual=residual)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())


class IAF(MAF):
    """Inverse autoregressive flow (Kingma et al. 2016): MAF's layers inverted. Sampling is one
    MADE pass per layer (fast); the density inverts each MADE, here with the one-pass inversion
    (`nflux.ops.made_inverse`) instead of D passes, so it costs about one extra network pass."""

    inverted = True
