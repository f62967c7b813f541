"""`nflux train glow|realnvp --data digits`: the multi-scale image flows in the command, with
dequantisation, bits/dim, an image grid, temperature sampling, eval and exact resume.

Models are tiny (one or two steps per scale, 16 conv channels) and runs a dozen steps.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import nflux.data
from nflux.cli import main
from nflux.training.runs import load_run

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TINY = ["--data", "digits", "--scales", "2", "--layers", "1", "--hidden", "16", "--batch", "32",
        "--val-every", "6", "--checkpoint-every", "6", "--log-every", "6", "--quiet"]


def nflux_cmd(*args):
    proc = subprocess.run([sys.executable, "-m", "nflux", *map(str, args)], env=ENV, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"nflux {args} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module", params=["glow", "realnvp"])
def run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("img") / request.param
    nflux_cmd("train", request.param, *TINY, "--steps", 12, "--out", out)
    return out


def test_image_run_reports_bits_per_dim(run):
    m = json.loads((run / "metrics.json").read_text())
    D = 64
    assert m["test_bits_per_dim"] == pytest.approx(m["test_nll_nats"] / (D * math.log(2)), rel=1e-12)
    # Units: the flow's own bits/dim (its Dequantize draws other noise) agrees on average.
    model, record = load_run(run)
    assert record["model_kwargs"]["image"] and record["levels"] == 17
    test = nflux.data.load("digits").test
    torch.manual_seed(0)
    with torch.no_grad():
        own = torch.stack([model.bits_per_dim(test).mean() for _ in range(8)]).mean().item()
    assert own == pytest.approx(m["test_bits_per_dim"], abs=0.05)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [6, 12] and all(math.isfinite(r["val_loss"]) for r in rows)
    for r in rows:
        assert r["val_bits_per_dim"] == pytest.approx(r["val_loss"] / (D * math.log(2)), rel=1e-12)
    for name in ("samples.png", "loss.png", "best.safetensors", "config.json"):
        assert (run / name).stat().st_size > 0


def test_eval_reproduces_image_metrics(run, capsys):
    assert main(["eval", str(run)]) == 0
    assert "bits/dim" in capsys.readouterr().out
    result = json.loads((run / "eval.json").read_text())
    stored = json.loads((run / "metrics.json").read_text())
    assert result["test_nll_nats"] == pytest.approx(stored["test_nll_nats"], abs=1e-9)
    assert result["test_bits_per_dim"] == pytest.approx(stored["test_bits_per_dim"], abs=1e-9)


def test_sample_images_with_temperature(run, tmp_path, capsys):
    spread = {}
    for t in ("1.0", "0.1"):
        path = tmp_path / f"s{t}.npy"
        assert main(["sample", str(run), "-n", "64", "--temperature", t, "--out", str(path)]) == 0
        x = np.load(path)
        assert x.shape == (64, 1, 8, 8) and x.dtype == np.uint8  # integer levels, not float64
        assert np.array_equal(x, np.round(x)) and x.min() >= 0 and x.max() <= 16  # integer levels
        spread[t] = x.std(axis=0).mean()
    assert spread["0.1"] < 0.5 * spread["1.0"]  # a colder base sample concentrates the images
    assert main(["sample", str(run), "-n", "16", "--temperature", "0.7", "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["sample", str(run), "-n", "100", "--out", str(tmp_path / "g.png")]) == 0
    assert "wrote a grid of the first 64 of 100 samples" in capsys.readouterr().out  # not "wrote 100"


def test_image_resume_equals_uninterrupted(tmp_path):
    """The dequantisation noise comes from the checkpointed data generator: exact resume."""
    common = ["glow", *TINY, "--steps", 12]
    nflux_cmd("train", *common, "--out", tmp_path / "full")
    nflux_cmd("train", *common, "--out", tmp_path / "part", "--stop-after", 5)
    nflux_cmd("train", *common, "--out", tmp_path / "part", "--resume")
    a = load_file(tmp_path / "full" / "checkpoints/step-00000012.safetensors")
    b = load_file(tmp_path / "part" / "checkpoints/step-00000012.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("argv, needle", [
    (["train", "maf", "--data", "digits"], "image model"),
    (["train", "glow", "--data", "moons", "--scales", "2"], "image data only"),
    (["train", "nsf", "--data", "moons", "--scales", "2"], "scales applies to image models"),
    (["train", "glow", "--data", "digits", "--scales", "4"], "divisible"),
    (["train", "glow", "--data", "digits", "--hidden", "8", "8"], "one --hidden"),
])
def test_image_config_errors_exit_2(argv, needle, tmp_path, capsys):
    code = main(argv + ["--out", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("nflux: error: ") and needle in err, err


def test_two_channel_images_train_and_plot(tmp_path):
    # Two channels are plotted side by side (the grid used to crash after training, leaving
    # no samples.png or loss.png).
    x = np.random.default_rng(0).integers(0, 256, size=(40, 2, 8, 8), dtype=np.uint8)
    np.save(tmp_path / "two.npy", x)
    out = tmp_path / "run"
    assert main(["train", "glow", "--data", str(tmp_path / "two.npy"), "--scales", "1", "--layers", "1", "--hidden",
                 "8", "--batch", "8", "--steps", "4", "--val-every", "2", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["dataset"]["shape"] == [2, 8, 8]
    for name in ("metrics.json", "samples.png", "loss.png"):
        assert (out / name).stat().st_size > 0, name
    assert main(["sample", str(out), "-n", "8", "--out", str(tmp_path / "s.png")]) == 0


def test_float_image_npy_says_to_save_integers(tmp_path, capsys):
    np.save(tmp_path / "f.npy", np.random.default_rng(0).random((20, 1, 4, 4)))
    code = main(["train", "glow", "--data", str(tmp_path / "f.npy"), "--out", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "save the images as integers, uint8 (0..255)" in err, err
