"""Flow = base distribution + transform, and its `torch.distributions.Distribution` adapter.

Convention: the transform maps data x to the base space z (`forward`, the density
direction); sampling runs `inverse`. So

    log p(x | c) = log p_base(z) + log|det dz/dx|,   z, logabsdet = transform(x, c).

Shapes. The base is over vectors of D features; a context is a vector of C features.
`log_prob(x, context)` takes x `[*batch, D]` and context `[*cbatch, C]` whose batch shapes
broadcast, and returns `[*broadcast(batch, cbatch)]`. `sample(sample_shape, context)` with a
context `[*cbatch, C]` returns `[*sample_shape, *cbatch, D]`: `sample((n,), context=c)` for
c `[M, C]` gives n samples for each of the M contexts, `[n, M, D]`. Internally every call
flattens to `[N, D]` / `[N, C]` with static shapes, so all of this compiles with
`torch.compile(fullgraph=True)`.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
from torch import nn
from torch.distributions import Distribution, constraints

from nflux._args import check_count
from nflux.transforms.base import Compose
from nflux.transforms.normalization import ActNorm


class StandardNormal(nn.Module):
    """N(0, I_D) as a module, so that it follows the flow's `.to(device, dtype)`."""

    def __init__(self, features: int):
        super().__init__()
        self.features = int(features)
        # Zero-size buffer: where and in which dtype to sample (moves with .to()).
        self.register_buffer("_anchor", torch.empty(0), persistent=False)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return -0.5 * z.square().sum(-1) - 0.5 * self.features * math.log(2 * math.pi)

    def sample(self, shape: Sequence[int] = ()) -> torch.Tensor:
        return torch.randn(*shape, self.features, dtype=self._anchor.dtype, device=self._anchor.device)

    def extra_repr(self) -> str:
        return f"features={self.features}"


class DistributionBase(nn.Module):
    """Wraps a `torch.distributions.Distribution` with event shape `(D,)` as a flow base.

    Its tensors do not follow `.to()` (a Distribution is not a module): build it on the device
    you use, or prefer `StandardNormal` (or your own module with `features`, `log_prob`,
    `sample`).
    """

    def __init__(self, distribution: Distribution):
        super().__init__()
        if len(distribution.event_shape) != 1 or distribution.batch_shape != ():
            raise ValueError(
                "nflux: a base distribution needs batch_shape () and event_shape (D,), got "
                f"{tuple(distribution.batch_shape)} and {tuple(distribution.event_shape)} "
                "(wrap a Normal in torch.distributions.Independent(..., 1))"
            )
        self.distribution = distribution
        self.features = int(distribution.event_shape[0])

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return self.distribution.log_prob(z)

    def sample(self, shape: Sequence[int] = ()) -> torch.Tensor:
        d = self.distribution
        return d.rsample(torch.Size(shape)) if d.has_rsample else d.sample(torch.Size(shape))

    def extra_repr(self) -> str:
        return repr(self.distribution)


class Flow(nn.Module):
    """A normalizing flow: `Flow(transform, base)`.

    Args:
        transform: a transform (x -> z) or a list of them (composed in order).
        base: an nn.Module with `features`, `log_prob(z [N, D]) -> [N]` and
            `sample(shape) -> [*shape, D]`; an int D for `StandardNormal(D)`; or a
            `torch.distributions.Distribution` with event shape `(D,)` (see `DistributionBase`).
        context: the context's width C, if the transform takes one (0: it takes none). Every
            call checks the context against it, so a wrong width is a `ValueError` naming both,
            not a shape error deep in a conditioner. None (the default) checks nothing.
        context_norm: standardise the context before the transform sees it, with an ActNorm
            initialised by the first training-mode density call (`log_prob`, `transform`), so
            contexts in raw units (observations in the hundreds) train as well as standardised
            ones; sampling and `inverse` use it without initialising it. Needs `context` > 0.
            The five model families turn it on for conditional flows.

    Calling the flow (`flow(x, context)`) is `log_prob`. `sample_shape` arguments take an int n
    as `(n,)`.
    """

    def __init__(self, transform: nn.Module | Sequence[nn.Module], base: nn.Module | int, *,
                 context: int | None = None, context_norm: bool = False):
        super().__init__()
        self.transforms = Compose(*transform) if isinstance(transform, (list, tuple)) else transform
        if isinstance(base, numbers.Integral):
            base = StandardNormal(int(base))
        elif isinstance(base, Distribution):
            base = DistributionBase(base)
        self.base = base
        self.features = int(self.base.features)
        self.context_features = None if context is None else check_count("context", context, 0)
        if context_norm and not self.context_features:
            raise ValueError("nflux: context_norm needs the context's width (context > 0)")
        self.context_norm = ActNorm(self.context_features) if context_norm else None

    # --- shape plumbing -------------------------------------------------------------
    def _check_context(self, context: torch.Tensor | None) -> None:
        C = self.context_features
        if C is None:
            return
        if C == 0 and context is not None:
            raise ValueError("nflux: this flow was built without context (context=0), but a context was given")
        if C > 0 and context is None:
            raise ValueError(f"nflux: this flow needs a context [..., {C}]")
        if context is not None and (context.dim() == 0 or context.shape[-1] != C):
            raise ValueError(f"nflux: expected a context [..., {C}], got {list(context.shape)}")

    def _flatten(self, x: torch.Tensor, context: torch.Tensor | None, init_context: bool = True):
        D = self.features
        if x.dim() == 0 or x.shape[-1] != D:
            raise ValueError(f"nflux: expected inputs with {D} features in the last dim, got {list(x.shape)}")
        self._check_context(context)
        x2, c2, batch = self._flatten_events(x, context, (D,))
        return x2, self._normalize_context(c2, init_context), batch

    def _normalize_context(self, context: torch.Tensor | None, init: bool):
        """The context through `context_norm` (if any); `init`: a density call, which may set
        its statistics."""
        if self.context_norm is None or context is None:
            return context
        return self.context_norm(context)[0] if init else self.context_norm.apply_without_init(context)

    @staticmethod
    def _flatten_events(x, context, event_shape):
        """x `[*batch, *event]` and context `[*cbatch, K]` broadcast to one flat batch (also for
        `ImageFlow`'s image events)."""
        batch = x.shape[: x.dim() - len(event_shape)]
        if context is not None:
            batch = torch.broadcast_shapes(batch, context.shape[:-1])
            context = context.expand(*batch, context.shape[-1]).reshape(-1, context.shape[-1])
        return x.expand(*batch, *event_shape).reshape(-1, *event_shape), context, batch

    @staticmethod
    def _sample_batch(sample_shape, context):
        """The batch `[*sample_shape, *cbatch]` of a draw and the context `[*cbatch, K]` broadcast
        to it, flat. An int n is the sample shape `(n,)`."""
        shape = torch.Size((sample_shape,) if isinstance(sample_shape, numbers.Integral) else sample_shape)
        if context is not None:
            shape = shape + context.shape[:-1]
            context = context.expand(*shape, context.shape[-1]).reshape(-1, context.shape[-1])
        return shape, context

    # --- the two directions -----------------------------------------------------------
    def transform(self, x: torch.Tensor, context: torch.Tensor | None = None):
        """(z, log|det dz/dx|) for x `[*batch, D]`: z `[*batch, D]`, logabsdet `[*batch]`."""
        x2, c2, batch = self._flatten(x, context)
        z, lad = self.transforms(x2, c2)
        return z.reshape(*batch, self.features), lad.reshape(batch)

    def inverse(self, z: torch.Tensor, context: torch.Tensor | None = None):
        """(x, log|det dx/dz|) for z `[*batch, D]`."""
        z2, c2, batch = self._flatten(z, context, init_context=False)
        x, lad = self.transforms.inverse(z2, c2)
        return x.reshape(*batch, self.features), lad.reshape(batch)

    # --- density and sampling --------------------------------------------------------------
    def log_prob(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x | context), shape `[*broadcast(x.batch, context.batch)]`."""
        x2, c2, batch = self._flatten(x, context)
        z, lad = self.transforms(x2, c2)
        return (self.base.log_prob(z) + lad).reshape(batch)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return self.log_prob(x, context)

    def _draw(self, sample_shape, context):
        self._check_context(context)
        shape, context = self._sample_batch(sample_shape, context)
        context = self._normalize_context(context, init=False)
        z = self.base.sample((math.prod(shape),))
        x, lad = self.transforms.inverse(z, context)
        log_prob = self.base.log_prob(z) - lad
        return x.reshape(*shape, self.features), log_prob.reshape(shape)

    def rsample_and_log_prob(self, sample_shape: Sequence[int] = (), context: torch.Tensor | None = None):
        """Reparameterised samples and their log density in one pass (no density inversion):
        x `[*sample_shape, *context.batch, D]`, log_prob `[*sample_shape, *context.batch]`."""
        return self._draw(sample_shape, context)

    def sample_and_log_prob(self, sample_shape: Sequence[int] = (), context: torch.Tensor | None = None):
        """As `rsample_and_log_prob`, without gradients."""
        with torch.no_grad():
            return self._draw(sample_shape, context)

    def rsample(self, sample_shape: Sequence[int] = (), context: torch.Tensor | None = None) -> torch.Tensor:
        """Reparameterised samples `[*sample_shape, *context.batch, D]` (differentiable in the
        parameters and the context)."""
        return self._draw(sample_shape, context)[0]

    def sample(self, sample_shape: Sequence[int] = (), context: torch.Tensor | None = None) -> torch.Tensor:
        """Samples `[*sample_shape, *context.batch, D]`, without gradients."""
        with torch.no_grad():
            return self._draw(sample_shape, context)[0]

    def dist(self, context: torch.Tensor | None = None, validate_args: bool | None = None) -> "FlowDistribution":
        """This flow (conditioned on `context`) as a `torch.distributions.Distribution`;
        `validate_args` as in torch (None: torch's default)."""
        return FlowDistribution(self, context, validate_args=validate_args)


class FlowDistribution(Distribution):
    """`torch.distributions.Distribution` view of a flow at a fixed context.

    batch_shape is the context's batch shape (`()` without context), event_shape `(D,)`;
    `sample`/`rsample(sample_shape)` give `[*sample_shape, *batch_shape, D]`. `expand` (pyro's
    plates, `expand_by`) broadcasts the context, or for an unconditional flow draws independent
    samples over the new batch shape. `validate_args` follows torch's default
    (`Distribution.set_default_validate_args`, on unless Python runs with -O), as every torch
    distribution does: `log_prob` then rejects a value that is not a real vector of D features,
    at the cost of one check (and, on a GPU, one synchronisation) per call;
    `flow.dist(context, validate_args=False)` skips it.
    """

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, flow: Flow, context: torch.Tensor | None = None, batch_shape=None, validate_args=None):
        self.flow, self.context = flow, context
        if batch_shape is None:
            batch_shape = context.shape[:-1] if context is not None else torch.Size()
        super().__init__(torch.Size(batch_shape), torch.Size([flow.features]), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None) -> "FlowDistribution":
        batch_shape = torch.Size(batch_shape)
        try:
            expandable = torch.broadcast_shapes(batch_shape, self.batch_shape) == batch_shape
        except RuntimeError:
            expandable = False
        if not expandable:
            raise ValueError(f"nflux: cannot expand batch shape {tuple(self.batch_shape)} to {tuple(batch_shape)}")
        context = None if self.context is None else self.context.expand(*batch_shape, self.context.shape[-1])
        expanded = FlowDistribution(self.flow, context, batch_shape, validate_args=self._validate_args)
        expanded._event_shape = self._event_shape  # an image flow's (C, H, W)
        return expanded

    def _full(self, sample_shape) -> torch.Size:
        """What the flow must draw: the sample shape, then the batch dims the context lacks."""
        sample_shape = torch.Size(sample_shape)
        return sample_shape + self.batch_shape if self.context is None else sample_shape

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        lp = self.flow.log_prob(value, self.context)
        return lp.expand(torch.broadcast_shapes(lp.shape, self.batch_shape))

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        return self.flow.rsample(self._full(sample_shape), self.context)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        return self.flow.sample(self._full(sample_shape), self.context)

    def rsample_and_log_prob(self, sample_shape=torch.Size()):
        return self.flow.rsample_and_log_prob(self._full(sample_shape), self.context)

    def sample_and_log_prob(self, sample_shape=torch.Size()):
        return self.flow.sample_and_log_prob(self._full(sample_shape), self.context)

    def __repr__(self) -> str:
        return f"FlowDistribution(batch_shape={tuple(self.batch_shape)}, event_shape={tuple(self.event_shape)})"
