"""ActNorm (Kingma & Dhariwal 2018) for vectors, with data-dependent initialisation.

y = (x + bias + b0) * exp(log_scale + s0), per feature. `bias` and `log_scale` are the
learnable parameters (initialised to 0); `b0`, `s0` are buffers set once, from the first
batch seen in training mode, so that the output of that batch has zero mean and unit variance
per feature. The first-batch logic uses `torch.where` on an `initialized` buffer and
in-place buffer updates (as BatchNorm updates its running statistics), never a host sync, so
it also runs inside `torch.compile(fullgraph=True)`. In eval mode, or after the first training
batch, the layer is a plain elementwise affine map: a Python mirror of `initialized` (set by
that batch, and by `load_state_dict` from the loaded buffer) skips the batch statistics, which
would otherwise be computed on every training step only to be discarded. An ActNorm that never
saw a training batch is the identity. Only the density direction (`forward`) initialises:
sampling first leaves the layer at the identity until the first training-mode `log_prob`,
which then moves it, so sample after that call (or in eval mode) when the two must agree.
"""

from __future__ import annotations

import torch
from torch import nn

from nflux.transforms.base import Transform, check_features


class ActNorm(Transform):
    """Per-feature affine normalisation with data-dependent init (see module docstring).

    Args:
        features: D.
        eps: floor added to the first batch's standard deviation.
        data_init: if False, skip the data-dependent init (a plain learnable elementwise
            affine map starting at the identity).
    """

    def __init__(self, features: int, *, eps: float = 1e-6, data_init: bool = True):
        super().__init__()
        self.features, self.eps, self.data_init = features, eps, data_init
        self.bias = nn.Parameter(torch.zeros(features))
        self.log_scale = nn.Parameter(torch.zeros(features))
        self.register_buffer("b0", torch.zeros(features))
        self.register_buffer("s0", torch.zeros(features))
        self.register_buffer("initialized", torch.tensor(not data_init))
        self._initialized = not data_init  # the buffer's value, known on the host

    def _offsets(self, x: torch.Tensor):
        # An empty batch has no statistics: it leaves the init to the next batch.
        if not (self.training and self.data_init) or self._initialized or x.numel() == 0:
            return self.b0, self.s0
        with torch.no_grad():
            # Stats of x as it enters the layer, net of the (zero at init) learnable part.
            mean, std = self._batch_stats(x.detach())
            b0 = torch.where(self.initialized, self.b0, -mean.to(self.b0.dtype))
            s0 = torch.where(self.initialized, self.s0, -torch.log(std.to(self.s0.dtype) + self.eps))
            self.b0.copy_(b0)
            self.s0.copy_(s0)
            self.initialized.fill_(True)
        self._initialized = True
        return b0, s0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        saved = state_dict.get(f"{prefix}initialized")
        if saved is not None:
            self._initialized = bool(saved)  # one read when loading, none per step

    #: The dimensions a feature's statistics are taken over (the batch; ActNorm2d adds pixels).
    _stats_dims: tuple[int, ...] = (0,)

    def _batch_stats(self, x: torch.Tensor):
        """Per-feature mean and standard deviation of a batch's finite entries. A feature
        constant over the batch (every feature of a single row, or of one point broadcast
        against many contexts) gets its value as mean and std 1: dividing by eps would scale it
        by 1e6 for good. It is told by its range, not by a zero std: the rounded mean of N
        copies of 0.1 is not 0.1, so their std comes out ~1e-16. A NaN or inf entry is left out
        (one bad value must not set the layer to NaN for every later batch); a feature with no
        finite entry gets mean 0, std 1. Sums are taken of values scaled by their largest, so
        finite inputs up to float max overflow neither the mean nor the variance."""
        dims = self._stats_dims
        per_feature = (slice(None),) + (None,) * (x.dim() - 2)  # a per-feature value along dim 1
        finite = torch.isfinite(x)
        count = finite.sum(dims)
        n = count.clamp(min=1)

        def unit(v):  # v over its per-feature largest magnitude, and that magnitude
            largest = v.abs().amax(dims).clamp(min=torch.finfo(x.dtype).tiny)
            return v / largest[per_feature], largest

        values, magnitude = unit(torch.where(finite, x, 0))
        mean = values.sum(dims) / n * magnitude
        high = torch.where(finite, x, float("-inf")).amax(dims)
        low = torch.where(finite, x, float("inf")).amin(dims)
        constant = ~(high > low)  # also with no finite entry
        mean = torch.where(constant, torch.where(count > 0, high, 0), mean)
        deviations, spread = unit(torch.where(finite, x - mean[per_feature], 0))
        std = (deviations.square().sum(dims) / n).sqrt() * spread
        return mean, torch.where(constant | ~(std > 0), torch.ones_like(std), std)

    def forward(self, x, context=None):
        check_features(self, x, self.features)
        return self._affine(x, *self._offsets(x))

    def apply_without_init(self, x: torch.Tensor) -> torch.Tensor:
        """The map as it stands (the identity before the data init), never initialising: for
        inputs that must not set the statistics (a flow's sampling contexts)."""
        return self._affine(x, self.b0, self.s0)[0]

    def _affine(self, x, b0, s0):
        log_scale = self.log_scale + s0
        y = (x + (self.bias + b0)) * torch.exp(log_scale)
        # A tensor of its own per row (an expanded one refuses in-place updates such as lad += v).
        return y, log_scale.sum().expand(x.shape[0]).clone()

    def inverse(self, y, context=None):
        check_features(self, y, self.features)
        log_scale = self.log_scale + self.s0
        x = y * torch.exp(-log_scale) - (self.bias + self.b0)
        return x, (-log_scale.sum()).expand(y.shape[0]).clone()

    def extra_repr(self) -> str:
        return f"features={self.features}, data_init={self.data_init}"
