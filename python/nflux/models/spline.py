"""Neural spline flows (Durkan et al. 2019), coupling or autoregressive."""

from __future__ import annotations

from typing import Sequence

from nflux._args import check_count
from nflux.flow import Flow, StandardNormal
from nflux.transforms import ActNorm, ContextAffine, MaskedSplineAutoregressive, SplineCoupling, alternating_mask


class NSF(Flow):
    """Rational-quadratic neural spline flow.

    An ActNorm (data-initialised) maps the input into the spline's range, so data with values
    in the tens work out of the box; with a context, a `ContextAffine` then moves and scales
    each context's density into that range (`context_affine=False` leaves it out: the splines'
    identity tails then ignore the context, so a conditional density outside
    [-tail_bound, tail_bound] after the ActNorm cannot follow it); then `layers` spline layers with `bins` bins on
    [-tail_bound, tail_bound] (identity tails), each starting at the identity:
    coupling (`autoregressive=False`, alternating masks, MLP conditioners) or autoregressive
    (MADE, orderings alternating natural / reversed; sampling by one-pass inversion).
    """

    def __init__(self, features: int, *, context: int = 0, layers: int = 5, hidden: Sequence[int] = (128, 128),
                 bins: int = 8, tail_bound: float = 3.0, autoregressive: bool = False, residual: bool = False,
                 activation: str = "relu", context_affine: bool = True):
        if layers < 1:
            raise ValueError(f"nflux: layers must be >= 1, got {layers}")
        context = check_count("context", context, 0)
        if residual and not autoregressive:
            raise ValueError("nflux: residual=True is for the MADE of an autoregressive NSF (autoregressive=True)")
        if not autoregressive and features < 2:
            raise ValueError("nflux: a coupling NSF needs features >= 2 (use autoregressive=True; nsf-ar in the CLI)")
        transforms = [ActNorm(features)]
        if context and context_affine:
            transforms.append(ContextAffine(features, context, hidden=hidden, activation=activation))
        for i in range(layers):
            if autoregressive:
                transforms.append(MaskedSplineAutoregressive(
                    features, context=context, hidden=hidden, residual=residual, bins=bins, tail_bound=tail_bound,
                    ordering="natural" if i % 2 == 0 else "reversed", activation=activation))
            else:
                transforms.append(SplineCoupling(
                    features, alternating_mask(features, i % 2), context=context, hidden=hidden, bins=bins,
                    tail_bound=tail_bound, activation=activation))
        super().__init__(transforms, StandardNormal(features), context=context, context_norm=context > 0)
        self.config = dict(features=features, context=context, layers=layers, hidden=tuple(hidden), bins=bins,
                           tail_bound=tail_bound, autoregressive=autoregressive, residual=residual,
                           context_affine=bool(context and context_affine))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())
