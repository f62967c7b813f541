"""Conditioner networks for flows."""

from nflux.nets.made import MADE
from nflux.nets.mlp import MLP

__all__ = ["MADE", "MLP"]
