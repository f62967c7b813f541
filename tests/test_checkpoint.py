"""nflux.training checkpoints: exact resume (model, optimizer, RNGs), fallback past corrupt or
partial pairs, retention, processes killed inside a save, clear mismatch errors, the RNG
helpers and the non-finite guard."""

from __future__ import annotations

import json
import os
import random
import runpy
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nflux.training import (
    CheckpointError,
    NonFiniteGuard,
    NonFiniteLossError,
    capture_rng_state,
    load_latest,
    restore,
    restore_rng_state,
    save_checkpoint,
)
from nflux.training import checkpoint as ck


def _seed_all(s):
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def _train(model, opt, steps, g):
    """Steps that draw from every RNG the checkpoint must restore."""
    for _ in range(steps):
        x = torch.randn(8, 3)
        idx = torch.randperm(8, generator=g)
        target = float(np.random.randn()) * 0.1 + random.random() * 0.1
        loss = ((model(x[idx]) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _setup(seed=0):
    _seed_all(seed)
    model = torch.nn.Linear(3, 2)
    return model, torch.optim.Adam(model.parameters(), lr=0.05), torch.Generator().manual_seed(7)


def test_resume_is_bitwise_identical(tmp_path):
    model, opt, g = _setup()
    _train(model, opt, 10, g)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    ref_opt = opt.state_dict()

    model, opt, g = _setup()
    _train(model, opt, 5, g)
    save_checkpoint(tmp_path, 5, model.state_dict(), opt.state_dict(), capture_rng_state({"data": g}), {"lr": 0.05})
    _seed_all(999)  # scramble everything the checkpoint should put back
    model2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.05)
    g2 = torch.Generator()
    c = load_latest(tmp_path)
    assert c.step == 5 and c.meta == {"lr": 0.05} and c.skipped == []
    restore(c, model2, opt2, generators={"data": g2})
    _train(model2, opt2, 5, g2)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, ref[k]), k
    st = opt2.state_dict()
    for pid, s in ref_opt["state"].items():
        for name, t in s.items():
            assert torch.equal(st["state"][pid][name], t), (pid, name)
    assert st["param_groups"] == ref_opt["param_groups"]


def test_restored_optimizer_state_takes_the_parameters_layout(tmp_path):
    # A channels-last conv weight: the weights file holds Adam's moments contiguous, restore puts
    # them back in the parameter's strides, and a fused Adam (which walks parameter and state as
    # flat memory) then continues exactly like the uninterrupted run.
    def setup():
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
        return conv, torch.optim.Adam(conv.parameters(), lr=0.05, fused=True)

    def train(conv, opt, steps, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            x = torch.randn(2, 3, 5, 5, generator=g).to(memory_format=torch.channels_last)
            opt.zero_grad()
            conv(x).square().mean().backward()
            opt.step()

    conv, opt = setup()
    train(conv, opt, 3, 1)
    train(conv, opt, 3, 2)
    conv2, opt2 = setup()
    train(conv2, opt2, 3, 1)
    save_checkpoint(tmp_path, 3, conv2, opt2)
    conv3, opt3 = setup()
    restore(load_latest(tmp_path), conv3, opt3, rng=False)
    assert opt3.state[conv3.weight]["exp_avg"].stride() == conv3.weight.stride()
    train(conv3, opt3, 3, 2)
    for a, b in zip(conv.parameters(), conv3.parameters()):
        assert torch.equal(a, b)


def test_optimizer_json_keeps_types(tmp_path):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.5}], lr=0.1, momentum=0.9)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, 1, model, opt, None, None)
    c = load_latest(tmp_path)
    assert c.optimizer_state["param_groups"] == opt.state_dict()["param_groups"]
    assert set(c.optimizer_state["state"]) == {0, 1}
    momentum = opt.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(c.optimizer_state["state"][0]["momentum_buffer"], momentum)
    record = json.loads((tmp_path / "step-00000001.json").read_text())
    assert record["weights"]["file"] == "step-00000001.safetensors" and len(record["weights"]["sha256"]) == 64
    keys = set(load_file(tmp_path / "step-00000001.safetensors"))
    assert {"model/weight", "model/bias", "optim/state/0/momentum_buffer"} <= keys
    restore(c, model, opt, rng=False)


def _save_steps(d, steps, keep=3):
    model, opt, g = _setup()
    for s in steps:
        _train(model, opt, 1, g)
        save_checkpoint(d, s, model, opt, capture_rng_state(), {"s": s}, keep=keep)
    return model


def test_fallback_past_corrupt_pairs(tmp_path):
    assert load_latest(tmp_path / "absent") is None
    assert load_latest(tmp_path) is None
    _save_steps(tmp_path, [1, 2, 3])
    w3, j3 = tmp_path / "step-00000003.safetensors", tmp_path / "step-00000003.json"

    data = w3.read_bytes()
    w3.write_bytes(data[: len(data) // 2])  # truncated weights
    c = load_latest(tmp_path)
    assert c.step == 2 and c.skipped[0][0] == "step-00000003.json" and "bytes" in c.skipped[0][1]

    w3.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    c = load_latest(tmp_path)
    assert c.step == 2 and "sha256" in c.skipped[0][1]

    w3.unlink()
    assert "missing" in load_latest(tmp_path).skipped[0][1]

    j3.write_text('{"format": "nflux-checkpoint", "vers')  # half-written JSON
    assert load_latest(tmp_path).step == 2
    j3.unlink()
    c = load_latest(tmp_path)
    assert c.step == 2 and c.skipped == []

    for s in (1, 2):
        (tmp_path / f"step-{s:08d}.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="no loadable checkpoint.*step-00000002.json"):
        load_latest(tmp_path)


def test_retention_stale_and_temp_files(tmp_path):
    (tmp_path / ".step-00000009.safetensors.tmp123").write_bytes(b"left by a killed save")
    _save_steps(tmp_path, range(1, 7), keep=2)
    names = sorted(os.listdir(tmp_path))
    assert names == ["latest", "step-00000005.json", "step-00000005.safetensors",
                     "step-00000006.json", "step-00000006.safetensors"]
    assert (tmp_path / "latest").read_text().strip() == "step-00000006"
    # Resuming from 5 and saving 5 again abandons 6.
    _save_steps(tmp_path, [5], keep=2)
    assert load_latest(tmp_path).step == 5
    assert not (tmp_path / "step-00000006.json").exists()


def test_mismatch_raises_checkpoint_error_naming_key(tmp_path):
    _save_steps(tmp_path, [1])
    c = load_latest(tmp_path)
    wide = torch.nn.Linear(3, 4)
    with pytest.raises(CheckpointError, match=r"'weight' has shape \(2, 3\) in the checkpoint but \(4, 3\)") as e:
        restore(c, wide, torch.optim.Adam(wide.parameters()))
    assert isinstance(e.value, ValueError)
    seq = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with pytest.raises(CheckpointError, match=r"missing keys \['0.weight', '0.bias'\].*unexpected keys"):
        restore(c, seq)
    lin = torch.nn.Linear(3, 2)
    two_groups = torch.optim.Adam([{"params": [lin.weight]}, {"params": [lin.bias]}])
    with pytest.raises(CheckpointError, match=r"has 1 parameter group\(s\), this optimizer has 2"):
        restore(c, lin, two_groups)
    before = lin.weight.detach().clone()
    with pytest.raises(CheckpointError, match="generator"):
        restore(c, lin, torch.optim.Adam(lin.parameters()), generators={"data": torch.Generator()})
    assert torch.equal(lin.weight, before)  # nothing changed on a failed restore


def test_mismatch_against_a_different_model_is_short(tmp_path):
    big = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(60)])
    save_checkpoint(tmp_path, 1, big, None, capture_rng_state())
    other = torch.nn.Module()
    other.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(60))
    # Three names of each kind, not all 240 (about 5,000 characters).
    with pytest.raises(CheckpointError, match=r"different model.*: 120 missing keys \['layers.0.weight', "
                                              r"'layers.0.bias', 'layers.1.weight'\] \.\.\.; 120 unexpected keys") as e:
        restore(load_latest(tmp_path), other, rng=False)
    assert len(str(e.value)) < 300


def test_bad_arguments():
    with pytest.raises(ValueError, match="step"):
        save_checkpoint("unused", -1, {})
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint("unused", 1, {}, keep=0)


def test_meta_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, meta={"bad": object()})
    assert load_latest(tmp_path) is None


def test_shared_and_view_tensors_are_saved(tmp_path):
    base = torch.arange(6.0)
    save_checkpoint(tmp_path, 0, {"a": base, "tied": base, "view": base[2:4], "t": base.view(2, 3).t()})
    c = load_latest(tmp_path)
    assert torch.equal(c.model_state["tied"], base) and torch.equal(c.model_state["view"], base[2:4])
    assert torch.equal(c.model_state["t"], base.view(2, 3).t())


# --- processes killed inside a save ------------------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import os, random, signal, sys
    import numpy as np, torch
    from safetensors.torch import save_file
    from nflux.training import capture_rng_state, load_latest, restore, save_checkpoint
    from nflux.training import checkpoint as ck

    d, out, total, point, kill_step, how = sys.argv[1:7]
    total, kill_step = int(total), int(kill_step)
    saving = {"step": None}

    def fault(name):
        if name == point and saving["step"] == kill_step:
            if how == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(75)

    ck._fault_point = fault
    torch.set_num_threads(1)
    torch.manual_seed(0); np.random.seed(0); random.seed(0)
    g = torch.Generator().manual_seed(7)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    start = 0
    c = load_latest(d)
    if c is not None:
        restore(c, model, opt, generators={"data": g})
        start = c.step
    for step in range(start + 1, total + 1):
        x = torch.randn(8, 3)
        idx = torch.randperm(8, generator=g)
        target = float(np.random.randn()) * 0.1 + random.random() * 0.1
        loss = ((model(x[idx]) - target) ** 2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        if step % 2 == 0:
            saving["step"] = step
            save_checkpoint(d, step, model.state_dict(), opt.state_dict(),
                            capture_rng_state({"data": g}), {"step": step}, keep=2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out)
    """
)

TOTAL = 20
# Real kills (subprocess): (fault point, how to die, saves into the run, whether the pair
# being written survives). The in-process test below covers every fault point.
KILLS = [
    ("weights:partial", "sigkill", 1, False),
    ("json:partial", "sigkill", 1, False),
    ("after_json", "exit", 1, True),
    ("prune:json", "sigkill", 3, True),  # third save of the run is the first that prunes
]
# Every fault point of a save, in order; the pair survives from "after_json" on.
POINTS = ["weights:partial", "weights:before_replace", "between", "json:partial", "json:before_replace",
          "after_json", "latest:partial", "latest:before_replace", "prune:json", "prune:safetensors"]


class _Killed(BaseException):
    """Stands in for death at a fault point: nothing after it in the save runs."""


@pytest.mark.parametrize("point", POINTS)
def test_save_interrupted_at_each_point_leaves_a_loadable_checkpoint(tmp_path, monkeypatch, point):
    model = _save_steps(tmp_path, [2, 4], keep=2)

    def die(name):
        if name == point:
            raise _Killed(name)

    monkeypatch.setattr(ck, "_fault_point", die)
    with pytest.raises(_Killed):
        save_checkpoint(tmp_path, 6, model, None, capture_rng_state(), {"s": 6}, keep=2)
    monkeypatch.undo()
    c = load_latest(tmp_path)
    assert c.step == (6 if POINTS.index(point) >= POINTS.index("after_json") else 4)
    assert c.skipped == []
    restore(c, torch.nn.Linear(3, 2), rng=True)
    save_checkpoint(tmp_path, 6, model, None, capture_rng_state(), {"s": 6}, keep=2)  # the retry cleans up
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-00000004.json", "step-00000004.safetensors",
                                            "step-00000006.json", "step-00000006.safetensors"]


def _run(script, d, out, point="-", kill_step=-1, how="exit"):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [sys.executable, str(script), str(d), str(out), str(TOTAL), point, str(kill_step), how]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_killed_saves_resume_to_identical_parameters(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    ref_out, out = tmp_path / "ref.safetensors", tmp_path / "out.safetensors"
    threads, argv, fault = torch.get_num_threads(), sys.argv, ck._fault_point
    try:  # the uninterrupted reference, in this process
        sys.argv = [str(script), str(tmp_path / "ref"), str(ref_out), str(TOTAL), "-", "-1", "exit"]
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv, ck._fault_point = argv, fault
        torch.set_num_threads(threads)

    d = tmp_path / "ckpt"
    for point, how, nth_save, survives in KILLS:
        before = load_latest(d)
        resume = before.step if before else 0
        kill_step = resume + 2 * nth_save
        r = _run(script, d, out, point, kill_step, how)
        assert r.returncode == (-signal.SIGKILL if how == "sigkill" else 75), (point, r.stderr)
        after = load_latest(d)
        assert (after.step if after else 0) == (kill_step if survives else kill_step - 2), point
    r = _run(script, d, out)
    assert r.returncode == 0, r.stderr
    got, want = load_file(out), load_file(ref_out)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


# --- RNG helpers and the non-finite guard ------------------------------------------------


def test_rng_capture_restore():
    g = torch.Generator().manual_seed(3)
    state = json.loads(json.dumps(capture_rng_state({"g": g})))  # survives JSON
    first = (torch.rand(4), np.random.rand(3), random.random(), torch.rand(2, generator=g))
    restore_rng_state(state, {"g": g})
    again = (torch.rand(4), np.random.rand(3), random.random(), torch.rand(2, generator=g))
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2] == again[2] and torch.equal(first[3], again[3])
    with pytest.raises(ValueError, match="malformed"):
        restore_rng_state({"format": 1, "torch": "!!"})
    with pytest.raises(ValueError, match="no entry for generator"):
        restore_rng_state(state, {"other": torch.Generator()})


@pytest.mark.cuda
def test_rng_and_checkpoint_cuda(tmp_path):
    torch.rand(1, device="cuda")  # initialise CUDA so its generators are captured
    state = capture_rng_state()
    assert len(state["cuda"]) == torch.cuda.device_count()
    a = torch.rand(4, device="cuda")
    restore_rng_state(state)
    assert torch.equal(torch.rand(4, device="cuda"), a)
    model = torch.nn.Linear(3, 2).cuda()
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(5, 3, device="cuda")).sum().backward()
    opt.step()
    save_checkpoint(tmp_path, 1, model, opt, capture_rng_state(), {})
    other = torch.nn.Linear(3, 2).cuda()
    other_opt = torch.optim.Adam(other.parameters())
    restore(load_latest(tmp_path), other, other_opt)
    assert torch.equal(other.weight, model.weight)
    assert other_opt.state_dict()["state"][0]["exp_avg"].device.type == "cuda"


def test_nonfinite_guard():
    guard = NonFiniteGuard(max_consecutive=3)
    nan, inf, ok = torch.tensor(float("nan")), torch.tensor(float("inf")), torch.tensor(1.0)
    assert guard.check(ok)
    assert not guard.check(nan) and not guard.check(ok, inf)  # a non-finite grad norm also skips
    assert guard.consecutive == 2 and guard.skipped == 2
    assert guard.check(ok) and guard.consecutive == 0
    restored = NonFiniteGuard(3)
    guard.check(nan)
    guard.check(nan)
    restored.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    stop = r"at step 12: the loss was NaN or infinite for 3 steps in a row \(5 skipped"
    with pytest.raises(NonFiniteLossError, match=stop):
        restored.check(nan, step=12)
    with pytest.raises(ValueError):
        NonFiniteGuard(0)
