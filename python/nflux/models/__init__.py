"""Ready-made flows: NICE, RealNVP, Glow (vector), MAF, IAF, NSF."""

from nflux.models.autoregressive import IAF, MAF
from nflux.models.coupling import NICE, Glow, RealNVP
from nflux.models.spline import NSF

__all__ = ["Glow", "IAF", "MAF", "NICE", "NSF", "RealNVP"]
