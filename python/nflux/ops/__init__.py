"""nflux operators: native torch ops with autograd, fake kernels and a pure-torch fallback.

Models and transforms call these functions, never torch.ops.nflux directly.
"""

from nflux import _extension
from nflux.ops import _double_backward, reference
from nflux.ops.coupling import affine_coupling
from nflux.ops.lu_conv1x1 import actnorm_lu_conv1x1, fold_actnorm, lu_conv1x1
from nflux.ops.made_inverse import autoregressive_transformer, made_inverse
from nflux.ops.masked_linear import masked_linear, masked_linear_blocks
from nflux.ops.rq_spline import rq_spline

if _extension.loaded:
    _double_backward.register()

__all__ = [
    "actnorm_lu_conv1x1",
    "affine_coupling",
    "autoregressive_transformer",
    "fold_actnorm",
    "lu_conv1x1",
    "made_inverse",
    "masked_linear",
    "masked_linear_blocks",
    "reference",
    "rq_spline",
]
