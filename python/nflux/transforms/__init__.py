"""Bijective transforms: `forward(x, context=None) -> (y, logabsdet)`, `inverse(y, context=None)`."""

from nflux.transforms.autoregressive import MaskedAffineAutoregressive, MaskedSplineAutoregressive
from nflux.transforms.base import Compose, Inverse, Transform
from nflux.transforms.coupling import (
    AdditiveCoupling,
    AffineCoupling,
    SplineCoupling,
    alternating_mask,
    half_mask,
    random_mask,
)
from nflux.transforms.linear import LULinear
from nflux.transforms.normalization import ActNorm
from nflux.transforms.permutation import Permutation, RandomPermutation, ReversePermutation

__all__ = [
    "ActNorm", "AdditiveCoupling", "AffineCoupling", "Compose", "Inverse", "LULinear",
    "MaskedAffineAutoregressive", "MaskedSplineAutoregressive", "Permutation", "RandomPermutation",
    "ReversePermutation", "SplineCoupling", "Transform", "alternating_mask", "half_mask", "random_mask",
]
