"""Conditioner networks for flows."""

from nflux.nets.conv import GlowConv, ResNetConv, ZeroConvHeads
from nflux.nets.made import MADE
from nflux.nets.mlp import MLP

__all__ = ["GlowConv", "MADE", "MLP", "ResNetConv", "ZeroConvHeads"]
