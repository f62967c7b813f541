"""Coupling layers (NICE, RealNVP, Glow, coupling NSF) and their masks.

A mask is a bool vector over the D features: True marks a feature that is transformed,
False one that is kept and conditions the transform (the nflows convention). The kept
features x_a feed a conditioner MLP (with the context concatenated); its output parameterises
an elementwise bijection of the transformed features x_b. Features are split and merged with
static `index_select`s, so any mask works and nothing depends on data.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from nflux import ops
from nflux._args import check_count
from nflux.nets.mlp import MLP
from nflux.transforms.base import TwoWayTransform, check_features


def alternating_mask(features: int, parity: int = 0) -> torch.Tensor:
    """True at every other feature, starting with feature `parity` (0 or 1)."""
    if parity not in (0, 1):
        raise ValueError(f"nflux: parity must be 0 or 1, got {parity!r}")
    return torch.arange(features) % 2 == parity


def half_mask(features: int, second: bool = True) -> torch.Tensor:
    """True on the second half of the features (`second=False`: the first half)."""
    mask = torch.arange(features) >= features // 2
    return mask if second else ~mask


def random_mask(features: int, seed: int = 0) -> torch.Tensor:
    """A random mask with half the features (rounded down) True, drawn from `seed`."""
    perm = torch.randperm(features, generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(features, dtype=torch.bool)
    mask[perm[: features // 2]] = True
    return mask


class _Coupling(TwoWayTransform):
    """Shared split / merge logic; subclasses define the parameter count and the elementwise map."""

    params_per_feature: int = 1

    def __init__(self, features: int, mask, *, context: int = 0, hidden: Sequence[int] = (256, 256),
                 activation: str = "relu"):
        super().__init__()
        mask = torch.as_tensor(mask).bool().reshape(-1)
        if mask.numel() != features:
            raise ValueError(f"nflux: mask must have {features} entries, got {mask.numel()}")
        if not 0 < int(mask.sum()) < features:
            raise ValueError("nflux: a coupling mask must transform some features and keep others")
        self.features = features
        keep, change = torch.nonzero(~mask).reshape(-1), torch.nonzero(mask).reshape(-1)
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("keep_idx", keep, persistent=False)
        self.register_buffer("change_idx", change, persistent=False)
        self.register_buffer("merge_idx", torch.argsort(torch.cat([keep, change])), persistent=False)
        self.n_keep, self.n_change = keep.numel(), change.numel()
        self.net = MLP(self.n_keep, self._out_features(), hidden, context=context,
                       activation=activation, out_bias=self._out_bias())

    def _out_features(self):
        return self.n_change * self.params_per_feature

    def _out_bias(self):
        return None

    def _map(self, x_change, params, inverse):  # pragma: no cover
        raise NotImplementedError

    def _run(self, x, context, inverse):
        check_features(self, x, self.features)
        x_keep, x_change = x.index_select(1, self.keep_idx), x.index_select(1, self.change_idx)
        params = self.net(x_keep, context)
        y_change, lad = self._map(x_change, params, inverse)
        return torch.cat([x_keep, y_change], 1).index_select(1, self.merge_idx), lad

    def extra_repr(self) -> str:
        return f"features={self.features}, mask={''.join('1' if m else '0' for m in self.mask.tolist())}"


class AdditiveCoupling(_Coupling):
    """NICE: y_b = x_b + t(x_a, context); logabsdet 0."""

    params_per_feature = 1

    def _map(self, x_change, params, inverse):
        return ops.affine_coupling(x_change, params, None, inverse=inverse)


class AffineCoupling(_Coupling):
    """RealNVP / Glow: y_b = x_b * scale(s) + t with (t, s) = net(x_a, context).

    scale: "exp" (RealNVP) or "sigmoid" (Glow, sigmoid(s + 2)); clamp: soft clamp of s to
    clamp * tanh(s / clamp) (None: none). See `nflux.ops.affine_coupling`.
    """

    params_per_feature = 2

    def __init__(self, features: int, mask, *, context: int = 0, hidden: Sequence[int] = (256, 256),
                 activation: str = "relu", scale: str = "exp", clamp: float | None = None):
        self.scale, self.clamp = scale, clamp
        super().__init__(features, mask, context=context, hidden=hidden, activation=activation)

    def _out_features(self):
        return (self.n_change, self.n_change)  # (shift, scale logits), each contiguous

    def _map(self, x_change, params, inverse):
        shift, logits = params
        return ops.affine_coupling(x_change, shift, logits, scale=self.scale, clamp=self.clamp, inverse=inverse)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}, clamp={self.clamp}"


class ContextAffine(TwoWayTransform):
    """y = x * exp(s(c)) + t(c) per feature, (t, s) from an MLP of the context alone
    (zero-initialised: the identity; s soft-clamped to +-clamp).

    A conditional spline flow puts one first: its splines are the identity outside
    [-tail_bound, tail_bound], where they ignore the context, so a conditional density (an sbi
    posterior) that sits outside that range for some contexts, or is much narrower than the
    data, could not be placed there. This layer moves and scales each context's density into
    the splines' range.
    """

    def __init__(self, features: int, context: int, *, hidden: Sequence[int] = (128, 128),
                 activation: str = "relu", clamp: float | None = 5.0):
        super().__init__()
        if context < 1:
            raise ValueError(f"nflux: ContextAffine needs a context (context >= 1), got {context}")
        self.features, self.clamp = features, clamp
        self.net = MLP(0, (features, features), hidden, context=context, activation=activation)

    def _run(self, x, context, inverse):
        check_features(self, x, self.features)
        shift, logits = self.net(x[:, :0], context)  # no input feature: the context alone
        return ops.affine_coupling(x, shift, logits, clamp=self.clamp, inverse=inverse)

    def extra_repr(self) -> str:
        return f"features={self.features}, clamp={self.clamp}"


class SplineCoupling(_Coupling):
    """Coupling NSF (Durkan et al. 2019): y_b = RQS(x_b; net(x_a, context)), K bins on
    [-tail_bound, tail_bound], identity tails. Initialised to the identity."""

    def __init__(self, features: int, mask, *, context: int = 0, hidden: Sequence[int] = (128, 128),
                 activation: str = "relu", bins: int = 8, tail_bound: float = 3.0,
                 min_bin_width: float = 1e-3, min_bin_height: float = 1e-3, min_derivative: float = 1e-3):
        self.bins, self.tail_bound = check_count("bins", bins, 1), float(tail_bound)
        self.params_per_feature = 3 * bins - 1
        self.options = dict(tail_bound=float(tail_bound), min_bin_width=min_bin_width,
                            min_bin_height=min_bin_height, min_derivative=min_derivative)
        self._n_change_init = int(torch.as_tensor(mask).bool().sum())
        super().__init__(features, mask, context=context, hidden=hidden, activation=activation)

    def _out_features(self):
        # widths, heights, derivatives as three contiguous heads, laid out [n_change, K(-1)].
        n, K = self.n_change, self.bins
        return (n * K, n * K, n * (K - 1))

    def _out_bias(self):
        n, K = self._n_change_init, self.bins
        d = math.log(math.expm1(1.0 - self.options["min_derivative"]))
        return torch.cat([torch.zeros(2 * n * K), torch.full((n * (K - 1),), d)])

    def _map(self, x_change, params, inverse):
        B, n, K = x_change.shape[0], self.n_change, self.bins
        w, h, d = params
        y, lad = ops.rq_spline(x_change, w.view(B, n, K), h.view(B, n, K), d.view(B, n, K - 1),
                               inverse=inverse, **self.options)
        return y, lad.sum(-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bins={self.bins}, tail_bound={self.tail_bound}"
