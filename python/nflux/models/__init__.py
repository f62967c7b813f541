"""Ready-made flows: NICE, RealNVP, Glow (vector), MAF, IAF, NSF; image RealNVP and Glow."""

from nflux.models.autoregressive import IAF, MAF
from nflux.models.image import ImageFlow, glow_image, realnvp_image
from nflux.models.coupling import NICE, Glow, RealNVP
from nflux.models.spline import NSF

__all__ = ["Glow", "IAF", "ImageFlow", "MAF", "NICE", "NSF", "RealNVP", "glow_image", "realnvp_image"]
