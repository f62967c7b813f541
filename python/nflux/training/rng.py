"""Capture and restore every random number generator a training run draws from, as plain JSON.

`capture_rng_state(generators)` returns a JSON-serialisable dict holding the torch CPU
generator, each CUDA device's generator (when CUDA is initialised), numpy's global legacy
generator, Python's `random`, and any named `torch.Generator`s the trainer owns (e.g. the
data shuffler). Byte states are base64 text and the rest are lists of ints, so a checkpoint
never needs pickle. `restore_rng_state(state, generators)` puts them all back; after it, the
same code draws the same numbers as the run that was captured.
"""

from __future__ import annotations

import base64
import random
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state"]

FORMAT = 1


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s.encode("ascii"), validate=True)), dtype=torch.uint8)


def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """The state of all global RNGs plus `generators` (name -> torch.Generator), as JSON data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "format": FORMAT,
        "torch": _b64(torch.get_rng_state()),
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "generators": {name: _b64(g.get_state()) for name, g in (generators or {}).items()},
    }
    # Only when CUDA is already initialised: querying it would otherwise create a context.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Put back what `capture_rng_state` returned. Raises ValueError on a malformed state or
    when a generator named in `generators` has no saved state."""
    try:
        if state.get("format") != FORMAT:
            raise ValueError(f"unknown RNG state format {state.get('format')!r}")
        torch_state = _unb64(state["torch"])
        n = state["numpy"]
        numpy_state = (n["kind"], np.asarray(n["keys"], dtype=np.uint32), int(n["pos"]),
                       int(n["has_gauss"]), float(n["cached_gaussian"]))
        p = state["python"]
        python_state = (int(p["version"]), tuple(int(v) for v in p["internal"]), p["gauss_next"])
        saved = {name: _unb64(s) for name, s in state.get("generators", {}).items()}
        cuda = [_unb64(s) for s in state.get("cuda", [])]
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"malformed RNG state: {e}") from None
    missing = sorted(set(generators or {}) - set(saved))
    if missing:
        raise ValueError(f"RNG state has no entry for generator(s) {missing}; saved: {sorted(saved)}")
    torch.set_rng_state(torch_state)
    np.random.set_state(numpy_state)
    random.setstate(python_state)
    for name, g in (generators or {}).items():
        g.set_state(saved[name])
    if cuda and torch.cuda.is_available():
        # A run resumed on fewer devices restores the ones it has.
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
