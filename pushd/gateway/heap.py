"""
Give freed heap memory back to the OS after a burst of connections comes or goes.

Each TLS handshake allocates and frees buffers (the record buffer, the handshake
messages, the BIOs' first contents) in between the long-lived state of the connections
made before it. glibc keeps those freed pages inside its heap: no longer used, still
resident. ``malloc_trim(0)`` returns every whole free page to the OS (madvise), which
the automatic trim (top of the heap only) does not. It walks the heap, so it runs once a
burst has been quiet for ``delay`` seconds, not per connection.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

from twisted.application.service import Service


def _load_malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


malloc_trim = _load_malloc_trim()


class HeapTrimmer:
    """``poke()`` on every connect and disconnect; trims ``delay`` s after the last one."""

    def __init__(self, clock, delay: float = 1.0, trim=malloc_trim):
        self.clock = clock
        self.delay = delay
        self.trim = trim
        self.trims = 0
        self._last = 0.0
        self._call = None

    def poke(self) -> None:
        if self.trim is None:
            return
        self._last = self.clock.seconds()
        if self._call is None:
            self._call = self.clock.callLater(self.delay, self._due)

    def _due(self) -> None:
        self._call = None
        quiet_at = self._last + self.delay
        now = self.clock.seconds()
        if now < quiet_at:
            self._call = self.clock.callLater(quiet_at - now, self._due)
            return
        self.trims += 1
        self.trim(0)

    def stop(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None


class FrozenStartup(Service):
    """
    Once the gateway runs, move every object alive (modules, classes, configuration: its
    start-up) out of the cyclic collector's reach (``gc.freeze``): a full collection then
    scans only what came after. Measured (bench/abuse.py, a gc callback in the gateway): a
    full collection of the start-up heap alone took 25-37 ms, and one during the HTTP/2
    flood from many addresses 86-87 ms, an honest push's stall each time. Undone on stop.
    """

    def __init__(self, clock, gc=gc):
        self.clock = clock
        self.gc = gc
        self._call = None
        self.frozen = 0

    def startService(self):
        super().startService()
        self._call = self.clock.callLater(0, self._freeze)  # after the listeners opened

    def _freeze(self):
        self._call = None
        self.gc.collect()
        self.gc.freeze()
        self.frozen = self.gc.get_freeze_count()

    def stopService(self):
        super().stopService()
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self.frozen:
            self.gc.unfreeze()
            self.frozen = 0
