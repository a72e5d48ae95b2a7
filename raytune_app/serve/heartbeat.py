"""Is a replica's model still making progress? The check behind `check_health` of the LLM and guard replicas.

    heartbeat = Heartbeat(stall_timeout_s=120)
    with heartbeat.working("decoding"):      # in the worker thread, around model work
        ...; heartbeat.beat()                  # after every step that finished
    heartbeat.check()                          # in check_health: raises when work has stalled

A replica whose event loop answers but whose model thread hangs (a wedged device, a read of adapter
weights from a hung mount, a deadlock) would pass Serve's own health check (a call that answers) while
every request to it times out. Work registers itself here; when work is in progress and nothing has
finished a step for `stall_timeout_s`, `check` raises, Serve marks the replica unhealthy and replaces it.
An idle replica is healthy however long it idles. Thread-safe; no Ray.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager


class Stalled(RuntimeError):
    """The model has had work and finished no step of it for longer than the stall timeout."""


class Heartbeat:
    def __init__(self, stall_timeout_s: float, clock=time.monotonic):
        self.stall_timeout_s, self.clock = stall_timeout_s, clock
        self._lock = threading.Lock()
        self._working: dict[int, str] = {}  # token -> what
        self._next = 0
        self.last_progress = clock()

    @contextmanager
    def working(self, what: str):
        with self._lock:
            token, self._next = self._next, self._next + 1
            if not self._working:
                self.last_progress = self.clock()  # the stall clock starts with the work, not at the last idle beat
            self._working[token] = what
        try:
            yield
        finally:
            with self._lock:
                del self._working[token]
                self.last_progress = self.clock()

    def beat(self) -> None:
        self.last_progress = self.clock()

    def stalled_for(self) -> float:
        """Seconds since the last progress while work is pending; 0 when idle."""
        with self._lock:
            return self.clock() - self.last_progress if self._working else 0.0

    def check(self) -> None:
        with self._lock:
            pending = sorted(set(self._working.values()))
            stalled = self.clock() - self.last_progress if pending else 0.0
        if stalled > self.stall_timeout_s:
            raise Stalled(
                f"no progress for {stalled:.0f} s (limit {self.stall_timeout_s:g} s) while {', '.join(pending)}: "
                "the model looks wedged; Serve replaces this replica"
            )
