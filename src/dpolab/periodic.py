"""A ``with`` block that runs a small job on a daemon thread every few seconds.

What the system sampler (``tracking``), a sweep trial's heartbeat (``sweep.study``) and the data
benchmark's memory sampler share: start a thread on entry, tick every ``interval_s`` seconds,
stop and join on exit.
"""

from __future__ import annotations

import threading
from typing import Self


class Periodic:
    """Calls :meth:`tick` on a daemon thread every ``interval_s`` seconds while the ``with`` block runs.

    ``tick_at_start``: tick as soon as the block starts (a heartbeat, a memory peak), or only after
    the first interval (a CPU-percent sampler, whose first reading would be noise). Subclasses write
    ``tick`` and may extend ``__enter__`` / ``__exit__`` (calling ``super()``).
    """

    def __init__(self, interval_s: float, name: str, tick_at_start: bool = True) -> None:
        self.interval_s = interval_s
        self._tick_at_start = tick_at_start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def tick(self) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        if self._tick_at_start:
            self.tick()
        while not self._stop.wait(self.interval_s):
            self.tick()

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)  # a tick stuck in I/O must not hang the caller's exit
