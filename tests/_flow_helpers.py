"""Helpers shared by the transform, flow and model tests (brute-force Jacobians, perturbation)."""

from __future__ import annotations

import torch


def perturb(module: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Moves every parameter off its (often identity) initialisation, so tests are not trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def brute_logabsdet(fn, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """log|det J| of x_b -> fn(x_b[None], c_b[None])[0], per row, by autograd Jacobians."""
    out = []
    for b in range(x.shape[0]):
        c = None if context is None else context[b : b + 1]
        jac = torch.autograd.functional.jacobian(lambda v: fn(v[None], c)[0][0], x[b])
        out.append(torch.linalg.slogdet(jac)[1])
    return torch.stack(out)
