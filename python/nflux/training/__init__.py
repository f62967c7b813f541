"""Training machinery independent of the models: crash-safe checkpoints, RNG capture and
restore, and the non-finite loss guard. (The trainer loop and the command line build on these.)"""

from __future__ import annotations

from nflux.training.checkpoint import Checkpoint, CheckpointError, load_latest, restore, save_checkpoint
from nflux.training.nonfinite import NonFiniteGuard, NonFiniteLossError
from nflux.training.rng import capture_rng_state, restore_rng_state
from nflux.training.trainer import ConfigError, train

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ConfigError",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "capture_rng_state",
    "load_latest",
    "restore",
    "restore_rng_state",
    "save_checkpoint",
    "train",
]
