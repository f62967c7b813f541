"""Sampling a MAF: nflux one-pass inversion vs D-pass (ours) vs zuko and nflows (when installed);
training an IAF: made_inverse's native backward vs its reference backward.

Sampling: a 5-layer MAF (MADE, hidden (256, 256), affine, orderings alternating natural/reversed,
i.e. reversing permutations between layers), batch 4096, D = 16 and 64. Prints the time of
sampling and of log_prob per implementation, the ratio sampling / log_prob, and each
implementation's sampling time / nflux one-pass sampling time. Fast cases take the best of
interleaved rounds; slow cases (the D-pass ones at D = 64 take seconds) are timed once.

Training (`--train-batch`, default 1024): one Adam step of `nflux.IAF` (5 layers, hidden
(256, 256)) on -log_prob, whose density needs made_inverse and so its backward, with the native
backward and with the reference one (autograd through the differentiable one-pass torch code),
interleaved; plus the same-size MAF's step (density = one MADE pass) for scale.

    python benchmarks/bench_autoregressive.py [--batch 4096] [--dims 16 64] [--threads N]
                                              [--sections sample train] [--train-batch 1024]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

import nflux  # noqa: E402
from nflux.nets import MADE  # noqa: E402

# the module, not the function nflux.ops.made_inverse that shadows it
made_inverse_module = importlib.import_module("nflux.ops.made_inverse")

LAYERS, HIDDEN = 5, (256, 256)


class TinyMAF(nn.Module):
    """Benchmark-only MAF: x -> z through 5 MADE-affine layers; sampling inverts them."""

    def __init__(self, features: int):
        super().__init__()
        self.features = features
        self.layers = nn.ModuleList(
            MADE(features, 2, HIDDEN, ordering="natural" if i % 2 == 0 else "reversed") for i in range(LAYERS)
        )
        with torch.no_grad():  # near-identity layers, as after training from a sane init
            for made in self.layers:
                made.weights[-1].mul_(0.1)
        self.base = torch.distributions.Normal(0.0, 1.0)

    def log_prob(self, x):
        total = 0
        for made in self.layers:
            x, lad = made.transform(x)
            total = total + lad
        return self.base.log_prob(x).sum(-1) + total

    def sample(self, n, one_pass=True, composite=False):
        """one_pass: made_inverse (the kernel of the device; composite=True: the ATen-composed
        implementation instead); else the D-pass inversion."""
        z = torch.randn(n, self.features, device=self.layers[0].weights[0].device)
        for made in reversed(self.layers):
            if composite:
                args = (z, list(made.weights), list(made.biases), made.degrees, [])
                z, _ = torch.ops.nflux._made_inverse_composite(*args, False, "relu", "affine", 3.0, 1e-3, 1e-3, 1e-3)
            else:
                z, _ = made.inverse_autoregressive(z) if one_pass else made.inverse_naive(z)
        return z


def peers(D: int) -> dict:
    found = {}
    try:
        import zuko

        torch.manual_seed(0)
        flow = zuko.flows.MAF(features=D, transforms=LAYERS, hidden_features=HIDDEN)
        found["zuko"] = (lambda n: flow().sample((n,)), lambda x: flow().log_prob(x))
    except ImportError:
        pass
    try:
        # nflows.flows pulls in matplotlib; the transforms alone do not, so compose by hand.
        from nflows.transforms import CompositeTransform, MaskedAffineAutoregressiveTransform, ReversePermutation

        torch.manual_seed(0)
        parts = []
        for _ in range(LAYERS):
            # nflows' MADE: an initial layer and num_blocks more, so hidden = (256, 256)
            parts += [MaskedAffineAutoregressiveTransform(D, HIDDEN[0], num_blocks=1), ReversePermutation(D)]
        transform = CompositeTransform(parts).eval()
        base = torch.distributions.Normal(0.0, 1.0)

        def nflows_log_prob(x):
            z, lad = transform(x)
            return base.log_prob(z).sum(-1) + lad

        found["nflows"] = (lambda n: transform.inverse(torch.randn(n, D))[0], nflows_log_prob)
    except ImportError:
        pass
    return found


def check_agreement(model: TinyMAF, batch: int) -> float:
    torch.manual_seed(1)
    a = model.sample(batch, one_pass=True)
    torch.manual_seed(1)
    b = model.sample(batch, one_pass=False)
    return (a - b).abs().max().item()


@contextlib.contextmanager
def reference_backward():
    """made_inverse's gradient through the reference while inside (the baseline)."""
    saved = made_inverse_module._NATIVE_BACKWARD_DTYPES
    made_inverse_module._NATIVE_BACKWARD_DTYPES = {"cpu": ()}  # no dtype: never native
    try:
        yield
    finally:
        made_inverse_module._NATIVE_BACKWARD_DTYPES = saved


def training_table(dims: list[int], batch: int, rounds: int) -> None:
    rows, summary = [], []
    for D in dims:
        torch.manual_seed(0)
        x = torch.randn(batch, D)
        flows = {name: cls(D, layers=LAYERS, hidden=HIDDEN) for name, cls in (("iaf", nflux.IAF), ("maf", nflux.MAF))}
        opts = {name: torch.optim.Adam(flow.parameters(), lr=1e-4) for name, flow in flows.items()}

        def step(name):
            opts[name].zero_grad(set_to_none=True)
            loss = -flows[name].log_prob(x).mean()
            loss.backward()
            opts[name].step()

        def reference_step():
            with reference_backward():
                step("iaf")

        # Gradients of both backwards agree on this model (a check the table rests on).
        grads = []
        for use_reference in (False, True):
            flows["iaf"].zero_grad(set_to_none=True)
            with reference_backward() if use_reference else contextlib.nullcontext():
                (-flows["iaf"].log_prob(x[:256]).mean()).backward()
            grads.append(torch.cat([p.grad.flatten() for p in flows["iaf"].parameters()]))
        err = ((grads[0] - grads[1]).abs().max() / grads[1].abs().max()).item()
        times = H.time_interleaved(
            {"native": lambda: step("iaf"), "reference": reference_step, "maf": lambda: step("maf")},
            rounds=rounds,
        )
        rows.append([str(D), H.fmt_time(times["native"]), H.fmt_time(times["reference"]),
                     f"{times['reference'] / times['native']:.1f}x", H.fmt_time(times["maf"]),
                     f"{times['native'] / times['maf']:.2f}", f"{err:.1e}"])
        summary.append(f"D={D}: IAF training step {times['reference'] / times['native']:.1f}x faster with the "
                       f"native made_inverse backward; IAF step / MAF step = {times['native'] / times['maf']:.2f}")
    print(f"\nIAF training step (Adam on -log_prob): {LAYERS} layers, hidden {HIDDEN}, batch {batch}")
    H.print_table(["D", "IAF native bwd", "IAF reference bwd", "speed-up", "MAF step", "IAF/MAF",
                   "max rel grad diff"], rows)
    print()
    for line in summary:
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sections", nargs="+", choices=["sample", "train"], default=["sample", "train"])
    parser.add_argument("--train-batch", type=int, default=1024)
    parser.add_argument("--device", default="cpu", help="cuda: sampling only (peers are timed on cpu; "
                        "made_inverse has no native CUDA backward yet)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if "sample" in args.sections:
        sampling_table(args)
    if "train" in args.sections and args.device == "cpu":
        training_table(args.dims, args.train_batch, args.rounds)


def sampling_table(args) -> None:
    B, device = args.batch, args.device
    print(f"MAF sampling: {LAYERS} layers, hidden {HIDDEN}, affine, batch {B}, device {device}, "
          f"threads={torch.get_num_threads()} torch={torch.__version__} "
          f"nflux extension={nflux.build_info()['extension_loaded']}")
    rows = []
    summary = []
    with torch.no_grad():
        for D in args.dims:
            torch.manual_seed(0)
            model = TinyMAF(D).to(device)
            x = model.sample(B)
            print(f"D={D}: max |one-pass - D-pass| over a 256-sample draw: {check_agreement(model, 256):.2e}")
            cases = {
                "nflux one-pass": (lambda: model.sample(B), lambda: model.log_prob(x), False),
                "nflux D-pass": (lambda: model.sample(B, one_pass=False), lambda: model.log_prob(x), True),
            }
            if device != "cpu":  # the persistent kernel vs one small GEMM per layer and step
                cases["nflux one-pass ATen composite"] = (lambda: model.sample(B, composite=True),
                                                          lambda: model.log_prob(x), False)
            for name, (sample, log_prob) in (peers(D) if device == "cpu" else {}).items():
                cases[name] = (lambda s=sample: s(B), lambda lp=log_prob: lp(x), True)
            times = {}
            for name, (sample, log_prob, slow) in cases.items():
                if slow and D >= 32 and device == "cpu":
                    t_s = H.time_fn(sample, repeat=1, warmup=0, min_time=0)
                    t_l = H.time_fn(log_prob, device=device, repeat=5, warmup=1)
                else:  # interleaved rounds, best of each: other load on the machine inflates, never deflates
                    t_s = t_l = float("inf")
                    for _ in range(args.rounds):
                        t_s = min(t_s, H.time_fn(sample, device=device, repeat=5, warmup=1))
                        t_l = min(t_l, H.time_fn(log_prob, device=device, repeat=5, warmup=1))
                times[name] = (t_s, t_l)
            ours = times["nflux one-pass"][0]
            for name, (t_s, t_l) in times.items():
                rows.append([str(D), name, H.fmt_time(t_s), H.fmt_time(t_l), f"{t_s / t_l:.2f}",
                             f"{t_s / ours:.1f}x"])
            if "zuko" in times:
                summary.append(f"D={D}: nflux one-pass samples {times['zuko'][0] / ours:.1f}x faster than zuko, "
                               f"sampling/log_prob = {ours / times['nflux one-pass'][1]:.2f}")
    print()
    H.print_table(["D", "impl", "sample", "log_prob", "sample/log_prob", "sample / nflux one-pass"], rows)
    print()
    for line in summary:
        print(line)


if __name__ == "__main__":
    main()
