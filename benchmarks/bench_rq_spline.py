"""rq_spline: nflux vs the pure-torch reference vs nflows and zuko (when installed).

Prints time (best of interleaved rounds) and elements/s of forward, forward+backward and inverse at N = 2^20 elements,
K = 8 bins, tail bound 3, the ratios to nflux, the peak memory of forward+backward, and the
time of copying the same bytes (inputs + parameters + outputs): the physical floor.

    python benchmarks/bench_rq_spline.py [--n 1048576] [--bins 8] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

import nflux  # noqa: E402

TAIL = 3.0


def make_inputs(n: int, K: int, device: str, requires_grad: bool = False):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.rand(n, generator=g) * 2 * TAIL * 1.1 - TAIL * 1.1).to(device)  # ~9% in the tails
    w = torch.randn(n, K, generator=g).to(device)
    h = torch.randn(n, K, generator=g).to(device)
    d = torch.randn(n, K - 1, generator=g).to(device)
    return [t.requires_grad_(requires_grad) for t in (x, w, h, d)]


def implementations():
    impls = {
        "nflux": lambda x, w, h, d, inverse: nflux.ops.rq_spline(x, w, h, d, inverse=inverse, tail_bound=TAIL),
        "reference": lambda x, w, h, d, inverse: nflux.ops.reference.rq_spline(
            x, w, h, d, inverse=inverse, tail_bound=TAIL
        ),
    }
    try:
        from nflows.transforms.splines.rational_quadratic import (
            unconstrained_rational_quadratic_spline as nflows_spline,
        )

        impls["nflows"] = lambda x, w, h, d, inverse: nflows_spline(
            x, w, h, d, inverse=inverse, tails="linear", tail_bound=TAIL
        )
    except ImportError:
        pass
    try:
        from zuko.transforms import MonotonicRQSTransform

        def zuko_spline(x, w, h, d, inverse):
            t = MonotonicRQSTransform(w, h, d, bound=TAIL)
            if inverse:
                y = t.inv(x)
                return y, -t.log_abs_det_jacobian(y, x)
            return t.call_and_ladj(x)

        impls["zuko"] = zuko_spline
    except ImportError:
        pass
    return impls


def _no_grad(impl, *args):
    with torch.no_grad():
        return impl(*args)


def fwd_bwd(impl, tensors):
    y, lad = impl(*tensors, False)
    (y.sum() + lad.sum()).backward()
    for t in tensors:
        t.grad = None


def memory_case(name: str, n: int, K: int) -> None:
    impl = implementations()[name]
    tensors = make_inputs(n, K, "cpu", requires_grad=True)
    print(H.measure_peak_in_process(lambda: fwd_bwd(impl, tensors)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2**20)
    parser.add_argument("--bins", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds; each case's best is kept")
    parser.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    n, K, device = args.n, args.bins, args.device
    if args.memory_case:
        memory_case(args.memory_case, n, K)
        return

    print(f"rq_spline: N={n} K={K} tail_bound={TAIL} device={device} threads={torch.get_num_threads()} "
          f"torch={torch.__version__} nflux extension={nflux.build_info()['extension_loaded']}")
    impls = implementations()
    plain = make_inputs(n, K, device)
    grad_inputs = make_inputs(n, K, device, requires_grad=True)
    y_for_inverse = nflux.ops.rq_spline(*plain, tail_bound=TAIL)[0]

    cases = {}
    for name, impl in impls.items():
        cases[(name, "forward")] = lambda impl=impl: _no_grad(impl, *plain, False)
        cases[(name, "inverse")] = lambda impl=impl: _no_grad(impl, y_for_inverse, *plain[1:], True)
        cases[(name, "forward+backward")] = lambda impl=impl: fwd_bwd(impl, grad_inputs)
    times = H.time_interleaved(cases, device=device, rounds=args.rounds)

    # The floor: one copy of every byte the forward pass must read and write.
    elem = plain[0].element_size()
    total = n * (1 + 3 * K - 1 + 2) * elem
    src = torch.empty(total // elem, device=device)
    dst = torch.empty_like(src)
    copy_time = H.time_interleaved({"copy": lambda: dst.copy_(src)}, device=device,
                                   rounds=args.rounds)["copy"]

    rows = []
    for name in impls:
        for kind in ("forward", "forward+backward", "inverse"):
            t = times[(name, kind)]
            ours = times[("nflux", kind)]
            rows.append([name, kind, H.fmt_time(t), f"{n / t / 1e6:.1f} M/s", f"{t / ours:.2f}x"])
    H.print_table(["impl", "pass", "time", "elements/s", "time / nflux"], rows)
    print(f"\ncopy floor ({H.fmt_bytes(total)} in+params+out): {H.fmt_time(copy_time)}; "
          f"nflux forward = {times[('nflux', 'forward')] / copy_time:.2f}x floor, "
          f"inverse = {times[('nflux', 'inverse')] / copy_time:.2f}x floor")

    if device == "cpu":
        script = os.path.abspath(__file__)
        mem_rows = []
        ours = None
        for name in impls:
            peak = H.peak_extra_memory_args(script, name, ["--n", str(n), "--bins", str(K)])
            ours = peak if name == "nflux" else ours
            mem_rows.append([name, H.fmt_bytes(peak), f"{peak / max(ours, 1):.2f}x"])
        print()
        H.print_table(["impl", "peak extra memory, forward+backward", "/ nflux"], mem_rows)


if __name__ == "__main__":
    main()
