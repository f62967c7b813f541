"""Timing and memory helpers shared by the benchmark scripts.

Everything a script reports is measured side by side in one run, so ratios are meaningful on a
noisy machine even when absolute times are not.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], *, device: str = "cpu", repeat: int = 7, warmup: int = 2,
            min_time: float = 0.2, clock: Callable[[], float] = time.perf_counter) -> float:
    """Median seconds per call over `repeat` rounds, each long enough to reach `min_time`.

    `clock=time.thread_time` measures the calling thread's CPU time: with one torch thread on a
    shared CPU it leaves out the time other processes hold the core, which wall time counts.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    start = clock()
    fn()
    sync(device)
    once = max(clock() - start, 1e-6)
    inner = max(1, int(min_time / once / repeat) + 1)
    samples = []
    for _ in range(repeat):
        sync(device)
        start = clock()
        for _ in range(inner):
            fn()
        sync(device)
        samples.append((clock() - start) / inner)
    return statistics.median(samples)


def time_interleaved(fns: dict[str, Callable[[], object]], *, device: str = "cpu", rounds: int = 7,
                     warmup: int = 1) -> dict[str, float]:
    """Seconds per call of each fn: the best of `rounds`, the fns taking turns in every round.

    On a shared machine the load drifts over a run; interleaving exposes every fn to the same
    drift, and the best round is the one least disturbed, so ratios stay meaningful.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def steady_heap() -> bool:
    """Keeps freed memory in glibc's heap for the rest of the process (no trimming, no mmap).

    By default glibc hands a free block at the top of the heap back to the kernel once it passes
    a threshold that adapts to the sizes freed so far (about 2 MiB in a loop of 1 MiB tensors),
    and the next call faults the pages in again. Whether a timed loop trips it depends only on
    the order of its allocations and frees: one loop paid 240 page faults a call and another 39
    for the same work. Timing on a steady heap charges each implementation its own work (in a
    training process, larger frees raise the threshold and trimming is rarer). Returns whether
    the allocator is glibc's (elsewhere it does nothing).
    """
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name)
    if not hasattr(libc, "mallopt"):
        return False
    # 32 MiB is glibc's ceiling for the mmap threshold on 64-bit; trimming is off entirely.
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Resets VmHWM (peak RSS) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def peak_extra_memory_args(script: str, case: str, extra_args: list[str]) -> int:
    """Peak memory, in bytes, that `case` of a benchmark script needs above its inputs.

    Each case runs in a fresh process (so earlier cases cannot raise the high-water mark); the
    script, called with `--memory-case NAME`, prints that process's peak RSS minus its RSS just
    before the measured call.
    """
    result = subprocess.run(
        [sys.executable, script, "--memory-case", case, *extra_args], capture_output=True, text=True, check=True
    )
    return int(result.stdout.strip().splitlines()[-1])


def measure_peak_in_process(fn: Callable[[], object], device: str = "cpu") -> int:
    """Peak bytes allocated by one call of fn beyond what was live before it."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    reset_peak_rss()
    before = rss_bytes()
    fn()
    return max(0, peak_rss_bytes() - before)


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
