"""affine_coupling and the ActNorm + 1x1 conv step: nflux vs the reference vs unfused torch.

For tabular [4096, 64] and images [64, 48, 16, 16] prints the time of forward,
forward+backward and inverse, the ratios to nflux, and the peak extra memory of
forward+backward (each measured in a fresh process).

  coupling: nflux.ops.affine_coupling(x, shift, logits) (scale="exp"); unfused is
            s = exp(logits); y = x * s + shift; lad = logits.flatten(1).sum(1) with autograd.
  conv step: ActNorm + invertible 1x1 conv. nflux folds ActNorm into the LU factors
            (fold_actnorm) and runs one lu_conv1x1; unfused is ActNorm in torch, W = P L U
            built in torch, then conv2d (F.linear for tabular); inverse via torch.linalg.inv.

    python benchmarks/bench_coupling.py [--device cpu] [--dtype float32]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

import nflux  # noqa: E402
from nflux.ops import reference  # noqa: E402

SHAPES = {"tabular": (4096, 64), "image": (64, 48, 16, 16)}


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
    up, lsf, bf = nflux.ops.fold_actnorm(perm, lower, upper, ls, sign, bias, an_ls, an_b)
    return nflux.ops.lu_conv1x1(x, perm, lower, up, lsf, sign, bf, inverse=inverse)


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


def fwd_bwd(impl, tensors):
    y, lad = impl(*tensors, False)
    (y.sum() + lad.sum()).backward()
    for t in tensors:
        t.grad = None


def memory_case(case: str, dtype) -> None:
    op, shape_name, name = case.split(":")
    impls, make = OPS[op]
    tensors = make(SHAPES[shape_name], "cpu", dtype, True)
    print(H.measure_peak_in_process(lambda: fwd_bwd(impls[name], tensors)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.memory_case:
        memory_case(args.memory_case, dtype)
        return
    device = args.device
    print(f"coupling + conv step: device={device} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"torch={torch.__version__} nflux extension={nflux.build_info()['extension_loaded']}")
    script = os.path.abspath(__file__)
    for op, (impls, make) in OPS.items():
        for shape_name, shape in SHAPES.items():
            plain = make(shape, device, dtype, False)
            grads = make(shape, device, dtype, True)
            with torch.no_grad():
                y_inv = impls["nflux"](*plain, False)[0]
            times = {}
            for name, impl in impls.items():
                with torch.no_grad():
                    times[(name, "forward")] = H.time_fn(lambda: impl(*plain, False), device=device)
                    times[(name, "inverse")] = H.time_fn(lambda: impl(y_inv, *plain[1:], True), device=device)
                times[(name, "forward+backward")] = H.time_fn(lambda: fwd_bwd(impl, grads), device=device)
            peaks = {}
            if device == "cpu":
                for name in impls:
                    peaks[name] = H.peak_extra_memory_args(
                        script, f"{op}:{shape_name}:{name}", ["--dtype", args.dtype]
                    )
            rows = []
            for name in impls:
                for kind in ("forward", "forward+backward", "inverse"):
                    t, ours = times[(name, kind)], times[("nflux", kind)]
                    mem = ""
                    if kind == "forward+backward" and peaks:
                        mem = f"{H.fmt_bytes(peaks[name])} ({peaks[name] / max(peaks['nflux'], 1):.2f}x)"
                    rows.append([name, kind, H.fmt_time(t), f"{t / ours:.2f}x", mem])
            print(f"\n{op} {shape_name} {list(shape)}")
            H.print_table(["impl", "pass", "time", "time / nflux", "peak extra memory (/ nflux)"], rows)


if __name__ == "__main__":
    main()
