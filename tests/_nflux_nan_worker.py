"""`nflux` with one poisoned batch shard, for tests/test_cli_distributed.py.

Run as `python tests/_nflux_nan_worker.py train ...` or under torchrun. The shard of rank
NFLUX_TEST_NAN_RANK at training step NFLUX_TEST_NAN_STEP gets a NaN row, so that rank's loss
(and, through DDP's all-reduce, every rank's gradient) is NaN at that step only.
"""

import os
import sys

import nflux.training.task as task
from nflux.cli import main

NAN_STEP = int(os.environ["NFLUX_TEST_NAN_STEP"])
NAN_RANK = int(os.environ["NFLUX_TEST_NAN_RANK"])
_draw = task.VectorTask.draw
_calls = [0]


def draw(self, batch, generator, part=slice(None)):
    x = _draw(self, batch, generator, part)
    _calls[0] += 1  # call 1 is the data-dependent init, call s + 1 is step s
    if _calls[0] == NAN_STEP + 1 and int(os.environ.get("RANK", "0")) == NAN_RANK:
        x = x.clone()
        x[0] = float("nan")
    return x


task.VectorTask.draw = draw
sys.exit(main())
