"""Conditioner MLP for coupling layers."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

_ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}


class MLP(nn.Module):
    """x (and an optional context, concatenated) -> hidden layers -> out_features.

    `out_features` may be a tuple of sizes: the last layer is then split into one head per
    size and `forward` returns a tuple of contiguous tensors. This is how spline couplings get
    their widths, heights and derivatives: slices of one output would be strided, and the
    native ops would copy them (and autograd would scatter their gradients back) every call.

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
        self.context_features = int(context)
        sizes = [in_features + self.context_features, *[int(h) for h in hidden]]
        layers: list[nn.Module] = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), _ACTIVATIONS[activation]()]
        self.split = not isinstance(out_features, int)
        outs = [int(o) for o in out_features] if self.split else [int(out_features)]
        bias = torch.zeros(sum(outs)) if out_bias is None else torch.as_tensor(out_bias, dtype=torch.float32)
        self.net = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(sizes[-1], o) for o in outs)
        with torch.no_grad():
            for head, b in zip(self.heads, bias.split(outs)):
                head.weight.zero_()
                head.bias.copy_(b)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.context_features:
            if context is None:
                raise ValueError("nflux: this conditioner needs a context")
            if context.shape[0] != x.shape[0]:
                context = context.expand(x.shape[0], -1)
            x = torch.cat([x, context], dim=-1)
        elif context is not None:
            raise ValueError("nflux: this conditioner was built without context (context=0)")
        h = self.net(x)
        if self.split:
            return tuple(head(h) for head in self.heads)
        return self.heads[0](h)
