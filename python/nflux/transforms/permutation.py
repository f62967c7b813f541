"""Feature permutations (volume preserving: logabsdet 0)."""

from __future__ import annotations

from typing import Sequence

import torch

from nflux.transforms.base import Transform, check_features


class Permutation(Transform):
    """y = x[:, perm] for a fixed permutation `perm` of range(D)."""

    def __init__(self, perm: Sequence[int] | torch.Tensor):
        super().__init__()
        perm = torch.as_tensor(perm, dtype=torch.long)
        if perm.dim() != 1 or not torch.equal(perm.sort().values, torch.arange(perm.numel())):
            raise ValueError(f"nflux: perm must be a permutation of 0..D-1, got {perm.tolist()}")
        self.register_buffer("perm", perm)
        self.register_buffer("inverse_perm", torch.argsort(perm))

    def forward(self, x, context=None):
        check_features(self, x, self.perm.numel())
        return x.index_select(-1, self.perm), x.new_zeros(x.shape[0])

    def inverse(self, y, context=None):
        check_features(self, y, self.perm.numel())
        return y.index_select(-1, self.inverse_perm), y.new_zeros(y.shape[0])

    def extra_repr(self) -> str:
        return f"features={self.perm.numel()}"


class ReversePermutation(Permutation):
    """y = x[:, ::-1]."""

    def __init__(self, features: int):
        super().__init__(torch.arange(features - 1, -1, -1))


class RandomPermutation(Permutation):
    """A random permutation drawn once from `seed` (fixed afterwards; saved in state_dict)."""

    def __init__(self, features: int, seed: int = 0):
        super().__init__(torch.randperm(features, generator=torch.Generator().manual_seed(seed)))
