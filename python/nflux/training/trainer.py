"""The training loop behind `nflux train`: `train(config) -> metrics` for vector data.

    metrics = train({"model": "nsf", "data": "moons", "steps": 2000, "out": "runs/nsf-moons"})

What a run does, in order:

- loads the data (`nflux.data.load`), fits a `Standardizer` on the train split (toy and
  tabular kinds alike) and trains on standardised data; the statistics go into
  `config.json`, so that `sample` returns data units and every reported NLL is in data units
  (the standardiser's constant log|det| is added back);
- builds the model (nice, realnvp, glow, maf, iaf, nsf, nsf-ar) with `torch.manual_seed(seed)`;
- trains with Adam and a cosine learning-rate schedule over `steps` (closed form, so a run
  resumed with a larger `steps` follows the longer schedule from there), batches drawn with
  replacement from a `torch.Generator` seeded by `seed`, gradient clipping, and a
  `NonFiniteGuard` that skips steps whose loss or gradient norm is NaN/inf;
- every `val_every` steps evaluates the validation NLL; the best state is kept in
  `best.safetensors`; after `patience` evaluations without improvement it stops early;
- every `checkpoint_every` steps (and at the end) writes a checkpoint (model, optimizer,
  guard, early-stopping state, every RNG including the data generator) under
  `checkpoints/`; `resume=True` continues from the newest one, so the final parameters are
  those of an uninterrupted run;
- writes `config.json`, `metrics.jsonl` (one line per logged step), `metrics.json` (final
  test NLL in nats, of the best state), `samples.png` and `loss.png` (when matplotlib is
  installed).

Determinism: on CPU with one thread (`OMP_NUM_THREADS=1`) a resumed run reproduces an
uninterrupted one bitwise; with more threads, reductions may differ in the last bits.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save_file as st_save_file

import nflux
from nflux.data import Standardizer
from nflux.data import load as load_data
from nflux.training.checkpoint import CheckpointError, load_latest, restore, save_checkpoint
from nflux.training.nonfinite import NonFiniteGuard
from nflux.training.rng import capture_rng_state

__all__ = ["MODELS", "DEFAULTS", "ConfigError", "build_model", "make_config", "train", "load_run", "evaluate",
           "sample_run", "plot_samples"]


class ConfigError(ValueError):
    """A training configuration that cannot be used (unknown model, bad value, image data...)."""


# name -> (class name in nflux, extra constructor kwargs)
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "nice": ("NICE", {}),
    "realnvp": ("RealNVP", {}),
    "glow": ("Glow", {}),
    "maf": ("MAF", {}),
    "iaf": ("IAF", {}),
    "nsf": ("NSF", {}),
    "nsf-ar": ("NSF", {"autoregressive": True}),
}

DEFAULTS: dict[str, Any] = {
    "model": "nsf",
    "data": "moons",
    "data_root": None,       # directory of the UCI benchmark files
    "steps": 4000,
    "batch": 256,
    "lr": 1e-3,
    "weight_decay": 0.0,
    "grad_clip": 5.0,
    "layers": None,          # None: the model's default
    "hidden": None,          # list of ints; None: the model's default
    "bins": None,            # NSF only
    "seed": 0,
    "device": "cpu",
    "out": None,
    "val_every": 100,
    "checkpoint_every": 250,
    "log_every": 100,
    "patience": 10,          # validations without improvement before stopping; 0: never stop early
    "max_nonfinite": 50,
    "eval_batch": 4096,
    "plot_samples": 2000,
    "stop_after": None,      # stop (checkpointed) after this step, as if interrupted; for tests
}


def _check_int(config: dict, key: str, minimum: int, allow_none: bool = False) -> None:
    v = config[key]
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{key} must be an int >= {minimum}, got {v!r}")


def make_config(overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """DEFAULTS updated with `overrides` (keys checked), validated."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(DEFAULTS) - {"standardizer", "model_kwargs", "dataset", "nflux_version"})
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; known: {sorted(DEFAULTS)}")
    config = {**DEFAULTS, **overrides}
    config["model"] = str(config["model"]).lower()
    if config["model"] not in MODELS:
        raise ConfigError(f"unknown model {config['model']!r}; choose from {', '.join(MODELS)}")
    for key, minimum in (("steps", 1), ("batch", 1), ("seed", 0), ("val_every", 1), ("checkpoint_every", 1),
                         ("log_every", 1), ("patience", 0), ("max_nonfinite", 1), ("eval_batch", 1),
                         ("plot_samples", 0)):
        _check_int(config, key, minimum)
    for key in ("layers", "bins", "stop_after"):
        _check_int(config, key, 1, allow_none=True)
    for key in ("lr", "weight_decay", "grad_clip"):
        v = config[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (
                key == "lr" and v == 0):
            raise ConfigError(f"{key} must be a {'positive' if key == 'lr' else 'non-negative'} number, got {v!r}")
    if config["hidden"] is not None:
        h = config["hidden"]
        if isinstance(h, int):
            h = [h]
        if not isinstance(h, (list, tuple)) or not h or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in h):
            raise ConfigError(f"hidden must be a list of positive ints, got {config['hidden']!r}")
        config["hidden"] = list(h)
    if config["bins"] is not None and not config["model"].startswith("nsf"):
        raise ConfigError(f"bins applies to nsf and nsf-ar only, not {config['model']}")
    device = str(config["device"])
    if not (device == "cpu" or device.startswith("cuda")):
        raise ConfigError(f"device must be cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but torch sees no CUDA device")
    if config["out"] is None:
        config["out"] = os.path.join("runs", f"{config['model']}-{_safe(config['data'])}")
    config["out"] = os.fspath(config["out"])
    return config


def _safe(name: Any) -> str:
    base = os.path.basename(os.path.normpath(str(name)))
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in base) or "data"


def model_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(MODELS[config["model"]][1])
    if config.get("layers") is not None:
        kwargs["layers"] = config["layers"]
    if config.get("hidden") is not None:
        kwargs["hidden"] = list(config["hidden"])
    if config.get("bins") is not None:
        kwargs["bins"] = config["bins"]
    return kwargs


def build_model(name: str, features: int, **kwargs) -> nflux.Flow:
    """The flow `name` (a key of MODELS) over `features` dimensions."""
    name = name.lower()
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    cls_name, extra = MODELS[name]
    kw = {**extra, **kwargs}
    if "hidden" in kw:
        kw["hidden"] = tuple(kw["hidden"])
    return getattr(nflux, cls_name)(features, **kw)


def _load_vector_data(config: dict[str, Any]):
    splits = load_data(config["data"], root=config.get("data_root"), seed=int(config["seed"]))
    if splits.kind == "image":
        raise ConfigError(
            f"dataset {config['data']!r} is an image set: image models come with the image-flows issue"
        )
    return splits


def _nll(model: nflux.Flow, z: torch.Tensor, std: Standardizer, batch: int) -> float:
    """Mean negative log-likelihood in data units (nats) of standardised data z."""
    was = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(z), batch):
            total += float(model.log_prob(z[i:i + batch]).double().sum())
    model.train(was)
    return -(total / len(z) + std.logabsdet())


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


class _Progress:
    """A one-line bar on a TTY, plain log lines every `every` steps otherwise."""

    def __init__(self, total: int, every: int, stream=None):
        self.total, self.every = total, every
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.last_draw = 0.0

    def update(self, step: int, loss: float, rate: float, val: float | None = None) -> None:
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        eta_s = f"{int(eta) // 60:d}:{int(eta) % 60:02d}" if math.isfinite(eta) else "?"
        if self.tty:
            now = time.perf_counter()
            if now - self.last_draw < 0.1 and step != self.total and val is None:
                return
            self.last_draw = now
            width = 30
            filled = int(width * step / self.total)
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(f"\r[{bar}] {step}/{self.total} loss {loss:.4f} {rate:.1f} steps/s ETA {eta_s} ")
            self.stream.flush()
        elif step % self.every == 0 or step == self.total or val is not None:
            extra = f" val {val:.4f}" if val is not None else ""
            print(f"step {step:6d}/{self.total} loss {loss:.4f}{extra} {rate:.1f} steps/s ETA {eta_s}",
                  file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _read_jsonl(path: Path, upto: int | None = None) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            if upto is None or row.get("step", 0) <= upto:
                rows.append(row)
    return rows


def train(config: dict[str, Any], *, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Train one flow as `config` says (see DEFAULTS and the module docstring); return the
    final metrics (also written to `<out>/metrics.json`). With `resume=True`, continue from
    the newest checkpoint in `<out>/checkpoints` (none there: start afresh)."""
    config = make_config(config)
    out = Path(config["out"])
    device = torch.device(config["device"])
    splits = _load_vector_data(config)
    std = Standardizer.fit(splits.train)
    features = int(splits.shape[0])
    ztrain, zval, ztest = (std(t).to(device) for t in (splits.train, splits.val, splits.test))

    record = {**config, "standardizer": std.to_json(), "model_kwargs": model_kwargs(config),
              "dataset": {"kind": splits.kind, "shape": list(splits.shape), "meta": splits.meta},
              "nflux_version": nflux.__version__}
    ckpt_dir = out / "checkpoints"
    ckpt = load_latest(ckpt_dir) if resume else None
    if not resume and ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
        raise ConfigError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config["seed"])
    model = build_model(config["model"], features, **record["model_kwargs"]).to(device)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    base_lr, total = config["lr"], config["steps"]

    def set_lr(step: int) -> None:
        # Closed-form cosine over `steps` (no scheduler state): a run resumed with a larger
        # --steps continues on the longer schedule instead of a stale recursive one.
        for group in optimizer.param_groups:
            group["lr"] = 0.5 * base_lr * (1 + math.cos(math.pi * min(step, total) / total))

    data_gen = torch.Generator().manual_seed(config["seed"])
    guard = NonFiniteGuard(config["max_nonfinite"])
    state = {"best_val": None, "best_step": 0, "bad_evals": 0, "stopped_early": False}

    start_step = 0
    if ckpt is not None:
        restore(ckpt, model, optimizer, generators={"data": data_gen})
        meta = ckpt.meta
        try:
            guard.load_state_dict(meta["guard"])
            state.update(meta["early_stopping"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{ckpt.path.name}: training state incomplete ({e})") from None
        start_step = ckpt.step
        if not quiet:
            print(f"resuming from {ckpt.path} (step {start_step})")
    _write_json(out / "config.json", record)

    metrics_path = out / "metrics.jsonl"
    rows = _read_jsonl(metrics_path, upto=start_step) if ckpt is not None else []
    metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def checkpoint(step: int) -> None:
        meta = {"guard": guard.state_dict(), "early_stopping": dict(state),
                "config": record}
        save_checkpoint(ckpt_dir, step, model, optimizer, capture_rng_state({"data": data_gen}), meta)

    def validate(step: int) -> float:
        val = _nll(model, zval, std, config["eval_batch"])
        if state["best_val"] is None or val < state["best_val"]:
            state.update(best_val=val, best_step=step, bad_evals=0)
            tmp = out / ".best.safetensors.tmp"
            st_save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp),
                         metadata={"step": str(step)})
            os.replace(tmp, out / "best.safetensors")
        else:
            state["bad_evals"] += 1
            if config["patience"] and state["bad_evals"] >= config["patience"]:
                state["stopped_early"] = True
        return val

    end = total if config["stop_after"] is None else min(total, config["stop_after"])
    progress = _Progress(total, config["log_every"], stream=open(os.devnull, "w") if quiet else None)
    params = [p for p in model.parameters()]
    t0, last_t, last_step = time.perf_counter(), time.perf_counter(), start_step
    step = start_step
    with metrics_path.open("a") as log:
        while step < end and not state["stopped_early"]:
            step += 1
            idx = torch.randint(len(ztrain), (config["batch"],), generator=data_gen)
            batch = ztrain[idx.to(device)]
            loss = -model.log_prob(batch).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, config["grad_clip"]) if config["grad_clip"] else None
            if guard.check(loss, norm, step=step):
                set_lr(step - 1)
                optimizer.step()
            loss_v = float(loss.detach()) - std.logabsdet()  # data units
            val = validate(step) if (step % config["val_every"] == 0 or step == total) else None
            now = time.perf_counter()
            rate = (step - start_step) / max(now - t0, 1e-9)
            if step % config["log_every"] == 0 or val is not None or step == end:
                log.write(json.dumps({"step": step, "train_loss": loss_v, "val_loss": val,
                                      "steps_per_s": (step - last_step) / max(now - last_t, 1e-9),
                                      "lr": optimizer.param_groups[0]["lr"]}) + "\n")
                log.flush()
                last_t, last_step = now, step
            progress.update(step, loss_v, rate, val)
            if step % config["checkpoint_every"] == 0 or step == end or state["stopped_early"]:
                checkpoint(step)
    progress.close()
    seconds = time.perf_counter() - t0

    if step < total and not state["stopped_early"]:  # stop_after: interrupted on purpose
        if not quiet:
            print(f"stopped after step {step} of {total} (checkpointed; continue with --resume)")
        return {"step": step, "interrupted": True}

    if (out / "best.safetensors").exists():
        model.load_state_dict(st_load_file(str(out / "best.safetensors"), device=str(device)))
    test_nll = _nll(model, ztest, std, config["eval_batch"])
    metrics = {
        "model": config["model"], "data": str(config["data"]), "test_nll_nats": test_nll,
        "best_val_nll_nats": state["best_val"], "best_step": state["best_step"], "steps": step,
        "stopped_early": state["stopped_early"], "skipped_nonfinite_steps": guard.skipped,
        "train_seconds_last_session": seconds, "parameters": sum(p.numel() for p in model.parameters()),
    }
    _write_json(out / "metrics.json", metrics)
    if not quiet:
        print(f"test nll {test_nll:.4f} nats (best val {state['best_val']:.4f} at step {state['best_step']}); "
              f"wrote {out}")
    try:
        samples = _sample(model, std, config["plot_samples"], torch.Generator(device=device).manual_seed(
            config["seed"] + 1)) if config["plot_samples"] else None
        if samples is not None:
            plot_samples(splits.train, samples, out / "samples.png")
        plot_loss(_read_jsonl(metrics_path), out / "loss.png")
    except ImportError:
        if not quiet:
            print("matplotlib not installed: no samples.png / loss.png")
    return metrics


# --- using a finished run ----------------------------------------------------------------


def load_run(run_dir: str | os.PathLike, device: str = "cpu"):
    """(model, config record, Standardizer) of a run directory, with the best weights
    (`best.safetensors`), or the newest checkpoint's when there is no best file."""
    d = Path(run_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"run directory {d} does not exist")
    cfg_path = d / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found: not an nflux run directory")
    try:
        record = json.loads(cfg_path.read_text())
        std = Standardizer.from_json(record["standardizer"])
        name, kwargs = record["model"], record["model_kwargs"]
        features = int(record["dataset"]["shape"][0])
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{cfg_path} is not a valid run config ({e})") from None
    model = build_model(name, features, **kwargs).to(device)
    best = d / "best.safetensors"
    if best.exists():
        try:
            weights = st_load_file(str(best), device=str(device))
        except Exception as e:  # noqa: BLE001 -- any parse failure is a corrupt file
            raise CheckpointError(f"{best} is corrupt ({e})") from None
        from nflux.training.checkpoint import _check_model
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
    return model, record, std


def evaluate(run_dir: str | os.PathLike, data: str | None = None, device: str = "cpu") -> dict[str, Any]:
    """Test NLL (nats, data units) of a run's best weights on its data set (or `data`)."""
    model, record, std = load_run(run_dir, device)
    name = data if data is not None else record["data"]
    splits = _load_vector_data({"data": name, "data_root": record.get("data_root"), "seed": record["seed"]})
    if list(splits.shape) != list(record["dataset"]["shape"]):
        raise ConfigError(f"dataset {name!r} has examples of shape {list(splits.shape)}, "
                          f"the model was trained on {record['dataset']['shape']}")
    test = std(splits.test).to(device)
    nll = _nll(model, test, std, int(record.get("eval_batch", 4096)))
    return {"data": str(name), "test_nll_nats": nll, "weights": record["_weights"], "n_test": len(test)}


def _sample(model: nflux.Flow, std: Standardizer, n: int, generator: torch.Generator,
            temperature: float = 1.0) -> torch.Tensor:
    """n samples in data units; the base sample's std is scaled by `temperature`."""
    anchor = next(iter(model.parameters()))
    with torch.no_grad():
        z = torch.randn(n, model.features, generator=generator, device=anchor.device, dtype=anchor.dtype)
        x, _ = model.inverse(z * temperature)
    return std.inverse(x.double().cpu())


def sample_run(run_dir: str | os.PathLike, n: int, *, temperature: float = 1.0, seed: int = 0,
               device: str = "cpu") -> tuple[torch.Tensor, dict[str, Any]]:
    """n samples (float64, data units) from a run's best weights, and its config record."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    model, record, std = load_run(run_dir, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    return _sample(model, std, n, gen, temperature), record


# --- plots -------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_samples(data: torch.Tensor | None, samples: torch.Tensor, path: str | os.PathLike,
                 max_dims: int = 4) -> None:
    """2-D: data and samples side by side (as examples/fit_spline.py). More dimensions: a
    pair plot of the first `max_dims`, data and samples overlaid. `data` may be None."""
    plt = _plt()
    samples = samples.detach().double().cpu()
    if data is not None:
        data = data.detach().double().cpu()[: max(len(samples), 1)]
    d = samples.shape[1]
    if d == 2:
        panels = ([(data, "data")] if data is not None else []) + [(samples, "nflux samples")]
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), sharex=True, sharey=True,
                                 squeeze=False)
        for ax, (points, title) in zip(axes[0], panels):
            ax.scatter(points[:, 0], points[:, 1], s=1, alpha=0.4)
            ax.set_title(title)
            ax.set_aspect("equal")
    else:
        k = min(d, max_dims)
        fig, axes = plt.subplots(k, k, figsize=(2.2 * k, 2.2 * k), squeeze=False)
        for i in range(k):
            for j in range(k):
                ax = axes[i][j]
                if i == j:
                    if data is not None:
                        ax.hist(data[:, i], bins=40, density=True, alpha=0.5, label="data")
                    ax.hist(samples[:, i], bins=40, density=True, alpha=0.5, label="samples")
                else:
                    if data is not None:
                        ax.scatter(data[:, j], data[:, i], s=1, alpha=0.3, label="data")
                    ax.scatter(samples[:, j], samples[:, i], s=1, alpha=0.3, label="samples")
                if i == k - 1:
                    ax.set_xlabel(f"x{j}")
                if j == 0:
                    ax.set_ylabel(f"x{i}")
        axes[0][0].legend(fontsize="small")
        fig.suptitle(f"first {k} of {d} dimensions: data vs samples")
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=110)
    plt.close(fig)


def plot_loss(rows: list[dict], path: str | os.PathLike) -> None:
    """Train and validation NLL (nats, data units) against the step."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    tr = [(r["step"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    va = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if tr:
        ax.plot(*zip(*tr), label="train")
    if va:
        ax.plot(*zip(*va), marker="o", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("NLL (nats)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=110)
    plt.close(fig)
