"""The training loop behind `nflux train`: `train(config) -> metrics`.

    metrics = train({"model": "nsf", "data": "moons", "steps": 2000, "out": "runs/nsf-moons"})

What a run does, in order:

- loads the data (`nflux.data.load`) and makes the model inputs (`nflux.training.task`):
  toy and tabular data standardised on the train split (the statistics go into
  `config.json`, so that `sample` returns data units and every NLL is in data units),
  images dequantised to [0, 1) (NLLs in nats of the integer images, and bits/dim);
- builds the model with `torch.manual_seed(seed)` (`nflux.training.config`): nice, realnvp,
  glow, maf, iaf, nsf, nsf-ar on vectors; the multi-scale realnvp and glow on images; runs
  the data-dependent init (ActNorm) on the first batch;
- trains with Adam and a cosine learning-rate schedule over `steps` (closed form, so a run
  resumed with a larger `steps` follows the longer schedule from there), batches drawn with
  replacement from a `torch.Generator` seeded by `seed`, gradient clipping, and a
  `NonFiniteGuard` that skips steps whose loss or gradient norm is NaN/inf;
- every `val_every` steps evaluates the validation NLL; the best state is kept in
  `best.safetensors`; after `patience` evaluations without improvement it stops early (a
  NaN or infinite validation NLL is never an improvement, and any finite one improves on
  a run that has had none);
- every `checkpoint_every` steps (and at the end) writes a checkpoint (model, optimizer,
  guard, early-stopping state, every RNG including the data generator) under
  `checkpoints/`; `resume=True` continues from the newest one, so the final parameters are
  those of an uninterrupted run. Ctrl-C (SIGINT) or SIGTERM finishes the current step, writes
  a checkpoint and returns `{"interrupted": True, ...}` (`nflux.training.interrupt`);
- writes `config.json`, `metrics.jsonl` (one line per logged step), `metrics.json` (final
  test NLL in nats of the best state, and bits/dim for images), `samples.png` and `loss.png`.
  The JSON files are strict JSON: a NaN or infinite number is written as null.

Under torchrun the same code trains with DistributedDataParallel: `batch` is the global
batch, each rank computes the loss of its shard, rank 0 writes the outputs, and every
decision is taken on all-reduced values (see `nflux.training.distributed`).

Determinism: on CPU with one thread (`OMP_NUM_THREADS=1`) a resumed run reproduces an
uninterrupted one bitwise; with more threads, reductions may differ in the last bits. A run on
N processes matches the single-process run with the same global batch up to the rounding of
the cross-process sums.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as st_load_file
from safetensors.torch import save as st_save
from torch import nn

import nflux
from nflux.data import load as load_data
from nflux.training.checkpoint import CheckpointError, _atomic_write, load_latest, restore, save_checkpoint
from nflux.training.config import ConfigError, build_model, make_config, model_kwargs, resolve_for_data
from nflux.training.distributed import Distributed
from nflux.training.interrupt import StopRequest
from nflux.training.nonfinite import NonFiniteGuard
from nflux.training.plots import plot_loss, plot_samples
from nflux.training.rng import capture_rng_state
from nflux.training.task import make_task, nll_sum

__all__ = ["train", "load_data_for", "make_dir", "sample_model", "strict_json", "write_json"]


def load_data_for(config: dict[str, Any]):
    """The data set a run config names (its seed fixes toy draws and the split)."""
    # Vectors in float64: standardised in full precision, then float32 for the model.
    return load_data(config["data"], root=config.get("data_root"), seed=int(config["seed"]), dtype=None)


class _NegLogLikelihood(nn.Module):
    """The training loss as a module's `forward`: DDP hooks `forward`, not `log_prob`. With
    `bf16`, under torch.autocast (inside forward, so torch.compile and DDP see it too)."""

    def __init__(self, flow: nflux.Flow, bf16: bool = False):
        super().__init__()
        self.flow, self.bf16 = flow, bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.bf16:  # no autocast context to enter and leave on every step
            return -self.flow.log_prob(x).mean()
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return -self.flow.log_prob(x).mean()


def sample_model(model: nflux.Flow, n: int, generator: torch.Generator, temperature: float = 1.0) -> torch.Tensor:
    """n model-space samples; the base sample's std is scaled by `temperature`."""
    anchor = next(iter(model.parameters()))
    with torch.no_grad():
        z = torch.randn(n, model.features, generator=generator, device=anchor.device, dtype=anchor.dtype)
        x, _ = model.inverse(z * temperature)
    return x


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX); elsewhere oneDNN
    emulates it, and bfloat16 autocast runs slower than float32. torch's probes are private:
    without them, assume it does."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    probes = [p for p in probes if p is not None]
    return not probes or any(p() for p in probes)


def make_adam(params, **options) -> torch.optim.Adam:
    """Adam without torch's CPU default of one loop iteration per parameter tensor, which flows
    have many of: one fused kernel when every parameter is a plain contiguous tensor on a device
    torch has it for (NSF, 32 tensors: 428 us against 1.72 ms), else the multi-tensor (foreach)
    path (the digits Glow, 108 tensors with channels-last conv weights: 2.14 ms against 3.31 ms;
    benchmarks/bench_overhead.py). The same update up to rounding. Not fused for
    channels-last conv weights: torch's fused CPU kernel ignores strides, so state restored in
    another layout would be paired with the wrong elements."""
    params = list(params)
    try:  # torch checks only at the first step; ask up front (a private helper, so guarded)
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        devices = _get_fused_kernels_supported_devices()
    except ImportError:
        devices = []
    if params and all(p.device.type in devices and p.is_floating_point() and p.is_contiguous() for p in params):
        return torch.optim.Adam(params, fused=True, **options)
    return torch.optim.Adam(params, foreach=True, **options)


def strict_json(obj: Any) -> Any:
    """`obj` with every NaN or infinite float replaced by None: json.dumps would write bare
    NaN / Infinity, which strict JSON readers (jq, JavaScript, Go) refuse."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    """`obj` as strict JSON (non-finite numbers as null), written atomically."""
    _atomic_write(path, (json.dumps(strict_json(obj), indent=2, allow_nan=False) + "\n").encode(), "run-json")


def make_dir(path: str | os.PathLike, what: str, value: str | os.PathLike | None = None) -> Path:
    """mkdir -p `path`, refusing in one line when it or a parent is a file; the message names
    the argument `what` and its `value` (default: `path`)."""
    p = Path(path)
    value = p if value is None else Path(value)
    for q in (p, *p.parents):
        if q.exists() and not q.is_dir():
            where = "" if q == value else f": {str(q)!r}"
            raise NotADirectoryError(f"{what} {str(value)!r}{where} is a file, not a directory")
    p.mkdir(parents=True, exist_ok=True)
    return p


def _improves(val: float, best: float | None) -> bool:
    """Whether a validation NLL is a new best: never when it is NaN or infinite, always over
    no best (or a non-finite one, as older checkpoints may hold)."""
    return math.isfinite(val) and (best is None or not math.isfinite(best) or val < best)


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


def _raise_if_other_model(ckpt, model: str, kwargs: dict[str, Any]) -> None:
    """For a checkpoint that does not fit the model: a short error naming both models when the
    checkpoint's record says it was made by another model or model options (restore's own
    message lists parameter names)."""
    saved = ckpt.meta.get("config") if isinstance(ckpt.meta, dict) else None
    if not isinstance(saved, dict) or "model" not in saved:
        return
    old = (saved["model"], saved.get("model_kwargs"))
    if old != (model, json.loads(json.dumps(kwargs))):
        raise CheckpointError(f"{ckpt.path.name} does not match the model: it was made by {old[0]} {old[1]}, "
                              f"this run builds {model} {kwargs}; resume with the same model and options, "
                              "or choose another --out") from None


def train(config: dict[str, Any], *, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Train one flow as `config` says (see `nflux.training.config.DEFAULTS` and the module
    docstring); return the final metrics (also written to `<out>/metrics.json`). With
    `resume=True`, continue from the newest checkpoint in `<out>/checkpoints` (none there:
    start afresh). Under torchrun, joins the process group (and leaves it at the end)."""
    config = make_config(config)
    ctx = Distributed.from_env(config["device"])
    try:
        return _train(config, ctx, resume, quiet or not ctx.is_main)
    finally:
        ctx.close()


def _train(config: dict[str, Any], ctx: Distributed, resume: bool, quiet: bool) -> dict[str, Any]:
    out, device, world = Path(config["out"]), ctx.device, ctx.world_size
    splits = load_data_for(config)
    config = resolve_for_data(config, splits.kind)
    if config["batch"] % world:
        raise ConfigError(f"batch {config['batch']} is the global batch and must be divisible by the "
                          f"{world} processes")
    task = make_task(splits, device, config["seed"])
    # The float64 copies served the standardiser: the run keeps float32 (only the plot reads them).
    splits = dataclasses.replace(splits, train=splits.train.float(), val=splits.val[:0], test=splits.test[:0])
    kwargs = model_kwargs(config, splits.shape, splits.meta.get("levels"))
    record = {**config, **task.record(), "model_kwargs": kwargs, "processes": world,
              "dataset": {"kind": splits.kind, "shape": list(splits.shape), "meta": splits.meta},
              "nflux_version": nflux.__version__}
    ckpt_dir = out / "checkpoints"
    ckpt = load_latest(ckpt_dir) if resume else None
    if not resume and ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
        raise ConfigError(f"{out} already holds checkpoints: pass --resume to continue, or choose another --out")
    ctx.agree(-1 if ckpt is None else ckpt.step, "the checkpoint step to resume from (with several nodes, "
              "--out must be on storage that every node sees)")
    if ctx.is_main:
        make_dir(out, "out")

    torch.manual_seed(config["seed"])  # the same initial model on every rank
    model = build_model(config["model"], splits.shape, **kwargs).to(device)
    model.train()
    optimizer = make_adam(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    base_lr, total, batch = config["lr"], config["steps"], config["batch"]

    def set_lr(step: int) -> None:
        # Closed-form cosine over `steps` (no scheduler state): a run resumed with a larger
        # --steps continues on the longer schedule instead of a stale recursive one.
        for group in optimizer.param_groups:
            group["lr"] = 0.5 * base_lr * (1 + math.cos(math.pi * min(step, total) / total))

    # The same on every rank: each draws the whole global batch and keeps its shard.
    data_gen = torch.Generator().manual_seed(config["seed"])
    guard = NonFiniteGuard(config["max_nonfinite"])
    state = {"best_val": None, "best_step": 0, "bad_evals": 0, "stopped_early": False}

    start_step = 0
    if ckpt is not None:
        try:
            restore(ckpt, model, optimizer, generators={"data": data_gen})
        except CheckpointError:
            _raise_if_other_model(ckpt, config["model"], kwargs)
            raise
        meta = ckpt.meta
        try:
            guard.load_state_dict(meta["guard"])
            state.update(meta["early_stopping"])
            # Stopped under the old patience; the resumed run's patience decides (0: off).
            state["stopped_early"] = bool(config["patience"]) and state["bad_evals"] >= config["patience"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{ckpt.path.name}: training state incomplete ({e})") from None
        start_step = ckpt.step
        if ctx.rank:  # the checkpoint holds rank 0's global RNG; the training step draws none
            torch.manual_seed(config["seed"] + ctx.rank + world * start_step)
        if not quiet:
            print(f"resuming from {ckpt.path} (step {start_step})")
    else:
        # Data-dependent init (ActNorm) on the whole global first batch, identical on every
        # rank; the generator is rewound so that step 1 trains on that batch.
        rewind = data_gen.get_state()
        with torch.no_grad():
            model.log_prob(task.draw(batch, data_gen))
        data_gen.set_state(rewind)
        torch.manual_seed(config["seed"] + ctx.rank)
    if ctx.is_main:
        write_json(out / "config.json", record)

    bf16 = config["precision"] == "bf16"
    if bf16 and device.type == "cpu" and not cpu_has_bf16() and not quiet:
        print("nflux: this CPU has no bfloat16 units (AVX512-BF16, AMX): --precision bf16 will train "
              "slower than float32 here", file=sys.stderr)
    loss_fn: nn.Module = _NegLogLikelihood(model, bf16=bf16)
    if config["compile"]:
        loss_fn.compile(backend=config["compile"])  # before DDP, as torch.compile's docs advise
    if ctx.active:
        from torch.nn.parallel import DistributedDataParallel

        # DDP copies rank 0's parameters and buffers at construction; after that the buffers
        # (ActNorm's data init) never change, so no per-step broadcast.
        loss_fn = DistributedDataParallel(loss_fn, device_ids=[device.index] if device.type == "cuda" else None,
                                          forward_sync_buffers=False)

    metrics_path = out / "metrics.jsonl"
    if ctx.is_main:
        rows = _read_jsonl(metrics_path, upto=start_step) if ckpt is not None else []
        metrics_path.write_text("".join(json.dumps(strict_json(r)) + "\n" for r in rows))

    def checkpoint(step: int) -> None:
        if ctx.is_main:
            meta = {"guard": guard.state_dict(), "early_stopping": dict(state), "config": record}
            save_checkpoint(ckpt_dir, step, model, optimizer, capture_rng_state({"data": data_gen}), meta)

    def validate(step: int) -> float:
        # Each rank takes a shard; the all-reduced sum gives every rank the same value, so
        # every rank takes the same early-stopping decision.
        (total_nll,) = ctx.sum_floats(nll_sum(model, task.val[ctx.shard(len(task.val))], config["eval_batch"]))
        val = total_nll / len(task.val) + task.nll_offset
        if _improves(val, state["best_val"]):
            state.update(best_val=val, best_step=step, bad_evals=0)
            if ctx.is_main:  # as the checkpoints: atomic, and the run's other files' permissions
                weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
                _atomic_write(out / "best.safetensors", st_save(weights, metadata={"step": str(step)}), "best")
        else:
            state["bad_evals"] += 1
            if config["patience"] and state["bad_evals"] >= config["patience"]:
                state["stopped_early"] = True
        return val

    end = total if config["stop_after"] is None else min(total, config["stop_after"])
    progress = _Progress(total, config["log_every"], stream=open(os.devnull, "w") if quiet else None)
    params = [p for p in model.parameters()]
    shard = ctx.shard(batch)
    t0, last_t, last_step = time.perf_counter(), time.perf_counter(), start_step
    step, signal_name = start_step, None
    with (metrics_path.open("a") if ctx.is_main else open(os.devnull, "w")) as log, StopRequest() as stop:
        while step < end and not state["stopped_early"]:
            step += 1
            loss = loss_fn(task.draw(batch, data_gen, shard))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(params, config["grad_clip"]) if config["grad_clip"] else None
            # One all-reduce: the global batch's loss (the mean of the equal shards' means) and
            # whether any rank was asked to stop. The gradient norm is of the all-reduced
            # gradients, so the skip decision below is the same on every rank.
            loss_sum, stops = ctx.sum_floats(float(loss.detach()), float(stop.requested))
            if guard.check(torch.tensor(loss_sum / world), norm, step=step):
                set_lr(step - 1)
                optimizer.step()
            loss_v = loss_sum / world + task.nll_offset  # data units
            val = validate(step) if (step % config["val_every"] == 0 or step == total) else None
            now = time.perf_counter()
            rate = (step - start_step) / max(now - t0, 1e-9)
            if step % config["log_every"] == 0 or val is not None or step == end:
                row = {"step": step, "train_loss": loss_v, "val_loss": val,
                       "steps_per_s": (step - last_step) / max(now - last_t, 1e-9),
                       "lr": optimizer.param_groups[0]["lr"]}
                if task.kind == "image":
                    row["train_bits_per_dim"] = task.bits_per_dim(loss_v)
                    row["val_bits_per_dim"] = None if val is None else task.bits_per_dim(val)
                log.write(json.dumps(strict_json(row)) + "\n")
                log.flush()
                last_t, last_step = now, step
            progress.update(step, loss_v, rate, val)
            if stops:
                signal_name = stop.signal_name or "a signal on another rank"
            if step % config["checkpoint_every"] == 0 or step == end or state["stopped_early"] or signal_name:
                checkpoint(step)
            if signal_name:
                break
    progress.close()
    seconds = time.perf_counter() - t0

    if signal_name or (step < total and not state["stopped_early"]):  # interrupted, checkpointed
        ctx.barrier()  # rank 0's checkpoint is on disk when any rank returns
        if signal_name and ctx.is_main:  # said even when quiet: the run did not finish
            print(f"nflux: interrupted by {signal_name} after step {step} of {total}; checkpoint written to "
                  f"{ckpt_dir}; continue with --resume", file=sys.stderr)
        elif not quiet:
            print(f"stopped after step {step} of {total} (--stop-after); checkpoint written to {ckpt_dir}; "
                  "continue with --resume")
        return {"step": step, "interrupted": True, "signal": signal_name}

    metrics: dict[str, Any] = {"step": step, "rank": ctx.rank}
    if ctx.is_main:  # the test set and the plots on rank 0 alone; the others wait
        if (out / "best.safetensors").exists():
            model.load_state_dict(st_load_file(str(out / "best.safetensors"), device=str(device)))
        test_nll = nll_sum(model, task.test, config["eval_batch"]) / len(task.test) + task.nll_offset
        metrics = {
            "model": config["model"], "data": str(config["data"]), "test_nll_nats": test_nll,
            "best_val_nll_nats": state["best_val"], "best_step": state["best_step"], "steps": step,
            "stopped_early": state["stopped_early"], "skipped_nonfinite_steps": guard.skipped,
            "train_seconds_last_session": seconds, "parameters": sum(p.numel() for p in model.parameters()),
            "processes": world,
        }
        bpd = task.bits_per_dim(test_nll)
        if bpd is not None:
            metrics["test_bits_per_dim"] = bpd
        write_json(out / "metrics.json", metrics)
        if not quiet:
            extra = f", {bpd:.4f} bits/dim" if bpd is not None else ""
            best = ("no finite validation NLL" if state["best_val"] is None
                    else f"best val {state['best_val']:.4f} at step {state['best_step']}")
            print(f"test nll {test_nll:.4f} nats{extra} ({best}); wrote {out}")
        if config["plot_samples"]:
            gen = torch.Generator(device=device).manual_seed(config["seed"] + 1)
            samples = task.to_data(sample_model(model, task.plot_count(config["plot_samples"]), gen))
            plot_samples(task.data_for_plot(splits), samples, out / "samples.png")
        plot_loss(_read_jsonl(metrics_path), out / "loss.png")
    ctx.barrier()
    return metrics
