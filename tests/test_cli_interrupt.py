"""Ctrl-C during `nflux train`: a real SIGINT to the process finishes the step, writes a
checkpoint atomically, exits 130 with one message and no traceback; --resume then ends
exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
STEPS = 400
ARGS = ["-m", "nflux", "train", "maf", "--data", "iris", "--steps", str(STEPS), "--layers", "2", "--hidden", "16",
        "16", "--batch", "64", "--val-every", "50", "--checkpoint-every", "1000", "--log-every", "1", "--quiet"]


def logged_steps(out) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return len(lines)


def test_sigint_checkpoints_and_resume_is_exact(tmp_path):
    part, full = tmp_path / "part", tmp_path / "full"
    proc = subprocess.Popen([sys.executable, *ARGS, "--out", str(part)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while logged_steps(part) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "training ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted by SIGINT after step" in lines[0] and "--resume" in lines[0], stderr
    step = int(lines[0].split("after step ")[1].split()[0])
    assert 3 <= step < STEPS
    # The checkpoint of that step is the newest, and complete (no temporary files left).
    assert (part / "checkpoints" / "latest").read_text().strip() == f"step-{step:08d}"
    assert not [p for p in (part / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not (part / "metrics.json").exists()

    subprocess.run([sys.executable, *ARGS, "--out", str(part), "--resume"], env=ENV, check=True, timeout=600)
    subprocess.run([sys.executable, *ARGS, "--out", str(full)], env=ENV, check=True, timeout=600)
    name = f"checkpoints/step-{STEPS:08d}.safetensors"
    a, b = load_file(full / name), load_file(part / name)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    m_full = json.loads((full / "metrics.json").read_text())
    m_part = json.loads((part / "metrics.json").read_text())
    assert abs(m_full["test_nll_nats"] - m_part["test_nll_nats"]) < 1e-6


def test_sigint_to_torchrun_stops_every_rank_at_one_checkpointed_step(tmp_path):
    """Ctrl-C on torchrun reaches both workers; they stop after the same step (the stop flag
    is all-reduced) and rank 0 checkpoints it; --resume under torchrun then finishes."""
    out = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.Popen([*torchrun, *ARGS, "--out", str(out)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while logged_steps(out) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "training ended before it could be interrupted"
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    said = [line for line in stderr.splitlines() if line.startswith("nflux: interrupted by SIGINT after step")]
    assert len(said) == 1, stderr  # rank 0 speaks
    step = int(said[0].split("after step ")[1].split()[0])
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{step:08d}"
    subprocess.run([*torchrun, *ARGS, "--steps", str(step + 5), "--out", str(out), "--resume"],  # last wins
                   env=ENV, check=True, timeout=600, capture_output=True)
    assert json.loads((out / "metrics.json").read_text())["steps"] == step + 5
