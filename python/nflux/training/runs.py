"""Using a finished run directory: load its model, evaluate it, sample from it."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file as st_load_file

import nflux
from nflux.data import Standardizer
from nflux.training.checkpoint import CheckpointError, _check_model, load_latest, restore
from nflux.training.config import ConfigError, build_model, check_device
from nflux.training.task import make_task, nll_sum, quantize, unstandardize
from nflux.training.trainer import load_data_for, sample_model

__all__ = ["evaluate", "load_run", "sample_run"]


def load_run(run_dir: str | os.PathLike, device: str = "cpu") -> tuple[nflux.Flow, dict[str, Any]]:
    """(model, config record) of a run directory, with the best weights (`best.safetensors`),
    or the newest checkpoint's when there is no best file. `device` is checked as `train`
    checks it (cpu, or cuda[:N] when torch sees such a device)."""
    device = check_device(device)
    d = Path(run_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"run directory {d} " + ("is a file, not a directory" if d.exists() else "does not exist"))
    cfg_path = d / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found: not an nflux run directory")
    try:
        record = json.loads(cfg_path.read_text())
        name, kwargs, shape = record["model"], dict(record["model_kwargs"]), record["dataset"]["shape"]
        _output_units(record)  # checks the standardiser / levels
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{cfg_path} is not a valid run config ({e})") from None
    model = build_model(name, shape, **kwargs).to(device)
    best = d / "best.safetensors"
    if best.exists():
        try:
            weights = st_load_file(str(best), device=str(device))
        except Exception as e:  # noqa: BLE001 -- any parse failure is a corrupt file
            raise CheckpointError(f"{best} is corrupt ({e})") from None
        _check_model(weights, model)
        model.load_state_dict(weights)
        source = best
    else:
        ckpt = load_latest(d / "checkpoints")
        if ckpt is None:
            raise FileNotFoundError(f"no best.safetensors and no checkpoint in {d}")
        restore(ckpt, model, rng=False)
        source = ckpt.path
    model.eval()
    record["_weights"] = str(source)
    return model, record


def _output_units(record: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Model-space samples -> data units: un-standardised vectors, or integer image levels (the
    task's `to_data`, from a run's record)."""
    if record["dataset"]["kind"] == "image":
        levels = int(record["levels"])
        return lambda x: quantize(x, levels)
    std = Standardizer.from_json(record["standardizer"])
    return lambda x: unstandardize(x, std)


def evaluate(run_dir: str | os.PathLike, data: str | None = None, device: str = "cpu",
             data_root: str | os.PathLike | None = None) -> dict[str, Any]:
    """Test NLL (nats, data units) of a run's best weights on its data set (or `data`), and
    bits/dim for images (dequantisation noise fixed by the run's seed, as in training).
    `data_root`: where the UCI files are (default: the run's own)."""
    model, record = load_run(run_dir, device)
    name = data if data is not None else record["data"]
    root = data_root if data_root is not None else record.get("data_root")
    splits = load_data_for({"data": name, "data_root": root, "seed": record["seed"]})
    if list(splits.shape) != list(record["dataset"]["shape"]):
        raise ConfigError(f"dataset {name!r} has examples of shape {list(splits.shape)}, "
                          f"the model was trained on {record['dataset']['shape']}")
    task = make_task(splits, torch.device(device), record["seed"], record)
    nll = nll_sum(model, task.test, int(record.get("eval_batch", 4096))) / len(task.test) + task.nll_offset
    result = {"data": str(name), "test_nll_nats": nll, "weights": record["_weights"], "n_test": len(task.test)}
    bpd = task.bits_per_dim(nll)
    if bpd is not None:
        result["test_bits_per_dim"] = bpd
    return result


def sample_run(run_dir: str | os.PathLike, n: int, *, temperature: float = 1.0, seed: int = 0,
               device: str = "cpu") -> tuple[torch.Tensor, dict[str, Any]]:
    """n samples (float64, data units: [n, D] vectors, or [n, C, H, W] images of integer
    levels) from a run's best weights, and its config record. The base sample's std is
    scaled by `temperature`."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    model, record = load_run(run_dir, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    return _output_units(record)(sample_model(model, n, gen, temperature)), record
