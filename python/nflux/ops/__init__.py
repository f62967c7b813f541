"""nflux operators: native torch ops with autograd, fake kernels and a pure-torch fallback.

Models and transforms call these functions, never torch.ops.nflux directly.
"""

from nflux.ops import reference
from nflux.ops.rq_spline import rq_spline

__all__ = ["reference", "rq_spline"]
