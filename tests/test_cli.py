"""The `nflux` command line: train / eval / sample / datasets / info, resume, user errors.

Runs are tiny (a few dozen steps, small nets) and single-threaded so that a resumed run can
be compared bitwise with an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nflux.cli import main

TINY = ["--layers", "2", "--hidden", "16", "16", "--batch", "64", "--val-every", "10",
        "--checkpoint-every", "10", "--log-every", "10", "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def nflux(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "nflux", *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"nflux {args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "nsf-moons"
    nflux("train", "nsf", "--data", "moons", "--steps", 30, "--out", out, *TINY)
    return out


def test_train_writes_all_files(run):
    for name in ("config.json", "metrics.jsonl", "metrics.json", "best.safetensors", "samples.png", "loss.png"):
        assert (run / name).is_file(), name
    assert list((run / "checkpoints").glob("step-*.json"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert math.isfinite(metrics["test_nll_nats"]) and metrics["steps"] == 30
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) and r["steps_per_s"] > 0 for r in rows)
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "nsf" and len(config["standardizer"]["mean"]) == 2
    # best.safetensors is written like the other run files (it used to be 0600).
    assert (run / "best.safetensors").stat().st_mode & 0o777 == (run / "config.json").stat().st_mode & 0o777


def test_eval_reproduces_test_nll(run):
    stored = json.loads((run / "metrics.json").read_text())["test_nll_nats"]
    assert main(["eval", str(run)]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["test_nll_nats"] == pytest.approx(stored, abs=1e-6)


def test_bf16_training_reports_float32_metrics(run, tmp_path):
    out = tmp_path / "bf16"
    nflux("train", "nsf", "--data", "moons", "--steps", 30, "--out", out, "--precision", "bf16", *TINY)
    assert json.loads((out / "config.json").read_text())["precision"] == "bf16"
    # The same run as the fixture's but for autocast: the conditioners' bfloat16 rounding
    # changes the trajectory a little, not the quality.
    ours, fp32 = load_file(out / "best.safetensors"), load_file(run / "best.safetensors")
    assert any(not torch.equal(ours[k], fp32[k]) for k in ours)
    stored = json.loads((out / "metrics.json").read_text())["test_nll_nats"]
    assert stored == pytest.approx(json.loads((run / "metrics.json").read_text())["test_nll_nats"], abs=0.1)
    assert main(["eval", str(out)]) == 0  # the reported NLL is a float32 evaluation
    assert json.loads((out / "eval.json").read_text())["test_nll_nats"] == pytest.approx(stored, abs=1e-6)
    from nflux.training.config import ConfigError, make_config

    with pytest.raises(ConfigError, match="precision"):
        make_config({"precision": "16"})  # a --config file's value is checked too


def test_bf16_on_a_cpu_without_bf16_units_says_so(monkeypatch, tmp_path, capsys):
    from nflux.training import trainer

    monkeypatch.setattr(trainer, "cpu_has_bf16", lambda: False)
    trainer.train({"model": "nice", "data": "moons", "steps": 2, "batch": 16, "layers": 1, "hidden": [4],
                   "precision": "bf16", "out": str(tmp_path / "r"), "val_every": 2, "plot_samples": 0})
    assert "no bfloat16 units" in capsys.readouterr().err


def test_sample_npy_and_png(run, tmp_path, capsys):
    assert main(["sample", str(run), "-n", "300", "--out", str(tmp_path / "s.npy")]) == 0
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (300, 2) and x.dtype == np.float64 and np.isfinite(x).all()
    # Data units: moons live roughly in [-1.5, 2.5] x [-1, 1.5], not standardised.
    assert abs(x.mean(0)[0] - 0.5) < 1.0
    capsys.readouterr()
    assert main(["sample", str(run), "-n", "200", "--temperature", "0.5", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0
    assert "wrote a plot of 200 samples" in capsys.readouterr().out
    # An upper-case suffix is the file written (np.save appended .npy to it).
    assert main(["sample", str(run), "-n", "5", "--out", str(tmp_path / "S.NPY")]) == 0
    assert np.load(tmp_path / "S.NPY").shape == (5, 2) and not (tmp_path / "S.NPY.npy").exists()


def test_vector_data_keeps_its_precision_through_standardising(monkeypatch, tmp_path):
    # A column near 2e7 with spread 0.5 kept 3 distinct values once loaded in float32: the test
    # NLL went to -7.3 nats against an entropy of +2.1, and samples sat on a 2-unit grid.
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    np.savetxt("big.csv", np.column_stack([2e7 + rng.normal(0, 0.5, 3000), rng.normal(0, 1, 3000)]),
               delimiter=",", fmt="%.4f")
    from nflux.training.task import make_task
    from nflux.training.trainer import load_data_for

    splits = load_data_for({"data": "big.csv", "seed": 0})
    assert splits.train.dtype == torch.float64 and len(np.unique(splits.train[:, 0].numpy())) > 1000
    task = make_task(splits, torch.device("cpu"), 0)
    assert task.train.dtype == torch.float32 and len(torch.unique(task.train[:, 0])) > 1000
    assert main(["train", "maf", "--data", "big.csv", "--steps", "20", "--out", "r", *TINY]) == 0
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["test_nll_nats"] > 0  # Gaussian-ish columns of std 0.5 and 1: entropy ~2.1 nats
    assert main(["sample", "r", "-n", "500", "--out", "s.npy"]) == 0
    x = np.load("s.npy")
    assert len(np.unique(x[:, 0])) > 400 and abs(x[:, 0].mean() - 2e7) < 10


def test_cpu_device_index_and_resume_with_patience_off(monkeypatch, tmp_path):
    # cpu:0 was accepted, then safetensors refused it after training (a traceback, no metrics).
    from nflux.training import trainer

    out = tmp_path / "r"
    calls = []
    monkeypatch.setattr(trainer, "nll_sum", lambda *a: calls.append(1) or float(len(calls)))  # never improves
    config = {"model": "nice", "data": "moons", "steps": 40, "batch": 32, "layers": 1, "hidden": [8],
              "val_every": 10, "plot_samples": 0, "out": str(out)}
    first = trainer.train({**config, "patience": 1, "device": "cpu:0"}, quiet=True)
    assert first["stopped_early"] and first["steps"] == 20
    assert json.loads((out / "config.json").read_text())["device"] == "cpu"
    monkeypatch.undo()
    # Patience off on resume: it trains on to the steps (it used to stop again at once).
    second = trainer.train({**config, "patience": 0}, resume=True, quiet=True)
    assert not second["stopped_early"] and second["steps"] == 40


def test_eval_on_a_uci_set_with_its_data_root(monkeypatch, tmp_path):
    # eval had no --data-root: a run not trained on a UCI set could never be evaluated on one.
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    np.save("six.npy", rng.normal(size=(300, 6)))
    (tmp_path / "uci" / "power").mkdir(parents=True)
    np.save(tmp_path / "uci" / "power" / "data.npy", rng.normal(size=(400, 8)) * 3 + 1)
    assert main(["train", "maf", "--data", "six.npy", "--steps", "10", "--out", "six", *TINY]) == 0
    assert main(["eval", "six", "--data", "power"]) == 2  # no root: an error naming the folder to give
    assert main(["eval", "six", "--data", "power", "--data-root", "uci"]) == 0
    result = json.loads((tmp_path / "six" / "eval.json").read_text())
    assert result["data"] == "power" and math.isfinite(result["test_nll_nats"])


def test_resume_equals_uninterrupted(tmp_path):
    common = ["maf", "--data", "iris", "--steps", 30, *TINY]
    full, part = tmp_path / "full", tmp_path / "part"
    nflux("train", *common, "--out", full)
    nflux("train", *common, "--out", part, "--stop-after", 13)
    assert not (part / "metrics.json").exists()
    nflux("train", *common, "--out", part, "--resume")
    for name in ("best.safetensors", "checkpoints/step-00000030.safetensors"):
        a, b = load_file(full / name), load_file(part / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=f"{name}:{k}")
    m_full = json.loads((full / "metrics.json").read_text())
    m_part = json.loads((part / "metrics.json").read_text())
    assert m_part["test_nll_nats"] == pytest.approx(m_full["test_nll_nats"], abs=1e-6)
    steps = [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no duplicated log lines after resuming
    assert (part / "samples.png").is_file()  # tabular pair plot


def _one_line_error(code, err):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("nflux: error: "), err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, needle", [
    (["train", "flowy", "--data", "moons"], "unknown model"),
    (["train", "nsf", "--data", "moonz"], "unknown dataset"),
    (["train", "nsf", "--data", "digits"], "image"),
    (["train", "nsf", "--steps", "0"], "positive integer"),
    (["train", "nsf", "--precision", "fp16"], "invalid choice"),
    (["eval", "/nonexistent/run"], "does not exist"),
    (["sample", "/nonexistent/run", "-n", "5"], "does not exist"),
    (["train", "nsf", "--config", "/nonexistent/config.json"], "not found"),
])
def test_user_errors_exit_2(argv, needle, capsys, tmp_path):
    if argv[0] == "train":
        argv = argv + ["--out", str(tmp_path / "r")]
    code = _main(argv)
    err = capsys.readouterr().err
    _one_line_error(code, err)
    assert needle in err, err


def _main(argv):
    try:
        return main(argv)
    except SystemExit as e:  # argparse errors
        return e.code


def test_corrupt_checkpoint_exits_2(run, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    (bad / "best.safetensors").write_bytes(b"not a safetensors file")
    proc = nflux("eval", bad, check=False)
    _one_line_error(proc.returncode, proc.stderr)
    # Checkpoints only, all corrupt.
    (bad / "best.safetensors").unlink()
    for f in (bad / "checkpoints").glob("*.safetensors"):
        f.write_bytes(b"garbage")
    assert main(["eval", str(bad)]) == 2


def test_mismatched_checkpoint_exits_2(run, tmp_path, capsys):
    bad = tmp_path / "mismatch"
    shutil.copytree(run, bad)
    config = json.loads((bad / "config.json").read_text())
    config["model_kwargs"]["hidden"] = [8, 8]
    (bad / "config.json").write_text(json.dumps(config))
    _one_line_error(main(["eval", str(bad)]), capsys.readouterr().err)


def test_datasets_and_info(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "moons" in out and "iris" in out and "folder of PNG/JPEG images" in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "folder of PNG/JPEG images" in " ".join(capsys.readouterr().out.split())  # --data's help
    assert main(["info"]) == 0
    assert "version" in capsys.readouterr().out


def test_resume_extends_a_finished_run(run, tmp_path, capsys):
    """`train --steps k` then `train --steps N --resume` continues to N (the schedule then
    follows the longer cosine, so this is not bitwise an N-step run; --stop-after is)."""
    longer = tmp_path / "longer"
    shutil.copytree(run, longer)
    assert main(["train", "--out", str(longer), "--steps", "40", "--resume", "--quiet"]) == 0
    metrics = json.loads((longer / "metrics.json").read_text())
    assert metrics["steps"] == 40 and math.isfinite(metrics["test_nll_nats"])
    assert json.loads((longer / "config.json").read_text())["model"] == "nsf"  # the run's own config


def test_resume_errors_exit_2(run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    # Another model over the same checkpoints: the checkpoint does not match.
    code = _main(["train", "realnvp", "--out", str(copy), "--resume", "--quiet"])
    err = capsys.readouterr().err
    _one_line_error(code, err)
    # Names both models, in a short line (it used to list ~1300 characters of parameter names).
    assert "does not match" in err and "made by nsf" in err and "builds realnvp" in err and len(err) < 400, err
    # Existing checkpoints without --resume: refuse to overwrite.
    code = _main(["train", "nsf", "--data", "moons", "--out", str(copy), "--quiet"])
    err = capsys.readouterr().err
    _one_line_error(code, err)
    assert "--resume" in err


@pytest.mark.parametrize("channels_last", [False, True])
def test_trainer_adam_matches_the_default_loop(channels_last):
    # The trainer's Adam: fused for plain contiguous parameters, foreach for a channels-last
    # conv weight (torch's fused CPU kernel ignores strides); either way the default Adam's
    # update up to rounding.
    from nflux.training.trainer import make_adam

    def setup():
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(3, 4, 3)
        return conv.to(memory_format=torch.channels_last) if channels_last else conv

    ours, ref = setup(), setup()
    opt = make_adam(ours.parameters(), lr=0.05, weight_decay=1e-3)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=0.05, weight_decay=1e-3)
    assert opt.param_groups[0]["fused"] is (None if channels_last else True)
    assert opt.param_groups[0]["foreach"] is (True if channels_last else None)
    x = torch.randn(2, 3, 5, 5)
    for _ in range(5):
        for model, o in ((ours, opt), (ref, opt_ref)):
            o.zero_grad()
            model(x).square().mean().backward()
            o.step()
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _strict_json(text):
    def refuse(name):
        raise AssertionError(f"bare {name} in JSON")
    return json.loads(text, parse_constant=refuse)


def test_nan_validation_is_never_the_best_and_json_stays_strict(monkeypatch, tmp_path, capsys):
    from nflux.training import trainer

    real, calls = trainer.nll_sum, []

    def nll(model, inputs, batch, nan_calls):
        calls.append(1)
        return float("nan") if len(calls) in nan_calls else real(model, inputs, batch)

    config = {"model": "nice", "data": "moons", "steps": 30, "batch": 32, "layers": 1, "hidden": [8],
              "val_every": 10, "patience": 2, "plot_samples": 0}
    # A NaN first validation: the finite ones after it must become the best (a NaN best
    # used to win every comparison: best_step 10, and patience 2 stopped the run at step 30).
    monkeypatch.setattr(trainer, "nll_sum", lambda *a: nll(*a, nan_calls={1}))
    m = trainer.train({**config, "out": str(tmp_path / "a")}, quiet=True)
    assert m["steps"] == 30 and not m["stopped_early"] and m["best_step"] in (20, 30)
    assert math.isfinite(m["best_val_nll_nats"]) and (tmp_path / "a" / "best.safetensors").is_file()
    rows = [_strict_json(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 10 and rows[0]["val_loss"] is None and all(r["val_loss"] for r in rows[1:])
    # Only NaN: no best, and null (not NaN) in metrics.json; patience counts the NaNs.
    calls.clear()
    monkeypatch.setattr(trainer, "nll_sum", lambda *a: nll(*a, nan_calls=range(1, 100)))
    m = trainer.train({**config, "out": str(tmp_path / "b")})
    assert "no finite validation NLL" in capsys.readouterr().out
    assert m["stopped_early"] and m["steps"] == 20 and not (tmp_path / "b" / "best.safetensors").exists()
    stored = _strict_json((tmp_path / "b" / "metrics.json").read_text())
    assert stored["test_nll_nats"] is None and stored["best_val_nll_nats"] is None
    assert (tmp_path / "b" / "loss.png").is_file()
    monkeypatch.undo()
    assert main(["eval", str(tmp_path / "b")]) == 0  # the last weights; readers take the nulls
    assert math.isfinite(_strict_json((tmp_path / "b" / "eval.json").read_text())["test_nll_nats"])
    assert main(["train", "--out", str(tmp_path / "b"), "--steps", "40", "--patience", "0", "--resume",
                 "--quiet"]) == 0


def test_validation_sees_the_weights_of_each_step(monkeypatch, tmp_path):
    """The vector Glow's LU layers cache W in inference, and nflux trains with fused Adam, which
    updates parameters without bumping their version counters: every validation must still be
    computed with the weights of its step (it used to reuse the step-0 W throughout)."""
    from nflux.training import trainer
    from nflux.transforms.lu_cache import LUCache

    real, gaps = trainer.nll_sum, []

    def nll(model, inputs, batch):
        value = real(model, inputs, batch)
        for module in model.modules():
            for attr in vars(module).values():
                if isinstance(attr, LUCache):
                    attr.clear()
        gaps.append(abs(value - real(model, inputs, batch)))
        return value

    monkeypatch.setattr(trainer, "nll_sum", nll)
    trainer.train({"model": "glow", "data": "moons", "steps": 30, "batch": 32, "layers": 2, "hidden": [8],
                   "val_every": 10, "plot_samples": 0, "out": str(tmp_path / "run")}, quiet=True)
    assert len(gaps) == 4 and max(gaps) == 0  # three validations and the test NLL


def test_resume_without_out_finds_the_run(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    np.save("my data.npy", np.random.default_rng(0).normal(size=(200, 2)))
    args = ["train", "nice", "--data", "my data.npy", "--steps", "20", *TINY]
    assert main([*args, "--stop-after", "10"]) == 0
    assert main([*args, "--resume"]) == 0
    # One run folder (the resume used to start afresh in runs/nice-my data.npy).
    assert os.listdir("runs") == ["nice-my_data.npy"]
    assert json.loads((tmp_path / "runs/nice-my_data.npy/metrics.json").read_text())["steps"] == 20


def test_bad_compile_backend_exits_2_before_writing(tmp_path, capsys):
    (tmp_path / "c.json").write_text('{"compile": "false"}')
    for argv, needle in [(["--compile", "nosuch"], "unknown torch.compile backend 'nosuch'"),
                         (["--config", str(tmp_path / "c.json")], "write false without quotes")]:
        code = _main(["train", "nice", "--out", str(tmp_path / "r"), "--quiet", *argv])
        err = capsys.readouterr().err
        _one_line_error(code, err)
        assert needle in err and "inductor" in err, err
        assert not (tmp_path / "r").exists()


def test_config_values_of_the_wrong_type_are_one_line_errors(tmp_path, capsys):
    # A number for out, a list for data_root, and a run config.json that is not an object gave
    # TypeError / AttributeError tracebacks.
    cases = [('{"out": 5, "steps": 2}', [], "out must be a path"),
             ('{"data_root": ["x"], "data": "power", "steps": 2}', ["--out", str(tmp_path / "p")],
              "data_root must be a path")]
    for i, (text, extra, needle) in enumerate(cases):
        (tmp_path / f"c{i}.json").write_text(text)
        code = _main(["train", "nice", "--config", str(tmp_path / f"c{i}.json"), "--quiet", *extra])
        err = capsys.readouterr().err
        _one_line_error(code, err)
        assert needle in err, err
    run = tmp_path / "run"
    run.mkdir()
    for text, needle in [("[1, 2]", "must hold a JSON object, got list"), ('{"model": "ni', "not valid JSON")]:
        (run / "config.json").write_text(text)
        code = _main(["train", "nice", "--out", str(run), "--resume", "--quiet"])
        err = capsys.readouterr().err
        _one_line_error(code, err)
        assert needle in err and "config.json" in err, err


@pytest.mark.parametrize("command", ["eval", "sample"])
@pytest.mark.parametrize("device, needle", [("foo", "device must be cpu or cuda"), ("cuda:99", "CUDA device")])
def test_eval_and_sample_check_the_device(run, command, device, needle, capsys):
    code = _main([command, str(run), "--device", device])
    err = capsys.readouterr().err
    _one_line_error(code, err)
    assert needle in err, err


def test_path_and_model_errors_say_what_is_wrong(run, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    np.save(tmp_path / "one.npy", np.zeros((20, 1)))
    for argv, needle in [
        (["train", "nice", "--out", str(tmp_path / "file")], "file' is a file, not a directory"),
        (["train", "nice", "--out", str(tmp_path / "file" / "sub")], "file' is a file, not a directory"),
        (["sample", str(run), "--out", str(tmp_path / "file" / "x.npy")], "file' is a file, not a directory"),
        (["train", "nice", "--config", str(tmp_path)], "is a directory"),
        # A model's own ValueError ("nflux: ...") gets one prefix, not "nflux: error: nflux: ".
        (["train", "realnvp", "--data", str(tmp_path / "one.npy"), "--out", str(tmp_path / "r")],
         "nflux: error: coupling models need features >= 2"),
        (["train", "nsf", "--data", str(tmp_path / "one.npy"), "--out", str(tmp_path / "r")],
         "nsf-ar in the CLI"),
    ]:
        code = _main(argv + ["--quiet"] if argv[0] == "train" else argv)
        err = capsys.readouterr().err
        _one_line_error(code, err)
        assert needle in err, (argv, err)
