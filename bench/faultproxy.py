"""
A TCP proxy that breaks connections on purpose, for the fault suite (``bench/faults.py``).

One ``FaultProxy`` listens for one device and dials the gateway for each connection it
accepts; the bytes (TLS records, end to end between device and gateway) go through a
``Pipe``. A fault is applied to a live pipe:

- ``drop``: both sides closed cleanly (FIN);
- ``reset``: both sides closed with RST (SO_LINGER 0, then abort);
- ``delay``: bytes in both directions held for a while, then released in order;
- ``truncate``: the next chunk, whichever direction, forwarded only in part, then both closed;
- ``blackhole``: nothing forwarded any more and nothing closed: each end finds out by itself
  (the device by its keepalive, the gateway by its silence timeout or a newer session).
"""

from __future__ import annotations

import socket
import struct

from twisted.internet import defer, protocol
from twisted.logger import Logger

PASS, DELAY, BLACKHOLE = "pass", "delay", "blackhole"
#: Bytes a pipe may hold (dialling, or delayed) before it gives up the connection: a device
#: connection carries a few KiB a second here, so this is never reached in a sane run.
MAX_HELD = 1 << 20


class _End(protocol.Protocol):
    """One socket of a pipe: ``device`` (accepted) or ``gateway`` (dialled)."""

    def __init__(self, pipe, name):
        self.pipe = pipe
        self.name = name
        self.up = False
        self.gone = False

    def connectionMade(self):
        self.up = True
        self.pipe.made(self)

    def dataReceived(self, data):
        self.pipe.forward(self, data)

    def connectionLost(self, reason):
        self.up = False
        self.gone = True
        self.pipe.lost(self)


class Pipe:
    def __init__(self, proxy):
        self.proxy = proxy
        self.device = _End(self, "device")
        self.gateway = _End(self, "gateway")
        self.mode = PASS
        #: (destination end, bytes or None for "close it") not yet written: while the gateway
        #: side is being dialled, or while delayed.
        self.held: list = []
        self.held_bytes = 0
        self.swallowed = 0
        self._truncate = None
        self._truncate_from = None
        self.closed = False

    def other(self, end):
        return self.gateway if end is self.device else self.device

    @property
    def live(self) -> bool:
        return not self.closed and self.mode == PASS and self.device.up and self.gateway.up

    # --- events ---------------------------------------------------------------------

    def made(self, end):
        if end is self.device:
            f = protocol.ClientFactory.forProtocol(lambda: self.gateway)
            f.clientConnectionFailed = lambda c, reason: self._abort(self.device)
            self.proxy.reactor.connectTCP(self.proxy.host, self.proxy.port, f, timeout=5)
        elif self.mode == PASS:
            self._flush()

    def forward(self, src, data):
        if self.closed and self.mode != BLACKHOLE:
            return
        dst = self.other(src)
        if self.mode == BLACKHOLE:
            self.swallowed += len(data)
            return
        if self._truncate is not None and len(data) >= 2 and self._truncate_from in (None, src.name):
            d, self._truncate = self._truncate, None
            cut = self.proxy.rng.randint(1, len(data) - 1)
            self._write(dst, data[:cut])
            self.close()
            d.callback(f"{src.name}->{dst.name} {cut} of {len(data)} bytes")
            return
        self._write(dst, data)

    def lost(self, end):
        other = self.other(end)
        if self.mode == BLACKHOLE:
            # The other end hears nothing: that is the fault.
            if other.gone:
                self._finished()
            return
        if not other.gone:
            self._write(other, None)
        if other.gone or not other.up:
            self._finished()

    # --- writing -----------------------------------------------------------------------

    def _write(self, dst, data):
        """``data`` None: close ``dst`` once what is ahead of it has been written."""
        if self.mode == DELAY or not dst.up or self.held:
            if dst.gone:
                return
            self.held.append((dst, data))
            self.held_bytes += len(data or b"")
            if self.held_bytes > MAX_HELD:
                self.proxy.log.warn("pipe held over {n} bytes; aborting it", n=MAX_HELD)
                self.abort()
            return
        if dst.gone:
            return
        if data is None:
            dst.transport.loseConnection()
        else:
            dst.transport.write(data)

    def _flush(self):
        held, self.held, self.held_bytes = self.held, [], 0
        for i, (dst, data) in enumerate(held):
            if not dst.up:
                # Still dialling: keep the rest in order.
                self.held = held[i:]
                self.held_bytes = sum(len(d or b"") for _, d in self.held)
                return
            self._write(dst, data)

    # --- faults --------------------------------------------------------------------------

    def close(self):
        """Both sides closed with a FIN, after what was already written."""
        self.closed = True
        for end in (self.device, self.gateway):
            if end.up:
                end.transport.loseConnection()

    def _abort(self, end):
        if end.up:
            end.transport.abortConnection()

    def abort(self):
        self.closed = True
        for end in (self.device, self.gateway):
            self._abort(end)

    def reset(self):
        """Both sides closed with an RST: SO_LINGER 0 makes close() send one."""
        self.closed = True
        for end in (self.device, self.gateway):
            if end.up:
                try:
                    end.transport.getHandle().setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except (AttributeError, OSError):
                    pass
                end.transport.abortConnection()

    def delay(self, seconds):
        """Hold everything for ``seconds``, then release it in order; fires then."""
        self.mode = DELAY
        d = defer.Deferred()

        def release():
            self.mode = PASS
            self._flush()
            d.callback(None)

        self.proxy.reactor.callLater(seconds, release)
        return d

    def truncate(self, source=None):
        """Fire with a description once the next chunk from ``source`` ("device",
        "gateway" or None: either) was cut (cancel to disarm)."""

        def disarm(_):
            self._truncate = None

        self._truncate = defer.Deferred(disarm)
        self._truncate_from = source
        return self._truncate

    def blackhole(self):
        self.mode = BLACKHOLE
        self.held, self.held_bytes = [], 0

    def _finished(self):
        self.closed = True
        if self in self.proxy.pipes:
            self.proxy.pipes.remove(self)


class FaultProxy(protocol.Factory):
    """Accepts a device's connections and pipes each to ``host:port``."""

    log = Logger()

    def __init__(self, reactor, host, port, rng):
        self.reactor = reactor
        self.host = host
        self.port = port
        self.rng = rng
        self.pipes: list = []

    def buildProtocol(self, addr):
        pipe = Pipe(self)
        self.pipes.append(pipe)
        return pipe.device

    def live(self):
        """The newest pipe that is up and passing bytes, or None."""
        for pipe in reversed(self.pipes):
            if pipe.live:
                return pipe
        return None
