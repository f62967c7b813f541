"""Training: the loop behind `nflux train` (single process or torchrun/DDP), its config,
crash-safe checkpoints, RNG capture and restore, the non-finite loss guard, clean stops on
Ctrl-C, and the use of finished runs (evaluate, sample)."""

from __future__ import annotations

from nflux.training.checkpoint import Checkpoint, CheckpointError, load_latest, restore, save_checkpoint
from nflux.training.config import ConfigError
from nflux.training.distributed import Distributed
from nflux.training.interrupt import StopRequest
from nflux.training.nonfinite import NonFiniteGuard, NonFiniteLossError
from nflux.training.rng import capture_rng_state, restore_rng_state
from nflux.training.runs import evaluate, load_run, sample_run
from nflux.training.trainer import train

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "Distributed",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "StopRequest",
    "capture_rng_state",
    "evaluate",
    "load_latest",
    "load_run",
    "restore",
    "restore_rng_state",
    "sample_run",
    "save_checkpoint",
    "train",
]
