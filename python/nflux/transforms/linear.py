"""LU-parameterised invertible linear layer (Glow's 1x1 convolution on vectors)."""

from __future__ import annotations

import torch
from torch import nn

from nflux import ops
from nflux.transforms.base import Transform, check_features
from nflux.transforms.lu_cache import LUCache, cached_lu_conv1x1


class LULinear(Transform):
    """y = W x + bias with W = P (L + I)(U + diag(sign * exp(log_scale))), via `nflux.ops.lu_conv1x1`.

    log|det W| = sum(log_scale), so the logabsdet costs O(D), and the inverse uses two
    triangular solves. P and sign are fixed buffers. When no gradient is needed, W and W^-1
    are built once and kept until a parameter changes (see `nflux.transforms.lu_cache`).

    Args:
        features: D.
        init: "orthogonal" (W a random rotation drawn from `seed`: volume preserving at the
            start, mixes every feature) or "identity".
    """

    def __init__(self, features: int, *, init: str = "orthogonal", seed: int | None = None, bias: bool = True):
        super().__init__()
        self.features = features
        if init == "orthogonal":
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            q, _ = torch.linalg.qr(torch.randn(features, features, generator=gen, dtype=torch.float64))
            p, lower, upper = torch.linalg.lu(q)
            perm = p.argmax(dim=1)  # torch: q = p @ l @ u, and (p @ a) = a[perm]
            diag = torch.diagonal(upper)
            sign, log_scale = torch.sign(diag), torch.log(diag.abs())
            lower, upper = torch.tril(lower, -1), torch.triu(upper, 1)
        elif init == "identity":
            perm = torch.arange(features)
            lower = torch.zeros(features, features, dtype=torch.float64)
            upper = torch.zeros(features, features, dtype=torch.float64)  # its own tensor: .to() may not copy
            sign, log_scale = torch.ones(features, dtype=torch.float64), torch.zeros(features, dtype=torch.float64)
        else:
            raise ValueError(f"nflux: init must be 'orthogonal' or 'identity', got {init!r}")
        dtype = torch.get_default_dtype()
        self.register_buffer("perm", perm.long())
        self.register_buffer("sign", sign.to(dtype))
        self.lower = nn.Parameter(lower.to(dtype))
        self.upper = nn.Parameter(upper.to(dtype))
        self.log_scale = nn.Parameter(log_scale.to(dtype))
        self.bias = nn.Parameter(torch.zeros(features)) if bias else None
        self._weight_cache = LUCache()

    def _apply_op(self, x, inverse):
        if x.dim() == 2:  # the 1x1 conv subclass takes images, checked by the op
            check_features(self, x, self.perm.numel())
        cached = cached_lu_conv1x1(
            self._weight_cache, x, self.perm, self.lower, self.upper, self.log_scale, self.sign, self.bias,
            inverse=inverse,
        )
        if cached is not None:
            return cached
        return ops.lu_conv1x1(
            x, self.perm, self.lower, self.upper, self.log_scale, self.sign, self.bias, inverse=inverse
        )

    def forward(self, x, context=None):
        return self._apply_op(x, False)

    def inverse(self, y, context=None):
        return self._apply_op(y, True)

    def weight(self) -> torch.Tensor:
        """The dense W (for inspection and tests)."""
        return ops.reference.lu_weight(self.perm, self.lower, self.upper, self.log_scale, self.sign)

    def extra_repr(self) -> str:
        return f"features={self.features}, bias={self.bias is not None}"
