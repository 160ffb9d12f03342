"""
Files an operator edits while the gateway runs (providers.json, the enrolment secrets),
noticed by their modification times, looked at no more than once per interval: a request
that needs them costs a clock read, not a stat, and a changed file is read once.
"""

from __future__ import annotations

import time


class FileWatch:
    def __init__(self, paths, clock=None, interval: float = 1.0):
        self.paths = tuple(paths)
        self.clock = clock
        self.interval = interval
        self._checked = None
        self._stamp = object()  # no version seen yet

    def now(self) -> float:
        return self.clock.seconds() if self.clock is not None else time.time()

    def changed(self, force: bool = False):
        """The files' new version (mtimes; None for a missing file, -1 for an unreadable
        one) if it differs from the last one returned and a look is due; else None."""
        now = self.now()
        if not force and self._checked is not None and now - self._checked < self.interval:
            return None
        self._checked = now
        stamp = tuple(_mtime(p) for p in self.paths)
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        return stamp


def _mtime(path):
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None
    except OSError:
        return -1  # unreadable: the reader says why
