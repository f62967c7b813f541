"""Checks of constructor arguments shared by models, transforms and nets: one clear ValueError
naming the argument, where torch would fail deep inside or build a model no call can satisfy."""

from __future__ import annotations

import operator


def check_count(name: str, value, minimum: int) -> int:
    """`value` as an int, or a ValueError naming it unless it is an int >= minimum (a negative
    context width or zero spline bins would otherwise fail deep inside torch, or build a model
    that no call can satisfy)."""
    try:
        count = None if isinstance(value, bool) else operator.index(value)  # ints, numpy ints
    except TypeError:
        count = None
    if count is None or count < minimum:
        raise ValueError(f"nflux: {name} must be an int >= {minimum}, got {value!r}")
    return count
