"""Masked autoregressive transforms (MAF, autoregressive NSF) on `nflux.nets.MADE`.

forward (the density direction) is one MADE pass: y_i = T(x_i; MADE(x)_i). inverse (the
sampling direction) is sequential in principle; it uses the one-pass inversion
`MADE.inverse_autoregressive` (`nflux.ops.made_inverse`), which costs about one network pass.
`Inverse(...)` of these layers gives IAF-style layers (fast sampling; their density uses the
same one-pass inversion).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from nflux import ops
from nflux._args import check_count
from nflux.nets.made import MADE
from nflux.transforms.base import Transform, check_features


class _MaskedAutoregressive(Transform):
    transformer = "affine"
    # One GEMM for all heads, the heads then strided views: worth it when each head is narrow
    # (D columns: a GEMM that thin runs at a fraction of the rate), not for spline heads.
    merge_heads = False

    def __init__(self, features: int, params_per_feature: int, *, context: int = 0,
                 hidden: Sequence[int] = (256, 256), residual: bool = False,
                 ordering: str | Sequence[int] = "natural", seed: int = 0, activation: str = "relu"):
        super().__init__()
        self.features = features
        self.made = MADE(features, params_per_feature, hidden, context_features=context or None,
                         ordering=ordering, seed=seed, residual=residual, activation=activation)
        with torch.no_grad():  # identity start: the output layer's weight is zero
            self.made.weights[-1].zero_()
            self.made.biases[-1].copy_(self._out_bias().to(self.made.biases[-1]))
        self.options: dict = {}
        # The density pass applies MADE's output layer as one head per parameter group (rows
        # i*P + p for p in the group), so each group comes out contiguous `[B, D, size]`:
        # strided slices of `[B, D, P]` would be copied by the native ops and their gradients
        # scattered back into zero-filled buffers, which costs more than the GEMMs at D = 16.
        last_mask = self.made.masks()[-1]
        start = 0
        for g, size in enumerate(self._group_sizes()):
            rows = torch.tensor([i * params_per_feature + p for i in range(features) for p in range(start, start + size)],
                                dtype=torch.long)  # long also when empty (one bin: no derivatives)
            self.register_buffer(f"head_rows{g}", rows, persistent=False)
            self.register_buffer(f"head_mask{g}", last_mask[rows].clone(), persistent=False)
            start += size
        self.group_sizes = self._group_sizes()
        self.head_blocks = [ops.masked_linear_blocks(getattr(self, f"head_mask{g}")) for g in range(len(self.group_sizes))]
        if self.merge_heads:  # all heads as one GEMM, group after group
            rows = torch.cat([getattr(self, f"head_rows{g}") for g in range(len(self.group_sizes))])
            self.register_buffer("heads_rows", rows, persistent=False)
            self.register_buffer("heads_mask", last_mask[rows].clone(), persistent=False)
            self.heads_blocks = ops.masked_linear_blocks(self.heads_mask)

    def _group_sizes(self) -> list[int]:  # pragma: no cover
        raise NotImplementedError

    def _heads(self, x, context):
        check_features(self, x, self.features)
        h = self.made.hidden(x, context)
        weight, bias = self.made.weights[-1], self.made.biases[-1]
        if self.merge_heads:
            out = ops.masked_linear(h, weight.index_select(0, self.heads_rows), bias.index_select(0, self.heads_rows),
                                    self.heads_mask, self.heads_blocks)
            return [part.view(x.shape[0], self.features, size)
                    for part, size in zip(out.split([self.features * n for n in self.group_sizes], 1), self.group_sizes)]
        heads = []
        for g, size in enumerate(self.group_sizes):
            rows = getattr(self, f"head_rows{g}")
            out = ops.masked_linear(h, weight.index_select(0, rows), bias.index_select(0, rows),
                                    getattr(self, f"head_mask{g}"), self.head_blocks[g])
            heads.append(out.view(x.shape[0], self.features, size))
        return heads

    def _out_bias(self) -> torch.Tensor:
        return torch.zeros(self.made.biases[-1].shape)

    def inverse(self, y, context=None):
        check_features(self, y, self.features)
        return self.made.inverse_autoregressive(y, self.transformer, context, **self.options)

    def extra_repr(self) -> str:
        return f"features={self.features}, transformer={self.transformer}"


class MaskedAffineAutoregressive(_MaskedAutoregressive):
    """MAF layer: y = x * exp(log_scale) + shift with (shift, log_scale) = MADE(x, context).

    Args: features D; context size (0: none); hidden MADE widths; residual (ResMADE, equal
    widths); ordering ("natural", "reversed", "random" with seed, or a permutation);
    activation.
    """

    transformer = "affine"
    merge_heads = True

    def _group_sizes(self):
        return [1, 1]  # shift, log_scale

    def forward(self, x, context=None):
        shift, log_scale = self._heads(x, context)
        # y = x * exp(log_scale) + shift, MADE's affine convention, as one fused op.
        return ops.affine_coupling(x, shift.view_as(x), log_scale.view_as(x))

    def __init__(self, features: int, *, context: int = 0, hidden: Sequence[int] = (256, 256),
                 residual: bool = False, ordering: str | Sequence[int] = "natural", seed: int = 0,
                 activation: str = "relu"):
        super().__init__(features, 2, context=context, hidden=hidden, residual=residual, ordering=ordering,
                         seed=seed, activation=activation)


class MaskedSplineAutoregressive(_MaskedAutoregressive):
    """Autoregressive NSF layer: y_i = RQS(x_i; MADE(x, context)_i), K bins on
    [-tail_bound, tail_bound] with identity tails; starts at the identity."""

    transformer = "rq_spline"

    def __init__(self, features: int, *, context: int = 0, hidden: Sequence[int] = (128, 128),
                 residual: bool = False, ordering: str | Sequence[int] = "natural", seed: int = 0,
                 activation: str = "relu", bins: int = 8, tail_bound: float = 3.0,
                 min_bin_width: float = 1e-3, min_bin_height: float = 1e-3, min_derivative: float = 1e-3):
        self.bins, self._min_derivative = check_count("bins", bins, 1), float(min_derivative)
        super().__init__(features, 3 * bins - 1, context=context, hidden=hidden, residual=residual,
                         ordering=ordering, seed=seed, activation=activation)
        self.options = dict(tail_bound=float(tail_bound), min_bin_width=min_bin_width,
                            min_bin_height=min_bin_height, min_derivative=min_derivative)

    def _group_sizes(self):
        return [self.bins, self.bins, self.bins - 1]  # widths, heights, derivatives

    def forward(self, x, context=None):
        widths, heights, derivatives = self._heads(x, context)
        y, lad = ops.rq_spline(x, widths, heights, derivatives, **self.options)
        return y, lad.sum(-1)

    def _out_bias(self) -> torch.Tensor:
        K = self.bins
        bias = torch.zeros(self.features, 3 * K - 1)
        # softplus(d) + min_derivative = 1 at the interior knots: with equal bins, the identity.
        bias[:, 2 * K :] = math.log(math.expm1(1.0 - self._min_derivative))
        return bias.reshape(-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bins={self.bins}, tail_bound={self.options['tail_bound']}"
