"""Helpers to give a native op its fake kernel, autograd and vmap rules in one place."""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def batch_first(t: torch.Tensor, dim: int | None, size: int) -> torch.Tensor:
    """A vmap rule's argument with its vmapped dim first (`dim` None: expanded to `size`)."""
    return t.expand(size, *t.shape) if dim is None else t.movedim(dim, 0)


def batch_index(t: torch.Tensor | None, dim: int | None, i: int) -> torch.Tensor | None:
    """Index i of a vmap rule's argument along its vmapped dim (unbatched: the argument)."""
    return t if t is None or dim is None else t.select(dim, i)


def register_elementwise_vmap(qualname: str, tensor_args: int, outputs: int) -> None:
    """vmap rule for an op whose first `tensor_args` arguments share leading dimensions.

    The vmapped dimension is moved to the front of every tensor (expanding those that lack it),
    so one call of the op serves the whole batch.
    """
    op = torch.ops.nflux
    for part in qualname.split("::")[1].split("."):
        op = getattr(op, part)

    def rule(info, in_dims, *args):
        moved = [batch_first(arg, dim, info.batch_size) for arg, dim in zip(args[:tensor_args], in_dims[:tensor_args])]
        result = op(*moved, *args[tensor_args:])
        return result, (0,) * outputs

    torch.library.register_vmap(qualname, rule)


def fake_like(*templates: Sequence[int]) -> Callable:
    """A fake kernel returning empty tensors shaped like the given argument positions, and
    contiguous as the kernels' outputs are whatever the inputs' layout (not `empty_like`, which
    would copy a transposed or channels-last layout and fail torch.compile's stride check)."""

    def fake(*args):
        return tuple(args[i].new_empty(args[i].shape) for i in templates)

    return fake
