"""Stop training cleanly on Ctrl-C (SIGINT) or SIGTERM: finish the step, checkpoint, exit.

    with StopRequest() as stop:
        while ...:
            step()                  # never cut in half (Adam would be half-updated)
            if stop.requested:      # under torchrun: all-reduced, so every rank stops together
                checkpoint(); break

A KeyboardInterrupt raised at an arbitrary instant could land inside `optimizer.step()` and
leave a state that no checkpoint should hold, so the handler only records the request and
the loop acts on it at the next step boundary. A second signal raises KeyboardInterrupt at
once (the user insists; the last periodic checkpoint is still intact, since every write is
atomic). torchrun passes the signal it gets on to its workers, so Ctrl-C on torchrun stops
every rank this way. Outside the main thread (where Python cannot install signal handlers)
this is a no-op and a KeyboardInterrupt behaves as usual.
"""

from __future__ import annotations

import signal
import threading

__all__ = ["StopRequest"]


class StopRequest:
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
