"""SIGTERM / SIGUSR1 / SIGUSR2, deferred: the loop finishes the step, checkpoints, then forwards the signal to
the handler installed before ours (submitit's requeue) or exits with ``128 + signum``.
"""

from __future__ import annotations

import signal
import sys
import threading

SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGUSR1", "SIGUSR2")) if s is not None)


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def forward(self) -> None:
        """Acts on the received signal: the previous Python handler if any, else exit(128 + signum)."""
        previous = self._previous.get(self.signum)
        self.__exit__()
        if callable(previous):
            previous(self.signum, None)
        sys.exit(128 + int(self.signum))
