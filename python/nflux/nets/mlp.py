"""Conditioner MLP for coupling layers."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from nflux._args import check_count

_ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}


class MLP(nn.Module):
    """x (and an optional context, concatenated) -> hidden layers -> out_features.

    `out_features` may be a tuple of sizes: the last layer is then applied as one head per
    size (row blocks of its weight) and `forward` returns a tuple of contiguous tensors. This
    is how spline couplings get their widths, heights and derivatives: slices of one output
    would be strided, and the native ops would copy them (and autograd would scatter their
    gradients back) every call.

    The last layer starts at zero weight (bias zero unless `out_bias` is given), so a
    coupling layer conditioned by it starts at (or near) the identity and training starts
    stable; gradients still reach every layer from the first step on, through the last
    layer's weight.

    Args:
        in_features, out_features: sizes of the input and output.
        hidden: widths of the hidden layers.
        context: size of the context vector (0: none).
        activation: "relu", "elu", "tanh", "gelu" or "silu".
        out_bias: initial bias of the last layer, `[sum(out_features)]` (default zeros).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int | Sequence[int],
        hidden: Sequence[int] = (256, 256),
        *,
        context: int = 0,
        activation: str = "relu",
        out_bias: torch.Tensor | None = None,
    ):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"nflux: activation must be one of {', '.join(_ACTIVATIONS)}, got {activation!r}")
        self.context_features = check_count("context", context, 0)
        sizes = [in_features + self.context_features, *[int(h) for h in hidden]]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), _ACTIVATIONS[activation]()]
        self.split = not isinstance(out_features, int)
        self.out_sizes = [int(o) for o in out_features] if self.split else [int(out_features)]
        self.net = nn.Sequential(*layers)
        # One output layer even when split: its weight is split into row blocks at call time
        # (contiguous views; the backward concatenates their gradients), so the optimizer sees
        # one tensor, not one per head.
        self.out = nn.Linear(sizes[-1], sum(self.out_sizes))
        with torch.no_grad():
            self.out.weight.zero_()
            if out_bias is not None:
                self.out.bias.copy_(torch.as_tensor(out_bias, dtype=self.out.bias.dtype))
            else:
                self.out.bias.zero_()

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.context_features:
            if context is None:
                raise ValueError("nflux: this conditioner needs a context")
            if context.shape[-1] != self.context_features:
                raise ValueError(f"nflux: this conditioner needs a context [..., {self.context_features}], "
                                 f"got {list(context.shape)}")
            if context.shape[0] != x.shape[0]:
                context = context.expand(x.shape[0], -1)
            x = torch.cat([x, context], dim=-1)
        elif context is not None:
            raise ValueError("nflux: this conditioner was built without context (context=0)")
        h = self.net(x)
        if self.split:
            weights = self.out.weight.split(self.out_sizes, 0)
            biases = self.out.bias.split(self.out_sizes, 0)
            return tuple(nn.functional.linear(h, w, b) for w, b in zip(weights, biases))
        return self.out(h)
