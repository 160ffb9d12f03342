"""
SIGTERM: the gateway drains, then exits, losing nothing accepted.

twistd stops the services in reverse order of their start, all at once: by the time this
one (started first) stops, the listeners have stopped accepting. (A port's factory is
stopped a reactor turn later, Twisted's Port.loseConnection: the courier's deadline wheel,
which the drain reads for the connections, still holds them here.) Then, bounded by
``--drain-timeout``:

1. new provider requests are answered 503 Shutdown (the router), those under way are
   answered, then HTTP/2 connections get GOAWAY and HTTP/1.1 ones close;
2. pushd devices are told GoAway (reconnect now, within ``--drain-window``) and send the
   acks of what they hold; other clients are closed (their unacked messages stay stored);
3. the node's presence goes in one store call, not one per device;
4. once no store write is outstanding (enqueues answered, acks deleted), the store closes
   (SQLite's writer commits what it was given first), and one line says what happened.
"""

from __future__ import annotations

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger


class Drain(service.Service):
    log = Logger()

    def __init__(self, router, store, courier, site, clock, timeout: float = 5.0, window: float = 2.0):
        self.router = router
        self.store = store
        self.courier = courier
        self.site = site
        self.clock = clock
        self.timeout = timeout
        self.window = window

    def stopService(self):
        super().stopService()
        return self.drain()

    @defer.inlineCallbacks
    def drain(self):
        clock, router = self.clock, self.router
        started = clock.seconds()
        self.log.info("draining: at most {timeout:g} s", timeout=self.timeout)
        router.shutting_down = True
        courier = self.courier.drain(self.window, self.timeout) if self.courier is not None else defer.succeed({})
        provider = self.site.drain() if self.site is not None else defer.succeed(None)
        router.release_all()
        waiting = defer.gatherResults([courier, provider, router.settled()], consumeErrors=True)
        left = max(0.0, started + self.timeout - clock.seconds())
        timed_out = []
        waiting.addTimeout(left, clock, onTimeoutCancel=lambda r, t: timed_out.append(t))
        try:
            counts = (yield waiting)[0]
        except Exception:
            counts = self.courier.drained if self.courier is not None else {}
        # One reactor turn (a poll of the sockets) before the exit: the GoAways and TLS
        # closes just written leave Twisted's buffers for the kernel's, which sends them
        # after the process is gone.
        yield task.deferLater(clock, 0, lambda: None)
        yield self.store.close()
        self.log.info(
            "drained in {took:.2f} s{late}: {told} pushd devices told to reconnect within {window:g} s, "
            "{closed} other courier connections closed, {aborted} aborted, {unacked} sent messages "
            "unacked (kept stored); {writes} store writes unanswered; {providers} provider connections left",
            took=clock.seconds() - started, late=f" (--drain-timeout {self.timeout:g} s reached)" if timed_out else "",
            window=self.window, writes=router.writes,
            providers=len(self.site.channels) if self.site is not None else 0,
            told=counts.get("told", 0), closed=counts.get("closed", 0), aborted=counts.get("aborted", 0),
            unacked=counts.get("unacked", 0),
        )
