"""Image-flow benchmark: training images/s and peak memory of Glow.image and RealNVP.image, nflux
vs the same model on the pure-torch reference ops, and digits test bits/dim after a fixed budget.

    python benchmarks/bench_images.py [--configs glow32 realnvp32 glow-digits realnvp-digits]
        [--rounds 3] [--threads 1] [--bpd-steps 300] [--no-profile] [--bf16]
    python benchmarks/bench_images.py --configs glow-paper --rounds 2 --bpd-steps 0   # Glow paper size

Builds, each the same mathematical model (same parameters, same init, same function):
  nflux      native ops (fused affine coupling, fused ActNorm + LU 1x1 conv), conditioners in
             channels-last layout (the library's defaults).
  ref-ops    the same model code on `nflux.ops.reference` (NFLUX_DISABLE_EXTENSION=1): every
             op in plain torch, autograd through it; conditioners channels-last too.
  plain      pure torch as one would write it: reference ops, NCHW conditioners, and for Glow
             ActNorm and the 1x1 conv as two separate layers (`fused=False`).
All three share the rest of the model code: in-place ReLUs after convs, the shift and scale
heads of a conditioner as one conv (as Glow's code does), ActNorm statistics without a copy.
`--bf16` adds each build again with its training loss under torch.autocast(bfloat16) (the
conditioners' convolutions on AMX where the CPU has it; nflux.ops' autocast policy keeps every
flow transform in float32 in all three), and trains the digits bits/dim in both precisions.

Every (model, build) pair runs in its own fresh worker process (`--worker`), driven over a
pipe, so that the extension switch is per process and no pair's allocations can raise
another's memory high-water mark. Times: the workers take turns, one training step each
(zero_grad, bits_per_dim on a batch of 64 integer images, backward, Adam step) per round,
timed in the worker's thread CPU time with `--threads 1` (wall time otherwise); the best of
`--rounds` rounds is reported (load on a shared machine only ever adds time), after two warm-up
steps (ActNorm data init, Adam state). Peak memory: in the worker, after the
warm-up, VmHWM is reset through /proc/self/clear_refs and one training step is run; the peak
RSS minus the RSS before the step is what that step needs (saved activations, gradients,
temporaries). The workers run with MALLOC_MMAP_THRESHOLD_=65536, which pins glibc's mmap
threshold so that every tensor above 64 KiB is mmap'd and unmapped when freed: RSS then follows
the live tensor bytes instead of glibc's cached heap. Profile: one step under torch.profiler
in the nflux build; self CPU time split into convolutions (forward + backward), nflux ops
and the rest (ReLU, elementwise, copies, Adam, ...). The convolutions are the same code in
every build, so ref-ops' step time over nflux's convolution time bounds what any flow-op
implementation could gain over ref-ops (the script prints it). Bits/dim: each digits config trains in
the nflux build for `--bpd-steps` Adam steps (lr 1e-3, batch 64, seed 0) and evaluates the
test split (uniform dequantisation).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SCRIPT = os.path.abspath(__file__)
sys.path.insert(0, os.path.dirname(SCRIPT))

import _harness as H  # noqa: E402

BUILDS = ("nflux", "ref-ops", "plain")
CONFIGS = {
    # name: (model, shape, data, kwargs)
    "glow32": ("Glow", (3, 32, 32), "random", dict(levels=3, steps=4, hidden=128)),
    "realnvp32": ("RealNVP", (3, 32, 32), "random", dict(levels=2, hidden=32, blocks=2)),
    "glow-digits": ("Glow", (1, 8, 8), "digits", dict(levels=2, steps=4, hidden=64)),
    "realnvp-digits": ("RealNVP", (1, 8, 8), "digits", dict(levels=2, hidden=64, blocks=2)),
    "glow-paper": ("Glow", (3, 32, 32), "random", dict(levels=3, steps=8, hidden=512)),
}
BATCH = 64


# --- worker side ---------------------------------------------------------------------------
def build_flow(config: str, build: str):
    import nflux

    build = build.removesuffix("-bf16")
    model, shape, data, kw = CONFIGS[config]
    kw = dict(kw, data_levels=17 if data == "digits" else 256, channels_last=build != "plain")
    if model == "Glow" and build == "plain":
        kw["fused"] = False
    return getattr(nflux, model).image(shape, **kw)


def load_data(config: str):
    import torch

    import nflux.data

    _, shape, data, _ = CONFIGS[config]
    if data == "digits":
        splits = nflux.data.load("digits")
        return splits.train, splits.test
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4 * BATCH, *shape), generator=gen).float()
    return x, x


def worker(config: str, build: str, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    import nflux

    flow = build_flow(config, build)
    train, test = load_data(config)
    batch = train[:BATCH]
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)

    bf16 = build.endswith("-bf16")
    # One thread: its CPU time, which other jobs on a shared machine barely touch (wall time
    # swung by 40% between runs here); several threads: wall time.
    clock = time.thread_time if threads == 1 else time.perf_counter

    def step(x=batch):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = flow.bits_per_dim(x).mean()
        loss.backward()
        opt.step()

    step()
    step()
    reply = {"extension": nflux.build_info()["extension_loaded"],
             "params": sum(p.numel() for p in flow.parameters())}
    print(json.dumps(reply), flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "step":
            start = clock()
            step()
            reply = {"seconds": clock() - start}
        elif cmd == "memory":
            reply = {"bytes": H.measure_peak_in_process(step)}
        elif cmd == "profile":
            reply = profile_step(step)
        elif cmd == "bpd":
            reply = {"bpd": train_and_evaluate(flow, step, train, test, int(args[0]))}
        else:
            raise SystemExit(f"unknown command {cmd!r}")
        print(json.dumps(reply), flush=True)


def profile_step(step) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    parts = {"conv": 0.0, "nflux ops": 0.0, "rest": 0.0}
    for event in prof.key_averages():
        name, us = event.key, event.self_cpu_time_total
        if "convolution" in name or name in ("aten::conv2d", "aten::_convolution"):
            parts["conv"] += us
        elif name.startswith("nflux::"):
            parts["nflux ops"] += us
        else:
            parts["rest"] += us
    return parts


def train_and_evaluate(flow, step, train, test, steps: int) -> float:
    """Test bits/dim after `steps` calls of the worker's training `step` (so in its precision) on
    random batches, evaluated in float32."""
    import torch

    gen = torch.Generator().manual_seed(0)
    flow.train()
    for _ in range(steps):
        step(train[torch.randint(0, train.shape[0], (BATCH,), generator=gen)])
    flow.eval()
    torch.manual_seed(1)  # the dequantisation noise of the evaluation
    with torch.no_grad():
        bpd = torch.cat([flow.bits_per_dim(test[i : i + 256]) for i in range(0, test.shape[0], 256)])
    return float(bpd.mean())


# --- driver side ---------------------------------------------------------------------------
class Worker:
    def __init__(self, config: str, build: str, threads: int):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
        env.pop("NFLUX_DISABLE_EXTENSION", None)
        if build.removesuffix("-bf16") != "nflux":
            env["NFLUX_DISABLE_EXTENSION"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, SCRIPT, "--worker", config, build, "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker died (exit {self.proc.wait()})")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["glow32", "realnvp32", "glow-digits", "realnvp-digits"],
                   choices=list(CONFIGS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bpd-steps", type=int, default=300)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--bf16", action="store_true", help="add every build under torch.autocast(bfloat16)")
    p.add_argument("--worker", nargs=2, metavar=("CONFIG", "BUILD"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(*args.worker, args.threads)

    import torch

    print(f"image flows, batch {BATCH}, cpu, {args.threads} thread(s) per worker, torch {torch.__version__}, "
          f"best of {args.rounds} interleaved rounds, {'thread CPU' if args.threads == 1 else 'wall'} time")
    builds = BUILDS + tuple(f"{b}-bf16" for b in BUILDS) if args.bf16 else BUILDS
    rows, notes = [], []
    for config in args.configs:
        model, shape, data, kw = CONFIGS[config]
        workers = {build: Worker(config, build, args.threads) for build in builds}
        if not workers["nflux"].info["extension"] or workers["ref-ops"].info["extension"]:
            raise SystemExit("nflux build must load the extension and the reference builds must not")
        memory = {b: w.ask("memory")["bytes"] for b, w in workers.items()}
        best = {b: float("inf") for b in builds}
        for _ in range(args.rounds):
            for b, w in workers.items():
                best[b] = min(best[b], w.ask("step")["seconds"])
        desc = f"{model}.image({shape}, {', '.join(f'{k}={v}' for k, v in kw.items())}) on {data}"
        for b in builds:
            rows.append([config, b, H.fmt_time(best[b]), f"{BATCH / best[b]:.1f}",
                         f"{best[b] / best['nflux']:.2f}x", H.fmt_bytes(memory[b]),
                         f"{memory[b] / memory['nflux']:.2f}x"])
        notes.append(f"{config}: {desc}, {workers['nflux'].info['params']:,} parameters")
        if not args.no_profile:
            parts = workers["nflux"].ask("profile")
            total = sum(parts.values())
            notes.append(f"{config} nflux step profile (self CPU time): "
                         + ", ".join(f"{k} {v / total:.1%}" for k, v in parts.items()))
            # Both builds run the same conditioner convolutions; only the flow ops differ. Were
            # everything but the convolutions free in nflux's step, ref-ops' time over nflux's
            # would be ref-ops' time over the convolutions'. (Profiling inflates small ops more
            # than convolutions, so the share is if anything low and the bound high.)
            conv_time = parts["conv"] / total * best["nflux"]
            notes.append(f"{config}: ref-ops time / nflux's convolution time = {best['ref-ops'] / conv_time:.2f}x, "
                         "the most any flow-op implementation can be faster than ref-ops here")
            parts = workers["plain"].ask("profile")
            total = sum(parts.values())
            notes.append(f"{config} plain step profile (self CPU time): "
                         + ", ".join(f"{k} {v / total:.1%}" for k, v in parts.items() if k != "nflux ops"))
        if data == "digits" and args.bpd_steps:
            for b in ("nflux", "nflux-bf16") if args.bf16 else ("nflux",):
                bpd = workers[b].ask(f"bpd {args.bpd_steps}")["bpd"]
                notes.append(f"{config}: digits test bits/dim after {args.bpd_steps} Adam steps (batch {BATCH}, "
                             f"lr 1e-3{', bf16 autocast' if b != 'nflux' else ''}; evaluated in float32): {bpd:.3f}")
        for w in workers.values():
            w.close()
        print(f"done {config}", file=sys.stderr, flush=True)
    print("time ratio = time / nflux time (higher: nflux faster); memory ratio = peak step memory / nflux's")
    H.print_table(["config", "build", "train step", "images/s", "time ratio", "peak step memory", "memory ratio"],
                  rows)
    for line in notes:
        print(line)


if __name__ == "__main__":
    main()
