"""Bijective transforms: `forward(x, context=None) -> (y, logabsdet)`, `inverse(y, context=None)`."""

from nflux.transforms.autoregressive import MaskedAffineAutoregressive, MaskedSplineAutoregressive
from nflux.transforms.base import Compose, Inverse, Transform
from nflux.transforms.coupling import (
    AdditiveCoupling,
    AffineCoupling,
    ContextAffine,
    SplineCoupling,
    alternating_mask,
    half_mask,
    random_mask,
)
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
    checkerboard_mask,
)
from nflux.transforms.dequantization import VariationalDequantize
from nflux.transforms.linear import LULinear
from nflux.transforms.normalization import ActNorm
from nflux.transforms.preprocess import Dequantize, Logit, Shift, bits_per_dim, reduce_bits
from nflux.transforms.permutation import Permutation, RandomPermutation, ReversePermutation

__all__ = [
    "ActNorm", "AdditiveCoupling", "AffineCoupling", "Compose", "ContextAffine", "Inverse", "LULinear",
    "MaskedAffineAutoregressive", "MaskedSplineAutoregressive", "Permutation", "RandomPermutation",
    "ReversePermutation", "SplineCoupling", "Transform", "alternating_mask", "half_mask", "random_mask",
    "ActNorm2d", "ActNormInvConv1x1", "ChannelCoupling", "CheckerboardCoupling", "ContextPrior2d", "Dequantize", "FactorOut",
    "InvConv1x1", "Logit", "MultiScale", "Shift", "Squeeze", "bits_per_dim", "checkerboard_mask", "reduce_bits",
    "VariationalDequantize",
]
