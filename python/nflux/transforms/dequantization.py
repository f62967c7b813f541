"""Variational dequantisation (Ho et al. 2019, Flow++): the noise u in [0, 1)^D that turns
integer images x into continuous ones, y = (x + u) / L, is drawn from a learned conditional
flow q(u | x) instead of U[0, 1)^D.

q: eps ~ N(0, I) on the image shape, `steps` checkerboard affine couplings whose conv
conditioners see a feature map of x, then u = sigmoid(v). With the model's density p on
[0, 1)^D, log P(x) >= E_q[log p(y) - D log L - log q(u | x)], so bits/dim add log q(u | x) to
the uniform bound's numerator (`nflux.ImageFlow.bits_per_dim`). At initialisation the
couplings are the identity and q is the logistic-normal density of sigmoid(eps).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from nflux.transforms.base import Compose
from nflux.transforms.image import CheckerboardCoupling
from nflux.transforms.preprocess import _Dequantizer, dequantized


class VariationalDequantize(_Dequantizer):
    """Learned dequantisation noise q(u | x) for integer images `[B, C, H, W]` (levels 0..L-1).

    Args:
        shape: (C, H, W).
        levels: L.
        hidden: channels of the feature net on x and of the coupling conditioners.
        steps: number of checkerboard couplings (alternating parity).
    """

    def __init__(self, shape: Sequence[int], levels: int, *, hidden: int = 32, steps: int = 4,
                 channels_last: bool = True):
        super().__init__(levels)
        self.shape = tuple(int(s) for s in shape)
        C = self.shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(C, hidden, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.ReLU(inplace=True),
        )
        self.flow = Compose(*[
            CheckerboardCoupling(self.shape, k % 2, hidden=hidden, blocks=1, context_channels=hidden,
                                 channels_last=channels_last)
            for k in range(steps)
        ])

    def log_q(self, x: torch.Tensor, eps: torch.Tensor):
        """(u, log q(u | x)) for base noise eps `[B, C, H, W]` (the map eps -> u is q's sampler)."""
        context = self.features(x / (self.levels - 1) * 2 - 1)
        v, lad = self.flow(eps, context)
        # log |du/dv| for u = sigmoid(v): log sigmoid(v) + log sigmoid(-v).
        log_dsigmoid = -(F.softplus(v) + F.softplus(-v))
        log_base = -0.5 * eps.square().flatten(1).sum(1) - 0.5 * eps[0].numel() * math.log(2 * math.pi)
        return torch.sigmoid(v), log_base - lad - log_dsigmoid.flatten(1).sum(1)

    def sample(self, x: torch.Tensor, noise: bool | None = None):
        """(y, log q(u | x)): y = (x + u) / L with u ~ q(u | x); `noise=False` takes eps = 0
        (a deterministic point of q, not a sample)."""
        x = self._floating(x, self.features[0].weight.dtype)  # in the feature net's dtype
        eps = torch.randn_like(x) if noise is None or noise else torch.zeros_like(x)
        u, log_q = self.log_q(x, eps)
        return dequantized(x, u, self.levels), log_q

    def forward(self, x: torch.Tensor, noise: bool | None = None) -> torch.Tensor:
        return self.sample(x, noise)[0]

    def extra_repr(self) -> str:
        return f"levels={self.levels}"
