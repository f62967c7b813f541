"""MADE (Germain et al. 2015) and ResMADE (Durkan et al. 2019), with one-pass inversion."""

from __future__ import annotations

import math
import operator
from typing import Sequence

import torch
from torch import nn

from nflux import ops
from nflux._args import check_count

_ACTIVATIONS = {"relu": torch.relu, "elu": nn.functional.elu, "tanh": torch.tanh, "gelu": nn.functional.gelu}
# On a fresh layer output nothing else holds, in place saves an allocation (the backward of
# relu, elu and tanh reads the result, which is what stays); gelu's backward needs its input.
_ACTIVATIONS_INPLACE = {"relu": torch.relu_, "elu": lambda h: nn.functional.elu(h, inplace=True),
                        "tanh": torch.tanh_, "gelu": nn.functional.gelu}


def input_degrees(features: int, ordering: str | Sequence[int] = "natural", seed: int = 0) -> list[int]:
    """Degree (1-based generation step) of each input.

    ordering: "natural" (x_1 first), "reversed", "random" (a permutation drawn from `seed`), or a
    sequence of input indices in generation order.
    """
    if isinstance(ordering, str):
        if ordering == "natural":
            order = list(range(features))
        elif ordering == "reversed":
            order = list(range(features))[::-1]
        elif ordering == "random":
            order = torch.randperm(features, generator=torch.Generator().manual_seed(seed)).tolist()
        else:
            raise ValueError(f"nflux: ordering must be natural, reversed, random or a permutation, got {ordering!r}")
    else:
        try:  # indices, not values int() would truncate (0.5, 1.2, 2.9 is no ordering)
            order = [operator.index(i) for i in ordering]
        except TypeError:
            raise ValueError(f"nflux: ordering must be a permutation of 0..{features - 1}, got {list(ordering)}") from None
        if sorted(order) != list(range(features)):
            raise ValueError(f"nflux: ordering must be a permutation of 0..{features - 1}, got {order}")
    degrees = [0] * features
    for step, i in enumerate(order):
        degrees[i] = step + 1
    return degrees


def hidden_degrees(width: int, features: int, context: bool = False) -> list[int]:
    """Degrees 1..D-1 (0..D-1 with a context), each equally represented, in ascending order.

    A unit of degree 0 sees no input, only the context, and it is what lets the first feature's
    parameters depend on the context (the context is an input of degree 0): without such units
    the first feature of every layer ignored the context, and a one-feature MAF ignored it
    altogether. Without a context they would be constants, so there the degrees start at 1
    (all 1 when D = 1). Sorted, a hidden layer's mask is a staircase (each unit sees a prefix
    of the units before), which a few rectangles cover: masked_linear then skips most
    masked-out multiply-adds.
    """
    low = 0 if context else 1
    span = max(1, features - low)
    return sorted(i % span + low for i in range(width))


class MADE(nn.Module):
    """Masked autoencoder for distribution estimation: outputs `[B, D, P]` where the params of
    feature i depend only on the features generated before it.

    Args:
        features: D.
        params_per_feature: P (2 for affine, 3K-1 for a K-bin rational-quadratic spline).
        hidden_features: widths of the hidden layers. With `residual=True` (ResMADE as in the
            NSF paper) all must be equal: an initial masked layer to that width, then one
            residual block (two masked layers, the second initialised near 0) per entry.
        context_features: size of an optional context; it feeds every hidden layer unmasked.
        ordering: "natural", "reversed", "random" (with `seed`) or a sequence of input
            indices in generation order.
        activation: "relu", "elu", "tanh" or "gelu".
    """

    def __init__(
        self,
        features: int,
        params_per_feature: int = 2,
        hidden_features: Sequence[int] = (64, 64),
        *,
        context_features: int | None = None,
        ordering: str | Sequence[int] = "natural",
        seed: int = 0,
        residual: bool = False,
        activation: str = "relu",
    ):
        super().__init__()
        if context_features is not None:
            context_features = check_count("context", context_features, 0)
        hidden_features = [int(h) for h in hidden_features]
        if features < 1 or params_per_feature < 1 or not hidden_features or min(hidden_features) < 1:
            raise ValueError("nflux: MADE needs features >= 1, params_per_feature >= 1 and hidden layers of width "
                             f">= 1, got {features}, {params_per_feature}, {hidden_features}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"nflux: activation must be one of {', '.join(_ACTIVATIONS)}, got {activation!r}")
        if residual:
            if len(set(hidden_features)) != 1:
                raise ValueError(f"nflux: a residual MADE needs equal hidden widths, got {hidden_features}")
            widths = [hidden_features[0]] * (1 + 2 * len(hidden_features))
        else:
            widths = hidden_features
        self.features, self.params_per_feature = features, params_per_feature
        self.residual, self.activation = residual, activation
        D, P = features, params_per_feature

        in_deg = input_degrees(features, ordering, seed)
        layer_deg = [in_deg] + [hidden_degrees(w, D, bool(context_features)) for w in widths]
        # Static ints: the op takes them as a schema int[], so they never become device data.
        self.degrees = [k for layer in layer_deg for k in layer]
        self.register_buffer("input_degrees", torch.tensor(in_deg), persistent=False)

        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        sizes = [D, *widths, D * P]
        out_deg = [torch.tensor(k) for k in layer_deg[1:]] + [torch.tensor(in_deg).repeat_interleave(P)]
        # Rectangles covering each mask (static ints, found once here): see ops.masked_linear.
        self.mask_blocks: list[list[int]] = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            d_in, d_out = torch.tensor(layer_deg[i]), out_deg[i]
            last = i == len(sizes) - 2
            mask = d_out[:, None] > d_in[None, :] if last else d_out[:, None] >= d_in[None, :]
            self.mask_blocks.append(ops.masked_linear_blocks(mask))
            bound = 1 / math.sqrt(fan_in)
            weight = torch.empty(fan_out, fan_in).uniform_(-bound, bound)
            bias = torch.empty(fan_out).uniform_(-bound, bound)
            self.register_buffer(f"mask{i}", mask.to(weight.dtype))  # the default dtype, as the weights
            if residual and i > 0 and i % 2 == 0 and not last:  # a block's second layer
                weight.uniform_(-1e-3, 1e-3)
                bias.zero_()
            self.weights.append(nn.Parameter(weight))
            self.biases.append(nn.Parameter(bias))
        self.context = (
            nn.ModuleList(nn.Linear(context_features, w) for w in widths) if context_features else None
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The masks follow from the constructor's arguments, and so do the rectangles that
        # masked_linear computes and the degrees that made_inverse uses: a checkpoint with other
        # masks (say, saved before hidden units were sorted by degree) must not load silently.
        for i, mask in enumerate(self.masks()):
            saved = state_dict.get(f"{prefix}mask{i}")
            if saved is not None and (saved.shape != mask.shape or not torch.equal(saved.to(mask), mask)):
                raise ValueError(
                    f"nflux: {prefix}mask{i} in the checkpoint differs from this MADE's: it was saved with other "
                    "degrees (another ordering, or the unsorted hidden units of earlier nflux versions)"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def masks(self) -> list[torch.Tensor]:
        return [getattr(self, f"mask{i}") for i in range(len(self.weights))]

    def context_terms(self, context: torch.Tensor | None, batch: int) -> list[torch.Tensor]:
        """Each hidden layer's context contribution `[B, width]` (empty without context)."""
        if self.context is None:
            if context is not None:
                raise ValueError("nflux: this MADE was built without context_features")
            return []
        if context is None:
            raise ValueError("nflux: this MADE needs a context")
        if context.shape[-1] != self.context[0].in_features:
            raise ValueError(f"nflux: this MADE needs a context [..., {self.context[0].in_features}], "
                             f"got {list(context.shape)}")
        terms = [layer(context) for layer in self.context]
        return [t.expand(batch, -1) if t.dim() == 1 or t.shape[0] == 1 else t for t in terms]

    def hidden(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """The activations entering the output layer, `[B, width]` (with `forward`'s masks, so a
        caller may apply the output layer its own way, e.g. as several contiguous heads)."""
        ctx = self.context_terms(context, x.shape[0])
        act = _ACTIVATIONS[self.activation]
        masks, n = self.masks(), len(self.weights)

        def linear(i, h):
            out = ops.masked_linear(h, self.weights[i], self.biases[i], masks[i], self.mask_blocks[i])
            return out.add_(ctx[i]) if ctx else out  # a fresh output: in place is safe

        if not self.residual:
            h = x
            for i in range(n - 1):
                h = _ACTIVATIONS_INPLACE[self.activation](linear(i, h))
        else:
            h = linear(0, x)
            for i in range(1, n - 1, 2):
                h = h + linear(i + 1, act(linear(i, act(h))))
        return h

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Params `[B, D, P]` for inputs `[B, D]`."""
        n = len(self.weights)
        out = ops.masked_linear(self.hidden(x, context), self.weights[n - 1], self.biases[n - 1], self.masks()[n - 1],
                                self.mask_blocks[n - 1])
        return out.reshape(x.shape[0], self.features, self.params_per_feature)

    def transform(self, x: torch.Tensor, transformer: str = "affine", context=None, **options):
        """The autoregressive transform y = T(x; MADE(x)) in one pass: `(y, logabsdet [B])`.

        affine: y = x * exp(log_scale) + shift; rq_spline: see `nflux.ops.rq_spline`
        (options: tail_bound, min_bin_width, min_bin_height, min_derivative).
        """
        params = self(x, context)
        return ops.autoregressive_transformer(x, params, transformer, **options)

    def inverse_autoregressive(self, y: torch.Tensor, transformer: str = "affine", context=None, **options):
        """x with T(x; MADE(x)) = y, in about one network pass: `(x, log|det dx/dy| [B])`."""
        return ops.made_inverse(
            y, list(self.weights), list(self.biases), self.degrees, self.context_terms(context, y.shape[0]),
            residual=self.residual, activation=self.activation, transformer=transformer, **options,
        )

    def inverse_naive(self, y: torch.Tensor, transformer: str = "affine", context=None, **options):
        """The same inverse by D full network passes (the textbook way; for comparison)."""
        x = torch.zeros_like(y)
        for _ in range(self.features):
            x, logabsdet = ops.autoregressive_transformer(
                y, self(x, context), transformer, inverse=True, **options
            )
        return x, logabsdet
