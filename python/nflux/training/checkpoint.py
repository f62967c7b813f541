"""Crash-safe checkpoints: safetensors weights plus a JSON record, never pickle.

A checkpoint of step S in `dir` is a pair

    step-SSSSSSSS.safetensors   model tensors ("model/<key>") and optimizer tensors
                                ("optim/<path>"), e.g. Adam's moments and step counts
    step-SSSSSSSS.json          step, meta, the optimizer's non-tensor state (param_groups
                                hyperparameters, ...), the RNG states (`nflux.training.rng`),
                                and the weights file's size and sha256

plus a `latest` text file naming the newest pair (for people and tools; loading does not
need it). Every file is written to a temporary file in `dir`, fsync'd, then `os.replace`d
over its name, and the directory is fsync'd. The weights go first and the JSON last, so a
JSON exists only for a complete pair; its hash catches a weights file that is truncated or
from another save. `load_latest` takes the newest pair that checks out and skips the others
(reporting why in `Checkpoint.skipped`). A process killed at any instant therefore leaves
the previous good checkpoint loadable.

Saving assumes one writer per directory (rank 0): it removes stale temporary files left by
a killed save, pairs newer than the step being saved (an abandoned timeline: the run was
resumed from before them, e.g. because they were corrupt), and all but the last `keep`.

`restore` loads a checkpoint into a model and optimizer and restores the RNGs, raising
`CheckpointError` (a ValueError) naming the key and shapes when they do not match.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from nflux.training.rng import restore_rng_state

__all__ = ["Checkpoint", "CheckpointError", "load_latest", "restore", "save_checkpoint"]

FORMAT = "nflux-checkpoint"
VERSION = 1
_NAME = re.compile(r"^step-(\d{8,})\.(json|safetensors)$")
_TMP = re.compile(r"^\.(step-\d{8,}\.(json|safetensors)|latest)\.tmp")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: none loadable, or not matching the model/optimizer."""


class _Corrupt(Exception):
    """One checkpoint pair failed a check; load_latest falls back to an older one."""


@dataclass
class Checkpoint:
    """A loaded checkpoint. `skipped`: (file, reason) of newer pairs that failed to load."""

    step: int
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    rng_state: dict[str, Any] | None
    meta: dict[str, Any]
    path: Path
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _fault_point(name: str) -> None:
    """No-op; tests replace it to kill the process at a named point inside a save."""


def _stem(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_dir(d: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes, label: str) -> None:
    """Write `data` to `path` so that `path` holds either its old content or all of `data`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        half = len(data) // 2
        f.write(data[:half])
        f.flush()
        _fault_point(f"{label}:partial")
        f.write(data[half:])
        f.flush()
        os.fsync(f.fileno())
    _fault_point(f"{label}:before_replace")
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# --- optimizer state <-> (JSON tree, tensors) -------------------------------------------


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"optim{path}"  # path starts with "/"
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{path}/{k}", tensors) for k, v in obj.items()}
        return {"__dict__": [[_encode(k, path, tensors), _encode(v, f"{path}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store optimizer state value of type {type(obj).__name__} at {path!r}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        if obj["__tensor__"] not in tensors:
            raise _Corrupt(f"optimizer tensor {obj['__tensor__']!r} missing from the weights file")
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _prepare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and not sharing storage (safetensors refuses shared or partial views)."""
    out, seen = {}, set()
    for k, t in tensors.items():
        t = t.detach().cpu().contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


# --- save --------------------------------------------------------------------------------


def _pairs(d: Path) -> dict[int, set[str]]:
    """step -> {"json", "safetensors"} present in `d`."""
    found: dict[int, set[str]] = {}
    for name in os.listdir(d):
        m = _NAME.match(name)
        if m:
            found.setdefault(int(m.group(1)), set()).add(m.group(2))
    return found


def _remove(d: Path, step: int) -> None:
    # JSON first: once it is gone the pair is no longer a candidate, whatever happens next.
    for ext in ("json", "safetensors"):
        try:
            os.remove(d / f"{_stem(step)}.{ext}")
        except FileNotFoundError:
            pass
        _fault_point(f"prune:{ext}")


def save_checkpoint(
    dir: str | os.PathLike,
    step: int,
    model_state: dict[str, torch.Tensor] | torch.nn.Module,
    optimizer_state: dict[str, Any] | torch.optim.Optimizer | None = None,
    rng_state: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    keep: int = 3,
) -> Path:
    """Write the checkpoint of `step` into `dir` (created if needed); return the JSON's path.

    model_state / optimizer_state: state dicts (or the module / optimizer itself).
    rng_state: from `capture_rng_state()`. meta: JSON-serialisable (config, metrics, the
    data standardiser, the non-finite guard's counters...). keep: pairs to keep (>= 1).
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be a positive int, got {keep!r}")
    if isinstance(model_state, torch.nn.Module):
        model_state = model_state.state_dict()
    if isinstance(optimizer_state, torch.optim.Optimizer):
        optimizer_state = optimizer_state.state_dict()
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(d):
        if _TMP.match(name):  # left by a save that was killed
            os.remove(d / name)

    tensors = {f"model/{k}": v for k, v in model_state.items()}
    optim_json = None if optimizer_state is None else _encode(optimizer_state, "", tensors)
    bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"model_state values must be tensors; not for {bad[:5]}")
    weights = st_save(_prepare(tensors), metadata={"format": "pt", "producer": FORMAT})
    stem = _stem(step)
    record = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "weights": {"file": f"{stem}.safetensors", "bytes": len(weights),
                    "sha256": hashlib.sha256(weights).hexdigest()},
        "optimizer": optim_json,
        "rng": rng_state,
        "meta": meta or {},
    }
    try:
        record_bytes = json.dumps(record, separators=(",", ":")).encode()
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint meta and rng_state must be JSON-serialisable: {e}") from None

    _atomic_write(d / f"{stem}.safetensors", weights, "weights")
    _fault_point("between")
    _atomic_write(d / f"{stem}.json", record_bytes, "json")
    _fault_point("after_json")
    _atomic_write(d / "latest", f"{stem}\n".encode(), "latest")

    pairs = _pairs(d)
    complete = sorted(s for s, exts in pairs.items() if "json" in exts and s <= step)
    stale = [s for s in pairs if s > step]  # abandoned timeline
    oldest_kept = complete[-keep] if len(complete) >= keep else -1
    old = [s for s in pairs if s < step and (s not in complete or s < oldest_kept)]
    for s in sorted(stale + old):
        _remove(d, s)
    return d / f"{stem}.json"


# --- load --------------------------------------------------------------------------------


def _read(json_path: Path, step: int) -> Checkpoint:
    try:
        record = json.loads(json_path.read_bytes())
    except (OSError, ValueError) as e:
        raise _Corrupt(f"unreadable JSON ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise _Corrupt("not an nflux checkpoint record")
    if record.get("version") != VERSION:
        raise _Corrupt(f"checkpoint format version {record.get('version')!r}, this nflux reads {VERSION}")
    try:
        w = record["weights"]
        expected_name, size, digest = f"{_stem(step)}.safetensors", int(w["bytes"]), str(w["sha256"])
        if record["step"] != step or w["file"] != expected_name:
            raise _Corrupt("record does not match its file name")
        optimizer, rng, meta = record["optimizer"], record["rng"], record["meta"]
    except (KeyError, TypeError, ValueError) as e:
        raise _Corrupt(f"incomplete record ({e})") from None
    try:
        data = (json_path.parent / expected_name).read_bytes()
    except OSError:
        raise _Corrupt(f"weights file {expected_name} is missing") from None
    if len(data) != size:
        raise _Corrupt(f"weights file has {len(data)} bytes, the record says {size}")
    if hashlib.sha256(data).hexdigest() != digest:
        raise _Corrupt("weights file sha256 does not match the record")
    try:
        tensors = st_load(data)
    except Exception as e:  # noqa: BLE001 -- any failure to parse means a corrupt file
        raise _Corrupt(f"unreadable safetensors ({e})") from None
    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    optim_state = None if optimizer is None else _decode(optimizer, tensors)
    return Checkpoint(step, model_state, optim_state, rng, meta, json_path)


def load_latest(dir: str | os.PathLike) -> Checkpoint | None:
    """The newest complete, intact checkpoint in `dir`, or None when `dir` holds none.

    Pairs whose JSON is unreadable, whose weights are missing, truncated or fail the hash,
    are skipped (listed in the result's `skipped`). Raises `CheckpointError` when there are
    checkpoint records but none of them loads.
    """
    d = Path(dir)
    if not d.is_dir():
        return None
    steps = sorted((s for s, exts in _pairs(d).items() if "json" in exts), reverse=True)
    skipped: list[tuple[str, str]] = []
    for step in steps:
        path = d / f"{_stem(step)}.json"
        try:
            ckpt = _read(path, step)
        except _Corrupt as e:
            skipped.append((path.name, str(e)))
            continue
        ckpt.skipped = skipped
        return ckpt
    if skipped:
        reasons = "; ".join(f"{name}: {why}" for name, why in skipped)
        raise CheckpointError(f"no loadable checkpoint in {d}: {reasons}")
    return None


# --- restore -----------------------------------------------------------------------------


def _check_model(saved: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if missing or unexpected:  # a few names each: a different model can miss hundreds
        raise CheckpointError(
            "checkpoint does not match the model (made by a different model or model options?): "
            + "; ".join(
                f"{len(keys)} {what} {keys[:3]}{' ...' if len(keys) > 3 else ''}"
                for what, keys in (("missing keys", missing), ("unexpected keys", unexpected))
                if keys
            )
        )
    for k, t in expected.items():
        if tuple(saved[k].shape) != tuple(t.shape):
            raise CheckpointError(
                f"checkpoint does not match the model: {k!r} has shape {tuple(saved[k].shape)} "
                f"in the checkpoint but {tuple(t.shape)} in the model"
            )


def _check_optimizer(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    ok = isinstance(saved, dict) and isinstance(saved.get("state"), dict)
    groups = saved.get("param_groups") if ok else None
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise CheckpointError("checkpoint optimizer state is malformed (no state / param_groups)")
    n_mine = len(optimizer.param_groups)
    if len(groups) != n_mine:
        raise CheckpointError(f"checkpoint optimizer has {len(groups)} parameter group(s), this optimizer has {n_mine}")
    for i, (g, mine) in enumerate(zip(groups, optimizer.param_groups)):
        if len(g.get("params", [])) != len(mine["params"]):
            raise CheckpointError(
                f"checkpoint optimizer group {i} has {len(g.get('params', []))} parameters, "
                f"this optimizer's has {len(mine['params'])}"
            )
    params = {
        pid: p for g, mine in zip(groups, optimizer.param_groups) for pid, p in zip(g["params"], mine["params"])
    }
    for pid, st in saved["state"].items():
        for name, v in (st.items() if isinstance(st, dict) else ()):
            # Per-element state (Adam's moments, momentum buffers) has the parameter's shape.
            p = params.get(pid)
            if isinstance(v, torch.Tensor) and p is not None and v.dim() == p.dim() > 0 and v.shape != p.shape:
                raise CheckpointError(
                    f"checkpoint optimizer state {name!r} of parameter {pid} has shape {tuple(v.shape)}, "
                    f"the parameter has {tuple(p.shape)}"
                )


def restore(
    checkpoint: Checkpoint,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    generators: dict[str, torch.Generator] | None = None,
    rng: bool = True,
) -> None:
    """Load `checkpoint` into `model` (and `optimizer`), and restore the RNGs (global ones and
    the named `generators`) unless `rng=False`. Keys, shapes, parameter groups and the RNG
    state are checked before anything is changed; a mismatch raises `CheckpointError` naming
    the key and the shapes."""
    _check_model(checkpoint.model_state, model)
    if optimizer is not None:
        if checkpoint.optimizer_state is None:
            raise CheckpointError(f"{checkpoint.path.name} has no optimizer state to restore")
        _check_optimizer(checkpoint.optimizer_state, optimizer)
    if rng and checkpoint.rng_state is None:
        raise CheckpointError(f"{checkpoint.path.name} has no RNG state to restore")
    if rng:  # validates the whole state before setting any generator
        try:
            restore_rng_state(checkpoint.rng_state, generators)
        except ValueError as e:
            raise CheckpointError(f"{checkpoint.path.name}: {e}") from None
    model.load_state_dict(checkpoint.model_state)
    if optimizer is not None:
        try:
            optimizer.load_state_dict(checkpoint.optimizer_state)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint optimizer state does not fit this optimizer: {e}") from None
        _match_parameter_layouts(optimizer)


def _match_parameter_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Gives restored per-parameter state (Adam's moments) its parameter's strides: the weights
    file holds them contiguous, a channels-last conv weight is not, and kernels that walk
    parameter and state as flat memory (torch's fused optimizers) need them to agree."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for name, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[name] = torch.empty_like(p, dtype=value.dtype).copy_(value)
