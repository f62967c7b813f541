"""`nflux train` under torchrun: 2 CPU processes (gloo, localhost, a free port) end where one
process with the same global batch ends, also through --resume, a skipped non-finite step
and torch.compile; plus the sharding that makes it so.

Tolerances: the processes sum their half-batch gradients where one process sums the whole
batch, so results differ by rounding, which Adam's normalised steps amplify to ~1e-4 on a
few parameters over 30 steps (and to a few 1e-4 on the losses: which GEMM blocking a
half batch gets changes the summation order). A run that drew different batches per rank, initialised
ActNorm on a shard, or skipped a step on one rank only would differ by far more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import nflux.data
from nflux.training.distributed import Distributed
from nflux.training.task import ImageTask, VectorTask

ROOT = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TINY = ["--layers", "2", "--hidden", "16", "16", "--batch", "64", "--val-every", "10",
        "--checkpoint-every", "10", "--log-every", "10", "--quiet"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def run(cmd, env=ENV):
    proc = subprocess.run([*map(str, cmd)], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


# Adam's first update of a component whose exact gradient is 0 is lr times the sign of its
# rounding noise, which differs between one process and two: right after ActNorm's init centres
# the first batch, the shift biases' gradients are such components, so they may end up to
# 2 lr = 2e-3 apart (float64 standardisation moved one from 0.4e-3 to 1.06e-3 apart).
def assert_same_model(a_dir: Path, b_dir: Path, name: str, atol: float = 3e-3):
    a, b = load_file(a_dir / name), load_file(b_dir / name)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=atol, msg=f"{name}:{k}")


def metrics(d: Path) -> dict:
    return json.loads((d / "metrics.json").read_text())


def test_shards_partition_the_global_batch():
    """The ranks' parts of one draw are disjoint and together the single-process batch."""
    assert [Distributed(rank=r, world_size=3).shard(10) for r in range(3)] == [slice(0, 3), slice(3, 6),
                                                                              slice(6, 10)]
    moons, digits = nflux.data.load("moons"), nflux.data.load("digits")
    for task in (VectorTask(moons, torch.device("cpu")), ImageTask(digits, torch.device("cpu"), seed=0)):
        whole = task.draw(12, torch.Generator().manual_seed(3))
        parts = [task.draw(12, torch.Generator().manual_seed(3), Distributed(rank=r, world_size=4).shard(12))
                 for r in range(4)]
        assert torch.equal(torch.cat(parts), whole)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    run([sys.executable, "-m", "nflux", "train", "maf", "--data", "iris", "--steps", 30, *TINY, "--out", out])
    return out


def test_torchrun_with_resume_matches_single_process(single, tmp_path):
    """2 processes, stopped after step 13 and resumed (both under torchrun), end with the
    parameters, ActNorm buffers, validation curve and test NLL of the single-process run."""
    out = tmp_path / "ddp"
    common = ["-m", "nflux", "train", "maf", "--data", "iris", "--steps", 30, *TINY, "--out", out]
    run([*TORCHRUN, *common, "--stop-after", 13])
    assert not (out / "metrics.json").exists()
    run([*TORCHRUN, *common, "--resume"])
    assert_same_model(single, out, "checkpoints/step-00000030.safetensors")
    assert_same_model(single, out, "best.safetensors")
    m_single, m_ddp = metrics(single), metrics(out)
    assert m_ddp["processes"] == 2 and m_single["processes"] == 1
    assert m_ddp["test_nll_nats"] == pytest.approx(m_single["test_nll_nats"], abs=1e-3)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    # Rank 0 writes, once per step (13: the line of the stopped session).
    assert [r["step"] for r in rows] == [10, 13, 20, 30] and [r["step"] for r in ref] == [10, 20, 30]
    for r, s in zip([r for r in rows if r["step"] != 13], ref):
        assert r["val_loss"] == pytest.approx(s["val_loss"], abs=1e-3)
        assert r["train_loss"] == pytest.approx(s["train_loss"], abs=1e-3)  # global batch mean
    assert json.loads((out / "config.json").read_text())["batch"] == 64  # the global batch


def test_torchrun_skips_a_nonfinite_step_on_every_rank_compiled(tmp_path):
    """A NaN in rank 1's shard at step 5 skips step 5 on both ranks (the model stays in sync
    and matches one process that skipped the same step), with the loss under torch.compile."""
    args = ["train", "maf", "--data", "iris", "--steps", 12, *TINY]
    env = {**ENV, "NFLUX_TEST_NAN_STEP": "5", "NFLUX_TEST_NAN_RANK": "0"}
    worker = ROOT / "_nflux_nan_worker.py"
    run([sys.executable, worker, *args, "--out", tmp_path / "single"], env=env)
    run([*TORCHRUN, worker, *args, "--out", tmp_path / "ddp", "--compile", "aot_eager"],
        env={**env, "NFLUX_TEST_NAN_RANK": "1"})
    for d in ("single", "ddp"):
        assert metrics(tmp_path / d)["skipped_nonfinite_steps"] == 1
    assert_same_model(tmp_path / "single", tmp_path / "ddp", "checkpoints/step-00000012.safetensors")
    # Without the skip (no NaN) the run ends elsewhere: the comparison above can fail.
    run([sys.executable, "-m", "nflux", *args, "--out", tmp_path / "clean"])
    clean = load_file(tmp_path / "clean" / "checkpoints/step-00000012.safetensors")
    ddp = load_file(tmp_path / "ddp" / "checkpoints/step-00000012.safetensors")
    assert max((clean[k].double() - ddp[k].double()).abs().max().item() for k in clean if k.startswith("model/")) > 1e-3


def test_global_batch_must_split_evenly(tmp_path):
    proc = subprocess.run([*TORCHRUN, "-m", "nflux", "train", "maf", "--data", "iris", "--steps", "2",
                           "--batch", "63", "--quiet", "--out", str(tmp_path / "odd")],
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "nflux: error: batch 63 is the global batch and must be divisible by the 2 processes" in proc.stderr
