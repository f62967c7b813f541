"""Per-call costs that are not kernels: the autograd wrapper of rq_spline, the [C, C] parameter
work of a Glow step, and the optimizer step.

1. rq_spline at a tiny batch (4 x 16 elements, K = 8), forward with grad and forward+backward:
   nflux's C++ autograd kernel against a twin op whose autograd is registered with
   `torch.library.register_autograd` around the same native kernels, as rq_spline was before.
   At this size the kernels take a few microseconds: the difference is the wrapper.
2. One Adam step on the parameters of two models the trainer builds: torch's default (a loop
   over parameter tensors on CPU), foreach, and fused; `nflux train` uses fused for plain
   contiguous parameters and foreach otherwise (make_adam in nflux/training/trainer.py).
3. An ActNorm + 1x1 conv step (nflux.ops.actnorm_lu_conv1x1, forward+backward) on one row, so
   that the [C, C] parameter work is all there is: lu_conv1x1's CPU host path (one loop over
   the factors, one over their gradients) against its ATen-composed path (the one CUDA takes,
   selected with nflux._C._set_lu_host_path(False)) and the unfused torch step of
   bench_coupling.py, at C = 16 and 64.

Times are the best of --rounds interleaved rounds.

    python benchmarks/bench_overhead.py [--threads 1] [--rounds 300]
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
from nflux.training.trainer import make_adam  # noqa: E402

OPTIONS = (False, 3.0, 1e-3, 1e-3, 1e-3)  # inverse, tail_bound, min bin width/height, min derivative


def python_registered_spline():
    """A twin of nflux::rq_spline whose autograd is `torch.library.register_autograd` (Python
    setup_context and backward around the native ops), as nflux registered it before."""
    lib = torch.library.Library("nflux_bench", "DEF")
    lib.define("rq_spline(Tensor x, Tensor w, Tensor h, Tensor d) -> (Tensor, Tensor)")
    lib.impl("rq_spline", lambda x, w, h, d: torch.ops.nflux.rq_spline(x, w, h, d, *OPTIONS), "CPU")

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad_y, grad_lad):
        return torch.ops.nflux.rq_spline_backward(grad_y, grad_lad, *ctx.saved_tensors, *OPTIONS)

    torch.library.register_autograd("nflux_bench::rq_spline", backward, setup_context=setup_context)
    return lib, torch.ops.nflux_bench.rq_spline


def spline_wrappers(rounds: int) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, generator=g).requires_grad_(True)
    params = [torch.randn(4, 16, k, generator=g).requires_grad_(True) for k in (8, 8, 7)]
    cotangents = (torch.ones(4, 16), torch.ones(4, 16))
    lib, twin = python_registered_spline()  # lib keeps the registration alive
    calls = {"C++ autograd (nflux)": lambda: torch.ops.nflux.rq_spline(x, *params, *OPTIONS),
             "Python register_autograd": lambda: twin(x, *params)}
    fns = {}
    for name, call in calls.items():
        fns[(name, "forward with grad")] = call
        fns[(name, "forward+backward")] = lambda call=call: torch.autograd.backward(call(), cotangents)
    times = H.time_interleaved(fns, rounds=rounds, warmup=10)
    ours = "C++ autograd (nflux)"
    rows = [[name, kind, H.fmt_time(times[(name, kind)]), f"{times[(name, kind)] / times[(ours, kind)]:.2f}x"]
            for name in calls for kind in ("forward with grad", "forward+backward")]
    print("\nrq_spline autograd wrapper, batch 4 x 16, K = 8")
    H.print_table(["wrapper", "pass", "time", "time / nflux"], rows)


def glow_step_parameter_work(rounds: int) -> None:
    import bench_coupling as BC  # its step inputs and unfused step

    rows = []
    for C in (16, 64):
        tensors = BC.step_inputs((1, C), "cpu", torch.float32, True)

        def on_path(host):
            def run():
                nflux._C._set_lu_host_path(host)
                BC.fwd_bwd(BC.step_nflux, tensors)
            return run

        fns = {"nflux, host path": on_path(True), "nflux, ATen path (as CUDA)": on_path(False),
               "unfused torch": lambda: BC.fwd_bwd(BC.step_unfused, tensors)}
        times = H.time_interleaved(fns, rounds=rounds, warmup=10)
        nflux._C._set_lu_host_path(True)
        ours = times["nflux, host path"]
        rows += [[str(C), name, H.fmt_time(t), f"{t / ours:.2f}x"] for name, t in times.items()]
    print("\nActNorm + 1x1 conv step, batch 1, forward+backward: the [C, C] parameter work")
    H.print_table(["C", "impl", "time", "time / host path"], rows)


def adam_steps(rounds: int) -> None:
    digits = nflux.data.load("digits")
    models = {
        "Glow.image((1, 8, 8), levels=2, steps=4, hidden=64)": (
            nflux.Glow.image((1, 8, 8), levels=2, steps=4, hidden=64, data_levels=17),
            lambda m: m.bits_per_dim(digits.train[:64]).mean()),
        "NSF(16, layers=5, hidden=(128, 128))": (
            nflux.NSF(16, layers=5, hidden=(128, 128)), lambda m: -m.log_prob(torch.randn(512, 16)).mean()),
    }
    rows = []
    for name, (model, loss) in models.items():
        loss(model).backward()  # gradients to step with (the ActNorms initialise here too)
        params = [p for p in model.parameters() if p.grad is not None]
        opts = {"default": torch.optim.Adam(params, lr=1e-5), "foreach": torch.optim.Adam(params, lr=1e-5, foreach=True),
                "fused": torch.optim.Adam(params, lr=1e-5, fused=True)}
        group = make_adam(params, lr=1e-5).param_groups[0]
        trainer = "fused" if group["fused"] else "foreach"
        times = H.time_interleaved({k: o.step for k, o in opts.items()}, rounds=rounds, warmup=3)
        for kind, t in times.items():
            rows.append([name, str(len(params)), kind + (" (nflux train)" if kind == trainer else ""),
                         H.fmt_time(t), f"{times['default'] / t:.2f}x"])
    print("\nOne Adam step over a model's parameters")
    H.print_table(["model", "tensors", "Adam", "step", "default / this"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"overhead benchmark: cpu, threads={torch.get_num_threads()}, torch={torch.__version__}, "
          f"nflux extension={nflux.build_info()['extension_loaded']}")
    spline_wrappers(args.rounds)
    glow_step_parameter_work(args.rounds)
    adam_steps(max(args.rounds // 10, 5))


if __name__ == "__main__":
    main()
