"""affine_coupling and the ActNorm + 1x1 conv step: nflux vs the reference vs unfused torch.

For tabular [4096, 64] and images [64, 48, 16, 16] prints the time of forward,
forward+backward (two ways, below) and inverse, the ratios to nflux, and the memory of
forward+backward into .grad.

  coupling: nflux.ops.affine_coupling(x, shift, logits) (scale="exp"); unfused is
            s = exp(logits); y = x * s + shift; lad = logits.flatten(1).sum(1) with autograd.
  conv step: ActNorm + invertible 1x1 conv. nflux (actnorm_lu_conv1x1) passes ActNorm's scale
            and bias as lu_conv1x1's input_log_scale and input_shift, folded inside the op: one
            op (one autograd node), one GEMM; unfused is ActNorm in torch, W = P L U built in torch, then conv2d (F.linear
            for tabular); inverse via torch.linalg.inv.

forward+backward is `torch.autograd.grad((y, lad), inputs, (gy, glad))` with fixed random
cotangents: the gradients handed on to whatever produced the inputs, as in a flow, where x,
shift and the logits all come out of earlier layers. "fwd+bwd .grad" is
`torch.autograd.backward` into fresh .grad tensors of leaf inputs instead: there autograd must
copy a gradient that is also held elsewhere (shift's gradient is the cotangent itself in both
the fused op and the unfused expression), a copy of the harness's leaves that every impl pays
alike. (Neither is `(y.sum() + lad.sum()).backward()`: its gradient is one value expanded to
y's shape, and materialising it is a slow broadcast copy, ~170 us at [4096, 64], that no real
downstream layer produces.)

Memory (CPU): each case runs in a fresh process, after a warm-up call on a small batch (so
one-time initialisation is not counted), with glibc's mmap threshold at 128 KiB so every large
tensor is its own mapping and leaves the resident set when freed. Reported, above the inputs:
  peak   the high-water mark of the resident set during forward+backward into .grad, minus its value
         just before: everything the call allocates, outputs and gradients included;
  floor  the bytes of y, logabsdet and one gradient per input that requires grad: every
         implementation holds all of them at the end of backward, so no peak is below it;
  own    peak - floor: what the implementation itself adds (activations kept for backward and
         temporaries). The "own" ratio is the memory the fusion saves; the "peak" ratio is
         capped near peak(unfused) / floor however little the fused op allocates. The
         measurement resolves about 0.25 MiB: an own below that counts as 0.25 MiB in the
         ratio, printed as a lower bound (">=");
  kept   the bytes a forward pass keeps alive for its backward beyond its outputs.

Times are the best of --rounds interleaved rounds (the impls take turns in every round), so
load drift on a shared machine hits every impl alike, on a heap that glibc does not trim
(`_harness.steady_heap`: otherwise page faults that depend only on the order of a loop's
allocations, 240 a call for one impl and 39 for another, land in the times).

    python benchmarks/bench_coupling.py [--device cpu] [--dtype float32] [--threads N] [--rounds R]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

import nflux  # noqa: E402
from nflux.ops import reference  # noqa: E402

SHAPES = {"tabular": (4096, 64), "image": (64, 48, 16, 16)}
# The resident-set measurement is good to about this much (page rounding, the allocator
# returning memory during the call): smaller "own" memory is reported as ~0.
OWN_RESOLUTION = 256 * 1024


def coupling_inputs(shape, device, dtype, requires_grad):
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(shape, generator=g, dtype=dtype).to(device) for _ in range(3)]
    ts[2] = ts[2] * 0.5
    return [t.requires_grad_(requires_grad) for t in ts]


def coupling_unfused(x, shift, logits, inverse):
    s = torch.exp(logits)
    if inverse:
        return (x - shift) / s, -logits.flatten(1).sum(1)
    return x * s + shift, logits.flatten(1).sum(1)


COUPLING = {
    "nflux": lambda x, t, s, inverse: nflux.ops.affine_coupling(x, t, s, inverse=inverse),
    "reference": lambda x, t, s, inverse: reference.affine_coupling(x, t, s, inverse=inverse),
    "unfused": coupling_unfused,
}


def step_inputs(shape, device, dtype, requires_grad):
    C = shape[1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=dtype).to(device)
    perm = torch.randperm(C, generator=g).to(device)
    params = [torch.randn(C, C, generator=g, dtype=dtype) * 0.1 for _ in range(2)]
    params += [torch.randn(C, generator=g, dtype=dtype) * 0.1 for _ in range(4)]  # ls, bias, an_ls, an_b
    sign = torch.ones(C, dtype=dtype, device=device)
    params = [p.to(device).requires_grad_(requires_grad) for p in params]
    return [x.requires_grad_(requires_grad), perm, sign, *params]


def step_nflux(x, perm, sign, lower, upper, ls, bias, an_ls, an_b, inverse):
    return nflux.ops.actnorm_lu_conv1x1(x, perm, lower, upper, ls, sign, bias, an_ls, an_b, inverse=inverse)


def _per_channel(v, x):
    return v if x.dim() == 2 else v[:, None, None]


def step_reference(x, perm, sign, lower, upper, ls, bias, an_ls, an_b, inverse):
    pixels = 1 if x.dim() == 2 else x.shape[2] * x.shape[3]
    if inverse:
        h, lad = reference.lu_conv1x1(x, perm, lower, upper, ls, sign, bias, inverse=True)
        return h * _per_channel(torch.exp(-an_ls), x) - _per_channel(an_b, x), lad - pixels * an_ls.sum()
    h = _per_channel(torch.exp(an_ls), x) * (x + _per_channel(an_b, x))
    y, lad = reference.lu_conv1x1(h, perm, lower, upper, ls, sign, bias)
    return y, lad + pixels * an_ls.sum()


def step_unfused(x, perm, sign, lower, upper, ls, bias, an_ls, an_b, inverse):
    C = lower.shape[0]
    eye = torch.eye(C, dtype=x.dtype, device=x.device)
    w = ((torch.tril(lower, -1) + eye) @ (torch.triu(upper, 1) + torch.diag(sign * torch.exp(ls))))[perm]
    pixels = 1 if x.dim() == 2 else x.shape[2] * x.shape[3]
    lad = (pixels * (ls.sum() + an_ls.sum())).expand(x.shape[0])

    def conv(m, v, b):
        return F.linear(v, m, b) if v.dim() == 2 else F.conv2d(v, m[:, :, None, None], b)

    if inverse:
        winv = torch.linalg.inv(w)
        h = conv(winv, x, -(winv @ bias))
        return h * _per_channel(torch.exp(-an_ls), x) - _per_channel(an_b, x), -lad
    h = _per_channel(torch.exp(an_ls), x) * (x + _per_channel(an_b, x))
    return conv(w, h, bias), lad


STEP = {"nflux": step_nflux, "reference": step_reference, "unfused": step_unfused}
OPS = {"coupling": (COUPLING, coupling_inputs), "conv step": (STEP, step_inputs)}


def _no_grad(impl, *args):
    with torch.no_grad():
        return impl(*args)


_COTANGENTS: dict = {}


def cotangents(y, lad):
    """Fixed random gradients of y and logabsdet, as a downstream layer would hand back."""
    key = (tuple(y.shape), y.dtype, y.device)
    if key not in _COTANGENTS:
        g = torch.Generator().manual_seed(1)
        _COTANGENTS[key] = (torch.randn(y.shape, generator=g, dtype=y.dtype).to(y.device),
                            torch.randn(lad.shape, generator=g, dtype=lad.dtype).to(lad.device))
    return _COTANGENTS[key]


def fwd_bwd(impl, tensors):
    y, lad = impl(*tensors, False)
    torch.autograd.backward((y, lad), cotangents(y, lad))
    for t in tensors:
        t.grad = None


def fwd_grad(impl, tensors):
    y, lad = impl(*tensors, False)
    return torch.autograd.grad((y, lad), [t for t in tensors if t.requires_grad], cotangents(y, lad))


# The two forward+backward passes (see the module docstring) and what runs each.
BACKWARD_PASSES = {"forward+backward": fwd_grad, "fwd+bwd .grad": fwd_bwd}
PASSES = ("forward", *BACKWARD_PASSES, "inverse")


def floor_bytes(impl, tensors) -> int:
    """Bytes of y, logabsdet and one gradient per input that requires grad."""
    with torch.no_grad():
        outputs = impl(*tensors, False)
    held = [*outputs, *(t for t in tensors if t.requires_grad)]
    return sum(t.numel() * t.element_size() for t in held)


def memory_case(case: str, dtype) -> None:
    """Prints the peak extra bytes of forward+backward ("peak"), or the bytes a forward pass
    keeps alive for its backward beyond its outputs ("retained")."""
    op, shape_name, name, what = case.split(":")
    impls, make = OPS[op]
    shape = SHAPES[shape_name]
    fwd_bwd(impls[name], make((2, *shape[1:]), "cpu", dtype, True))  # warm-up: lazy init
    tensors = make(shape, "cpu", dtype, True)
    if what == "peak":
        print(H.measure_peak_in_process(lambda: fwd_bwd(impls[name], tensors)))
        return
    gc.collect()
    before = H.rss_bytes()
    y, lad = impls[name](*tensors, False)
    print(max(0, H.rss_bytes() - before - y.numel() * y.element_size() - lad.numel() * lad.element_size()))


# Whole-tensor passes over memory ([batch, ...] floats; a write counts twice, since the CPU
# reads a line before writing it) of the coupling's forward+backward, gradients handed on:
#   nflux:   forward reads x, shift, logits, writes y (5); backward reads grad_y, x, logits,
#            writes grad_x, grad_logits (7). The least any implementation can move.
#   unfused: exp, mul, add (3 + 4 + 4), the row sum (1); backward three muls and the sum of
#            logits' two gradients (4 + 4 + 4 + 3), as torch's profiler lists them.
# Into .grad, both add autograd's copy of the cotangent into shift.grad (3).
COUPLING_PASSES = {"forward+backward": (12, 27), "fwd+bwd .grad": (15, 30)}
FIXED_COST_BATCH = 4


def coupling_ceiling(shape, times, device, dtype, rounds) -> None:
    """Prints the most any fused coupling could gain over unfused torch here, and nflux's gain.

    Model: a call costs a fixed part (Python, the autograd engine, dispatch: the time on
    FIXED_COST_BATCH elements) plus memory traffic. Give the fused op the least traffic any
    implementation can move, at the rate the unfused expression achieves, plus nflux's own
    fixed cost: the unfused time over that is the ceiling on the ratio.
    """
    # Four elements of x's rank: the same calls, next to no data.
    small = coupling_inputs((FIXED_COST_BATCH, *[1] * (len(shape) - 1)), device, dtype, True)
    fns = {(name, kind): (lambda run=run, impl=COUPLING[name]: run(impl, small))
           for name in ("nflux", "unfused") for kind, run in BACKWARD_PASSES.items()}
    fixed = H.time_interleaved(fns, device=device, rounds=rounds * 4, warmup=5)
    rows = []
    for kind, (ours, theirs) in COUPLING_PASSES.items():
        unfused, fixed_u, fixed_n = times[("unfused", kind)], fixed[("unfused", kind)], fixed[("nflux", kind)]
        ideal = fixed_n + max(unfused - fixed_u, 0.0) * ours / theirs
        measured = unfused / times[("nflux", kind)]
        rows.append([kind, H.fmt_time(fixed_n), H.fmt_time(fixed_u), f"{ours} / {theirs}", H.fmt_time(ideal),
                     f"{unfused / ideal:.2f}x", f"{measured:.2f}x", f"{measured / (unfused / ideal):.2f}"])
    print(f"\ncoupling {list(shape)}: the most a fused op could gain over unfused (fixed cost on "
          f"{FIXED_COST_BATCH} elements + the least traffic at unfused's rate)")
    H.print_table(["pass", "fixed nflux", "fixed unfused", "traffic", "ideal fused", "ceiling", "nflux",
                   "nflux / ceiling"], rows)


def scale_kinds(device, dtype, rounds) -> None:
    """nflux's coupling with Glow's sigmoid scale against RealNVP's exp, side by side."""
    for shape_name, shape in SHAPES.items():
        plain = coupling_inputs(shape, device, dtype, False)
        grads = coupling_inputs(shape, device, dtype, True)
        fns = {}
        for scale in ("exp", "sigmoid"):
            def op(x, t, s, inverse, scale=scale):
                return nflux.ops.affine_coupling(x, t, s, scale=scale, inverse=inverse)

            fns[(scale, "forward")] = lambda op=op: _no_grad(op, *plain, False)
            fns[(scale, "forward+backward")] = lambda op=op: fwd_grad(op, grads)
        times = H.time_interleaved(fns, device=device, rounds=rounds, warmup=2)
        rows = [[kind, H.fmt_time(times[("exp", kind)]), H.fmt_time(times[("sigmoid", kind)]),
                 f"{times[('sigmoid', kind)] / times[('exp', kind)]:.2f}x"] for kind in ("forward", "forward+backward")]
        print(f"\nnflux coupling, scale kinds, {shape_name} {list(shape)}")
        H.print_table(["pass", "exp", "sigmoid", "sigmoid / exp"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--rounds", type=int, default=60, help="interleaved timing rounds (best of)")
    parser.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_case:
        memory_case(args.memory_case, dtype)
        return
    device = args.device
    print(f"coupling + conv step: device={device} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"torch={torch.__version__} nflux extension={nflux.build_info()['extension_loaded']}")
    script = os.path.abspath(__file__)
    # Large tensors are then always mmapped and unmapped on free (see the memory note above).
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    if device == "cpu" and not H.steady_heap():
        print("(not glibc: timing on the allocator's default heap)")
    for op, (impls, make) in OPS.items():
        for shape_name, shape in SHAPES.items():
            plain = make(shape, device, dtype, False)
            grads = make(shape, device, dtype, True)
            with torch.no_grad():
                y_inv = impls["nflux"](*plain, False)[0]
            times = {}
            # Interleaved rounds, best of each: every impl sees the same load drift.
            for kind in PASSES:
                fns = {}
                for name, impl in impls.items():
                    if kind in BACKWARD_PASSES:
                        fns[name] = lambda run=BACKWARD_PASSES[kind], impl=impl: run(impl, grads)
                    elif kind == "forward":
                        fns[name] = lambda impl=impl: _no_grad(impl, *plain, False)
                    else:
                        fns[name] = lambda impl=impl: _no_grad(impl, y_inv, *plain[1:], True)
                for name, t in H.time_interleaved(fns, device=device, rounds=args.rounds, warmup=2).items():
                    times[(name, kind)] = t
            peaks, kept = {}, {}
            floor = floor_bytes(impls["nflux"], grads)
            if device == "cpu":
                extra = ["--dtype", args.dtype, "--threads", str(torch.get_num_threads())]
                for name in impls:
                    case = f"{op}:{shape_name}:{name}"
                    peaks[name] = H.peak_extra_memory_args(script, case + ":peak", extra)
                    kept[name] = H.peak_extra_memory_args(script, case + ":retained", extra)
            rows = []
            for name in impls:
                for kind in PASSES:
                    t, ours = times[(name, kind)], times[("nflux", kind)]
                    mem = ""
                    if kind == "fwd+bwd .grad" and peaks:
                        own, our_own = max(peaks[name] - floor, 0), max(peaks["nflux"] - floor, 0)
                        # Below the resolution, nflux's own memory is ~0: the ratio is a lower bound.
                        bound = ">= " if our_own < OWN_RESOLUTION else ""
                        own_ratio = "" if name == "nflux" else f" ({bound}{own / max(our_own, OWN_RESOLUTION):.1f}x)"
                        mem = (f"peak {H.fmt_bytes(peaks[name])} ({peaks[name] / max(peaks['nflux'], 1):.2f}x), "
                               f"own {H.fmt_bytes(own)}{own_ratio}, kept {H.fmt_bytes(kept[name])}")
                    rows.append([name, kind, H.fmt_time(t), f"{t / ours:.2f}x", mem])
            print(f"\n{op} {shape_name} {list(shape)}: memory floor (y, logabsdet, gradients) {H.fmt_bytes(floor)}")
            H.print_table(["impl", "pass", "time", "time / nflux", "memory (/ nflux)"], rows)
            if op == "coupling":
                coupling_ceiling(shape, times, device, dtype, args.rounds)
    scale_kinds(device, dtype, args.rounds)


if __name__ == "__main__":
    main()
