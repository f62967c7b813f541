"""Conditioner networks for flows."""

from nflux.nets.made import MADE

__all__ = ["MADE"]
