"""Model benchmark: training step (forward + backward + Adam) and sampling, nflux vs zuko and nflows.

Every model is built at the same size as its peers (same layers, hidden widths, bins), on
D = 16 and 64 features, batch 512. Peers are included when installed. The nflux models carry
an extra ActNorm at the input (their default), which the peers lack: its cost is counted
against nflux.

    python benchmarks/bench_models.py [--batch 512] [--dims 16 64] [--threads 1] [--rounds 3]
        [--models NSF NSF-AR MAF ...] [--bf16]

`--bf16` adds every implementation's training step again under torch.autocast(bfloat16) (rows
"<impl> bf16"; the "/ nflux" column stays relative to nflux in float32): the MLP and MADE
GEMMs then run on AMX where the CPU has it, while nflux keeps its flow transforms in float32.

For MAF it also counts the GEMM FLOPs of a training step (forward: 2*B*sum(in*out) per layer;
backward: twice that, as the input gradient of the very first layer is not needed but the
weight gradient is) and reports achieved GFLOP/s against an unmasked nn.Linear stack of the
same shapes trained with the same Adam step ("GEMM floor": what the same FLOPs cost as plain
dense layers, with no flow around them). It times the Adam step alone (the same parameter
count in every implementation) and derives a "masked floor": Adam plus only the MACs the
MADE masks admit, run at the dense floor's rate, with nothing else. 2x a peer is reachable only
if half the peer's time is above that floor.

Fast cases take the best of interleaved rounds (other load on a shared machine inflates times,
never deflates them); slow sampling cases (D-pass inversions) are timed once.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

import nflux  # noqa: E402

LAYERS = {"NSF": 5, "NSF-AR": 5, "MAF": 5, "RealNVP": 6, "NICE": 4, "Glow": 6, "IAF": 5}
HIDDEN = {"NSF": (128, 128), "NSF-AR": (128, 128), "MAF": (256, 256), "RealNVP": (256, 256), "NICE": (256, 256),
          "Glow": (256, 256), "IAF": (256, 256)}
BINS, TAIL = 8, 3.0


class Case:
    """log_prob(x) for training and sample(n) of one implementation."""

    def __init__(self, params, log_prob, sample, slow_sample=False):
        self.params, self.log_prob, self.sample, self.slow_sample = list(params), log_prob, sample, slow_sample


def nflux_case(model: str, D: int) -> Case:
    L, Hd = LAYERS[model], HIDDEN[model]
    if model == "NSF":
        flow = nflux.NSF(D, layers=L, hidden=Hd, bins=BINS, tail_bound=TAIL)
    elif model == "NSF-AR":
        flow = nflux.NSF(D, layers=L, hidden=Hd, bins=BINS, tail_bound=TAIL, autoregressive=True)
    else:
        flow = getattr(nflux, model)(D, layers=L, hidden=Hd)
    return Case(flow.parameters(), flow.log_prob, lambda n: flow.sample((n,)))


def zuko_case(model: str, D: int) -> Case | None:
    try:
        import zuko
    except ImportError:
        return None
    L, Hd = LAYERS[model], HIDDEN[model]
    if model == "NSF":
        flow = zuko.flows.NSF(D, bins=BINS, transforms=L, hidden_features=Hd, passes=2)
    elif model == "NSF-AR":
        flow = zuko.flows.NSF(D, bins=BINS, transforms=L, hidden_features=Hd)
    elif model == "MAF":
        flow = zuko.flows.MAF(D, transforms=L, hidden_features=Hd)
    elif model == "RealNVP":
        flow = zuko.flows.RealNVP(D, transforms=L, hidden_features=Hd)
    elif model == "NICE":
        flow = zuko.flows.NICE(D, transforms=L, hidden_features=Hd)
    else:
        return None
    return Case(flow.parameters(), lambda x: flow().log_prob(x), lambda n: flow().sample((n,)),
                slow_sample=model in ("NSF-AR", "MAF"))


class _Net(nn.Module):
    """nflows coupling conditioner: the same MLP as nflux's (context ignored)."""

    def __init__(self, i, o, hidden):
        super().__init__()
        sizes = [i, *hidden]
        layers = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(sizes[-1], o))

    def forward(self, x, context=None):
        return self.net(x)


def nflows_case(model: str, D: int) -> Case | None:
    try:
        # nflows.flows pulls in matplotlib; the transforms alone do not, so compose by hand.
        from nflows import transforms as NT
    except ImportError:
        return None
    L, Hd = LAYERS[model], HIDDEN[model]
    parts = []
    for i in range(L):
        if model == "NSF":
            mask = (torch.arange(D) % 2 == i % 2).int()
            parts.append(NT.PiecewiseRationalQuadraticCouplingTransform(
                mask, lambda a, b: _Net(a, b, Hd), num_bins=BINS, tails="linear", tail_bound=TAIL))
        elif model in ("NSF-AR", "MAF"):
            # nflows' MADE: an initial layer, then num_blocks one-layer blocks: hidden (H, H).
            common = dict(num_blocks=len(Hd) - 1, use_residual_blocks=False)
            if model == "MAF":
                parts.append(NT.MaskedAffineAutoregressiveTransform(D, Hd[0], **common))
            else:
                parts.append(NT.MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
                    D, Hd[0], num_bins=BINS, tails="linear", tail_bound=TAIL, **common))
            parts.append(NT.ReversePermutation(D))
        elif model == "RealNVP":
            mask = (torch.arange(D) % 2 == i % 2).int()
            parts.append(NT.AffineCouplingTransform(mask, lambda a, b: _Net(a, b, Hd)))
        elif model == "NICE":
            mask = (torch.arange(D) % 2 == i % 2).int()
            parts.append(NT.AdditiveCouplingTransform(mask, lambda a, b: _Net(a, b, Hd)))
        else:
            return None
    transform = NT.CompositeTransform(parts)
    base = torch.distributions.Normal(0.0, 1.0)

    def log_prob(x):
        z, lad = transform(x)
        return base.log_prob(z).sum(-1) + lad

    return Case(transform.parameters(), log_prob, lambda n: transform.inverse(torch.randn(n, D))[0],
                slow_sample=model in ("NSF-AR", "MAF"))


def gemm_floor_case(D: int, B: int, hidden=(256, 256), layers=5, out_mult=2) -> tuple[Case, float]:
    """Unmasked nn.Linear stacks of MAF's GEMM shapes, and the FLOPs of one training step."""
    sizes = [D, *hidden, out_mult * D]
    nets = nn.ModuleList()
    for _ in range(layers):
        mods = []
        for a, b in zip(sizes[:-1], sizes[1:]):
            mods += [nn.Linear(a, b), nn.ReLU()]
        nets.append(nn.Sequential(*mods[:-1]))

    def log_prob(x):
        total = 0
        for net in nets:
            out = net(x).reshape(x.shape[0], D, out_mult)
            x = x * torch.exp(out[..., 1]) + out[..., 0]
            total = total + out[..., 1].sum(-1)
        return total - 0.5 * x.square().sum(-1)

    macs = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    flops = layers * 2 * B * macs * 3 - 2 * B * D * hidden[0]  # fwd + bwd; no input grad for x
    return Case(nets.parameters(), log_prob, None), float(flops)


def maf_mac_fractions(D: int) -> tuple[float, float]:
    """Fractions of MAF's dense GEMM MACs that the MADE masks admit (the rest multiply zeros)
    and that nflux computes (the masks' covering rectangles, see nflux.ops.masked_linear_blocks)."""
    layer = nflux.MAF(D, layers=1, hidden=HIDDEN["MAF"]).transforms[1]
    made = layer.made
    heads = [getattr(layer, f"head_mask{g}") for g in range(len(layer.group_sizes))]
    masks = made.masks()[:-1] + heads  # the density pass applies the output layer as heads
    blocks = made.mask_blocks[:-1] + layer.head_blocks

    def computed(mask, b):
        return sum((b[k + 1] - b[k]) * (b[k + 3] - b[k + 2]) for k in range(0, len(b), 4)) if b else mask.numel()

    dense = sum(m.numel() for m in masks)
    return float(sum(m.sum() for m in masks) / dense), sum(computed(m, b) for m, b in zip(masks, blocks)) / dense


def train_step_fn(case: Case, x: torch.Tensor, bf16: bool = False):
    """The training step (its loss under bfloat16 autocast if `bf16`), and its optimizer step
    alone (valid once a step has made gradients)."""
    opt = torch.optim.Adam(case.params, lr=1e-4)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = -case.log_prob(x).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, opt.step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    models = ["NSF", "NSF-AR", "MAF", "IAF", "RealNVP", "NICE", "Glow"]
    parser.add_argument("--models", nargs="+", default=models, choices=models)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="cpu: the thread's CPU time (with --threads 1, robust to other load); wall: elapsed")
    parser.add_argument("--bf16", action="store_true", help="add each training step under torch.autocast(bfloat16)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one thread; use --threads 1 or --clock wall")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    B = args.batch
    print(f"Model benchmark: batch {B}, device cpu, threads={torch.get_num_threads()} clock={args.clock} torch={torch.__version__} "
          f"nflux extension={nflux.build_info()['extension_loaded']}")
    print("layers/hidden: " + ", ".join(f"{m} {LAYERS[m]}x{HIDDEN[m]}" for m in args.models) + f"; bins {BINS}")
    rows, summary = [], []
    for D in args.dims:
        torch.manual_seed(0)
        x = torch.randn(B, D)
        for model in args.models:
            cases = {}
            for name, make in (("nflux", nflux_case), ("zuko", zuko_case), ("nflows", nflows_case)):
                torch.manual_seed(0)
                case = make(model, D)
                if case is not None:
                    cases[name] = case
            flops = None
            if model == "MAF":
                cases["GEMM floor"], flops = gemm_floor_case(D, B, HIDDEN[model], LAYERS[model])
            steps, adam_steps = {}, {}
            for name, c in cases.items():
                steps[name], adam_steps[name] = train_step_fn(c, x)
            if args.bf16:
                for name, c in list(cases.items()):
                    cases[f"{name} bf16"] = Case(c.params, c.log_prob, None)  # sampling: float32 rows only
                    steps[f"{name} bf16"], adam_steps[f"{name} bf16"] = train_step_fn(c, x, bf16=True)
            t_train = {name: float("inf") for name in cases}
            t_sample = {name: float("inf") for name in cases}
            for _ in range(args.rounds):
                for name, c in cases.items():
                    t_train[name] = min(t_train[name], H.time_fn(steps[name], repeat=5, warmup=1, clock=clock))
                    if c.sample is None:
                        continue
                    with torch.no_grad():
                        if c.slow_sample and D >= 32:
                            if t_sample[name] == float("inf"):
                                t_sample[name] = H.time_fn(lambda: c.sample(B), repeat=1, warmup=0, min_time=0, clock=clock)
                        else:
                            t_sample[name] = min(t_sample[name], H.time_fn(lambda: c.sample(B), repeat=5, warmup=1, clock=clock))
            ours_t, ours_s = t_train["nflux"], t_sample["nflux"]
            if flops is not None:  # the optimizer's share: the same for every implementation
                t_adam = {name: H.time_fn(adam_steps[name], repeat=5, warmup=1, clock=clock)
                          for name in ("nflux", "GEMM floor")}
            for name in cases:
                extra = ""
                if flops is not None and not name.endswith("bf16"):
                    extra = f"{flops / t_train[name] / 1e9:.1f} GFLOP/s"
                rows.append([str(D), model, name, H.fmt_time(t_train[name]), f"{t_train[name] / ours_t:.2f}x",
                             H.fmt_time(t_sample[name]) if t_sample[name] < float("inf") else "-",
                             f"{t_sample[name] / ours_s:.1f}x" if t_sample[name] < float("inf") else "-", extra])
            peers = [f"{p} {t_train[p] / ours_t:.2f}x" for p in ("zuko", "nflows") if p in t_train]
            line = f"D={D} {model}: nflux train step {H.fmt_time(ours_t)}; peers' time / ours: {', '.join(peers) or '-'}"
            if args.bf16:
                ours_b = t_train["nflux bf16"]
                peers_b = [f"{p} {t_train[p + ' bf16'] / ours_b:.2f}x" for p in ("zuko", "nflows", "GEMM floor")
                           if p in t_train]
                line += (f"; bf16 autocast: nflux {H.fmt_time(ours_b)} (its float32 time / this: {ours_t / ours_b:.2f}x), "
                         f"bf16 time / nflux bf16: {', '.join(peers_b) or '-'}")
            if flops is not None:
                admitted, computed = maf_mac_fractions(D)
                t_floor, adam_floor = t_train["GEMM floor"], t_adam["GEMM floor"]
                rate = flops / (t_floor - adam_floor)  # dense FLOP/s of the floor, everything but Adam
                masked_floor = adam_floor + admitted * flops / rate
                # The same with the Adam step of nflux's own parameters: masked entries have zero
                # gradients (as in every MADE: zuko's and nflows' Adam steps cost the same), so
                # their second moments stay 0, and torch 2.13's CPU sqrt takes ~19x longer on
                # zeros than on other values. torch's fused Adam (nflux train's) does not care.
                masked_floor_own_adam = t_adam["nflux"] + admitted * flops / rate
                best_peer = min([t_train[p] for p in ("zuko", "nflows") if p in t_train], default=float("nan"))
                line += (f"; dense {flops / 1e9:.2f} GFLOP per step (ours {flops / ours_t / 1e9:.1f} GFLOP/s dense-equivalent), "
                         f"GEMM floor {H.fmt_time(t_floor)} (ours = {ours_t / t_floor:.2f}x floor); "
                         f"the masks admit {admitted:.0%} of the dense MACs, nflux computes {computed:.0%}; "
                         f"Adam step alone: floor {H.fmt_time(adam_floor)}, nflux {H.fmt_time(t_adam['nflux'])}; "
                         f"masked floor (Adam + admitted MACs at the floor's {rate / 1e9:.0f} GFLOP/s) "
                         f"{H.fmt_time(masked_floor)}, ours = {ours_t / masked_floor:.2f}x it; with nflux's Adam step "
                         f"{H.fmt_time(masked_floor_own_adam)}; 2x the best peer needs {H.fmt_time(best_peer / 2)} = "
                         f"{best_peer / 2 / masked_floor:.2f}x the masked floor")
            summary.append(line)
            print(line, flush=True)
    print()
    H.print_table(["D", "model", "impl", "train step", "/ nflux", "sample", "/ nflux", "MAF GEMM rate"], rows)
    print()
    for line in summary:
        print(line)


if __name__ == "__main__":
    main()
