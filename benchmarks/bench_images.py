"""Image-flow benchmark: training step and sampling of Glow.image (fused ActNorm + 1x1 conv vs
unfused) and RealNVP.image, and digits bits/dim after a fixed number of Adam steps.

    python benchmarks/bench_images.py [--device cpu] [--batch 64] [--steps 200] [--threads 2]
        [--shape 1 8 8] [--hidden 64]

Times are the best of interleaved rounds (see `_harness.time_interleaved`); peak memory is
the extra bytes one training step allocates (CUDA: allocator peak; CPU: peak RSS, coarse).
The bits/dim column trains each model on the digits train split for `--steps` steps (batch
`--batch`, Adam 1e-3) and evaluates the test split with uniform dequantisation.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

import nflux  # noqa: E402
import nflux.data  # noqa: E402


def models(shape, hidden, levels):
    return {
        "Glow (fused)": lambda: nflux.Glow.image(shape, levels=2, steps=4, hidden=hidden, data_levels=levels),
        "Glow (unfused)": lambda: nflux.Glow.image(shape, levels=2, steps=4, hidden=hidden, data_levels=levels,
                                                   fused=False),
        "RealNVP": lambda: nflux.RealNVP.image(shape, levels=2, hidden=hidden, blocks=2, data_levels=levels),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shape", type=int, nargs=3, default=[1, 8, 8])
    p.add_argument("--hidden", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = nflux.data.load("digits")
    levels = data.meta["levels"]
    shape = tuple(args.shape)
    if shape != (1, 8, 8):  # speed only: random integer images of the requested shape
        train = test = torch.randint(0, levels, (1024, *shape)).float()
    else:
        train, test = data.train, data.test
    train, test, dev = train.to(args.device), test.to(args.device), args.device

    rows = []
    for name, build in models(shape, args.hidden, levels).items():
        flow = build().to(dev)
        opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
        batch = train[: args.batch]

        def step():
            opt.zero_grad(set_to_none=True)
            flow.bits_per_dim(batch).mean().backward()
            opt.step()

        def sample():
            flow.sample(args.batch, temperature=0.7)

        times = H.time_interleaved({"train": step, "sample": sample}, device=dev, rounds=5)
        peak = H.measure_peak_in_process(step, dev)
        gen = torch.Generator(device="cpu").manual_seed(0)
        for _ in range(args.steps):
            idx = torch.randint(0, train.shape[0], (args.batch,), generator=gen).to(dev)
            opt.zero_grad(set_to_none=True)
            flow.bits_per_dim(train[idx]).mean().backward()
            opt.step()
        flow.eval()
        with torch.no_grad():
            bpd = torch.cat([flow.bits_per_dim(test[i : i + 256]) for i in range(0, test.shape[0], 256)]).mean()
        rows.append([name, H.fmt_time(times["train"]), H.fmt_time(times["sample"]), H.fmt_bytes(peak),
                     f"{bpd.item():.3f}"])
    print(f"image flows on {shape}, batch {args.batch}, hidden {args.hidden}, device {dev}, "
          f"{args.steps} Adam steps for bits/dim")
    H.print_table(["model", "train step", f"sample {args.batch}", "peak step memory", "test bits/dim"], rows)


if __name__ == "__main__":
    main()
