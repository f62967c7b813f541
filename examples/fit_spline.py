"""Fits a small neural spline flow to the two-moons density with nflux.ops.rq_spline.

The flow has two autoregressive blocks, each transforming one coordinate with an
unconditional spline and the other with a spline whose parameters an MLP computes from the
first (the NSF construction in two dimensions). It trains by maximum likelihood, then writes
`metrics.json` (test negative log-likelihood in nats) and `samples.png` (data vs samples).

    python examples/fit_spline.py --out runs/demo [--steps 1000]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
from torch import nn

import nflux

BINS = 8
TAIL = 4.0


def two_moons(n: int, generator: torch.Generator, noise: float = 0.1) -> torch.Tensor:
    angle = torch.rand(n, generator=generator) * math.pi
    upper = torch.rand(n, generator=generator) < 0.5
    x = torch.where(upper, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    data = torch.stack([x, y], dim=1) + noise * torch.randn(n, 2, generator=generator)
    return (data - torch.tensor([0.5, 0.25])) / torch.tensor([0.87, 0.5])  # roughly standardised


class SplineBlock(nn.Module):
    """x[first] through a learned spline; x[second] through a spline conditioned on x[first]."""

    def __init__(self, first: int, hidden: int = 64):
        super().__init__()
        self.first, self.second = first, 1 - first
        self.free = nn.Parameter(torch.zeros(3 * BINS - 1))
        self.net = nn.Sequential(
            nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, 3 * BINS - 1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)  # starts as the identity

    @staticmethod
    def _spline(v, params, inverse):
        w, h, d = params.split([BINS, BINS, BINS - 1], dim=-1)
        return nflux.ops.rq_spline(v, w, h, d, inverse=inverse, tail_bound=TAIL)

    def forward(self, x: torch.Tensor, inverse: bool = False):
        a, b = x[:, self.first], x[:, self.second]
        free = self.free.expand(len(x), -1)
        if not inverse:
            a_out, lad_a = self._spline(a, free, False)
            b_out, lad_b = self._spline(b, self.net(a.unsqueeze(1)), False)
        else:
            a_out, lad_a = self._spline(a, free, True)
            b_out, lad_b = self._spline(b, self.net(a_out.unsqueeze(1)), True)
        out = torch.empty_like(x)
        out[:, self.first], out[:, self.second] = a_out, b_out
        return out, lad_a + lad_b


class SplineFlow(nn.Module):
    def __init__(self, blocks: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList(SplineBlock(i % 2) for i in range(blocks))

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(len(x))
        for block in self.blocks:
            x, lad = block(x)
            total = total + lad
        return total - 0.5 * (x.square().sum(1) + 2 * math.log(2 * math.pi))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(n, 2, generator=generator)
        for block in reversed(self.blocks):
            z, _ = block(z, inverse=True)
        return z


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train, test = two_moons(20000, generator), two_moons(5000, generator)

    flow = SplineFlow()
    optimizer = torch.optim.Adam(flow.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    print(f"nflux {nflux.__version__}: {nflux.build_info()}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = train[torch.randint(len(train), (args.batch,), generator=generator)]
        loss = -flow.log_prob(batch).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == 1:
            print(f"step {step:5d}  train nll {loss.item():.4f}")
    seconds = time.perf_counter() - start

    with torch.no_grad():
        test_nll = -flow.log_prob(test).mean().item()
    samples = flow.sample(5000, generator)
    metrics = {"test_nll_nats": test_nll, "steps": args.steps, "train_seconds": seconds}
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(f"test nll {test_nll:.4f} nats, {seconds:.1f} s; wrote {args.out}/metrics.json")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no samples.png")
        return
    fig, axes = plt.subplots(1, 2, figsize=(8, 4), sharex=True, sharey=True)
    for ax, points, title in ((axes[0], test, "data"), (axes[1], samples, "nflux samples")):
        ax.scatter(points[:, 0], points[:, 1], s=1, alpha=0.4)
        ax.set_title(title)
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "samples.png"), dpi=120)
    print(f"wrote {args.out}/samples.png")


if __name__ == "__main__":
    main()
