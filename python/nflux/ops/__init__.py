"""nflux operators: native torch ops with autograd, fake kernels and a pure-torch fallback.

Models and transforms call these functions, never torch.ops.nflux directly.
"""

from nflux.ops import reference
from nflux.ops.coupling import affine_coupling
from nflux.ops.lu_conv1x1 import fold_actnorm, lu_conv1x1
from nflux.ops.rq_spline import rq_spline

__all__ = ["affine_coupling", "fold_actnorm", "lu_conv1x1", "reference", "rq_spline"]
