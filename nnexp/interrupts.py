"""Ctrl-C that a run cannot lose.

Python turns SIGINT into a KeyboardInterrupt in whatever Python code is running at
that instant. When that code is a finalizer (a `__del__`, a weakref callback, a
parked greenlet being unwound as it is freed: nnsight and torch free a trace's state
through all of these), Python prints "Exception ignored in ..." and carries on, and a
run the user meant to stop runs to its end. `InterruptGuard` records every SIGINT as
well as raising it as usual, and `check` raises again, at the next chunk boundary,
for one that a finalizer swallowed.
"""

from __future__ import annotations

import signal
import threading


class InterruptGuard:
    """While entered, remember every Ctrl-C; `check()` raises KeyboardInterrupt if one came."""

    def __init__(self) -> None:
        self.interrupted = False
        self._previous = None

    def __enter__(self) -> InterruptGuard:
        # Signal handlers can only be set from the main thread; a run started from
        # another thread gets no Ctrl-C there anyway. A handler that is not callable
        # (SIG_IGN, SIG_DFL) is the user's choice and is left alone.
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if callable(previous):
                self._previous = previous
                signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.interrupted = True
        self._previous(signum, frame)  # normally raises KeyboardInterrupt right here

    def check(self) -> None:
        if self.interrupted:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
