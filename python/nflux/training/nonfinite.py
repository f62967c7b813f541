"""Skip optimizer steps whose loss (or gradient norm) is NaN/inf; stop after too many in a row.

    guard = NonFiniteGuard(max_consecutive=50)
    loss = model_loss(batch); loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if guard.check(loss, norm):        # one host sync per step, see below
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)

Design choice: `check` reads one boolean to the host per step (`bool(all finite)`). A truly
skipped step (no parameter change, no optimizer state change: Adam's moments and step count
stay put) needs the decision on the host before `optimizer.step()`; the sync-free tricks
either still decay Adam's moments (zeroing gradients with `torch.where`) or exist only for
fused optimizers (`found_inf`). The trainer already reads the loss for logging and early
stopping, so the extra sync is one small read per step, cheap next to a flow's step.

The guard's counters go into checkpoints (`state_dict` / `load_state_dict`), so a resumed run
counts consecutive failures exactly as an uninterrupted one.
"""

from __future__ import annotations

import torch

__all__ = ["NonFiniteGuard", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss was non-finite for too many steps in a row."""


class NonFiniteGuard:
    """Counts skipped steps; raises `NonFiniteLossError` after `max_consecutive` in a row."""

    def __init__(self, max_consecutive: int = 50):
        if isinstance(max_consecutive, bool) or not isinstance(max_consecutive, int) or max_consecutive < 1:
            raise ValueError(f"max_consecutive must be a positive int, got {max_consecutive!r}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped = 0

    def check(self, loss: torch.Tensor, *more: torch.Tensor | None, step: int | None = None) -> bool:
        """True when `loss` and every tensor in `more` (e.g. the gradient norm) are finite, so
        the optimizer step should run; False (counted) when the step must be skipped."""
        finite = torch.isfinite(loss.detach()).all()
        for t in more:
            if t is not None:
                finite = finite & torch.isfinite(t.detach()).all()
        if bool(finite):  # the one host sync
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.skipped += 1
        if self.consecutive >= self.max_consecutive:
            where = f" at step {step}" if step is not None else ""
            raise NonFiniteLossError(
                f"training stopped{where}: the loss was NaN or infinite for {self.consecutive} steps in a row "
                f"({self.skipped} skipped in all). Lower the learning rate, enable gradient clipping, "
                "or check the data for NaN/inf and standardise it."
            )
        return False

    def state_dict(self) -> dict[str, int]:
        return {"max_consecutive": self.max_consecutive, "consecutive": self.consecutive, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive = int(state["consecutive"])
        self.skipped = int(state["skipped"])
