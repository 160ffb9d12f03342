"""
The server side of the courier: one long-lived connection per device.

The protocol keeps the bytes: framing, the Connect proof (pushd/gateway/connect.py) and
deadlines. A verified Connect makes the device's Session (pushd/gateway/session.py), which
holds the delivery state (filter, messages in flight, acks) and is what the router talks to;
the protocol hands it the device's frames, and it answers through the protocol's ISender
surface (send, write, fail, close, paused, closing).
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from pushd import wire
from pushd.gateway.connect import ConnectRefused, ConnectVerifier, proof_of
from pushd.gateway.deadlines import DeadlineWheel
from pushd.gateway.heap import HeapTrimmer
from pushd.gateway.session import ISender, Sessions
from pushd.throttle import LogThrottle

#: Seconds a closed connection may take to finish its TLS close (close_notify both ways)
#: before it is aborted: a peer that never answers kept its fd until the silence deadline
#: (180 s). As the provider's HTTP/2 ABORT_AFTER, but on the deadline wheel (no timer).
ABORT_AFTER = 5.0


@implementer(ISender, IPushProducer)
class CourierServerProtocol(Protocol):
    log = Logger()

    # One idle connection is mostly this object: slots, no per-instance dict. Its delivery
    # state is in its Session, made only once its Connect is verified.
    __slots__ = (
        "factory", "transport", "connected", "decoder", "session", "paused", "_closing",
        "_deadline", "_wheelslot", "_proving", "pushd",
    )

    @property
    def authenticated(self) -> bool:
        """Its Connect was verified (pushd.admission stops pacing its reads)."""
        return self.device_id is not None

    def __init__(self):
        self.factory = None
        self.transport = None
        self.connected = 0
        self.decoder = wire.FrameDecoder()
        #: The device's Session once its Connect is verified; None before.
        self.session = None
        #: The transport's buffer is full (IPushProducer): the session sends nothing.
        self.paused = False
        self._closing = False
        #: When the connection counts as silent (factory clock), or None; watched by the
        #: factory's DeadlineWheel (one timer for all connections).
        self._deadline = None
        self._wheelslot = None
        #: While a Connect is being verified (a remote replay cache answers later): the
        #: bytes that came meanwhile (reading is paused), at most --connect-budget of them,
        #: handled once it is answered.
        self._proving = None
        #: The device is pushd's (its Connect carried field 32): it takes pushd's commands.
        self.pushd = False

    @property
    def peer(self) -> str:
        return str(self.transport.getPeer())

    @property
    def device_id(self):
        """The device its verified Connect proved, or None before."""
        session = self.session
        return None if session is None else session.device_id

    @property
    def closing(self) -> bool:
        """Closing, or the node draining (its session sends nothing more; acks still count)."""
        return self._closing or self.factory.drained is not None

    # --- connection life -----------------------------------------------------

    def connectionMade(self):
        f = self.factory
        # Called at accept, before the TLS handshake: handshake and Connect together must
        # fit in connect_timeout, and reads before Connect do not move it (dataReceived).
        self.setTimeout(f.connect_timeout)
        # Until Connect, a frame may be no larger than a real Connect needs.
        self.decoder.max_frame = f.connect_budget
        self.transport.registerProducer(self, True)
        f.churned()
        # Counted until Connect (or the end): pre-Connect connections cannot fill the
        # total cap, so connected devices always find room (--max-unauthenticated).
        f.unauthenticated += 1
        if f.unauthenticated > f.max_unauthenticated:
            self._closing = True
            f.preauth.note("over --max-unauthenticated", peer=self.peer)
            self.transport.abortConnection()

    def setTimeout(self, period):
        """Close the connection if it is silent for ``period`` seconds (None: never)."""
        f = self.factory
        if period is None:
            self._deadline = None
            f.deadlines.unwatch(self)
        else:
            self._deadline = f.clock.seconds() + period
            f.deadlines.watch(self)

    def connectionLost(self, reason):
        self.setTimeout(None)
        self._closing = True
        self.connected = 0
        self._proving = None
        f = self.factory
        f.churned()
        if self.session is None:
            f.unauthenticated -= 1
        else:
            self.session.ended()  # (quiet while the node drains: one summary line)
            if f.drained is not None:
                f.lost_while_draining(self)

    def timeoutConnection(self):
        if self._closing or self.factory.drained is not None:
            pass  # closed for a reason already logged; its TLS close did not finish in time
        elif self.session is None:
            # Anyone can open connections and stay silent: counted, one line a second.
            self.factory.preauth.note("no Connect within the connect deadline", peer=self.peer)
        else:
            self.log.info("closing silent connection {peer} (device {device})",
                          peer=self.peer, device=self.device_id)
        self.transport.abortConnection()

    def fail(self, reason: str):
        """Close for a protocol violation, with the reason in the log."""
        if self._closing:
            return
        self._closing = True
        self.factory.protocol_errors += 1
        if self.session is None:
            # Unauthenticated: counted, one line a second (not one per hostile connection).
            self.factory.preauth.note(reason, peer=self.peer)
            return self._close()
        self.log.warn(
            "closing {peer} (device {device}): {reason}",
            peer=self.peer,
            device=self.device_id,
            reason=reason,
        )
        self._close()

    def close(self, reason: str):
        """Close for the session's ``reason`` (replaced, revoked), which it has logged."""
        if self._closing:
            return
        self._closing = True
        self.log.debug("closing {peer} (device {device}): {reason}",
                       peer=self.peer, device=self.device_id, reason=reason)
        self._close()

    def _close(self):
        """Flush what was written (a refusing ConnectAck), then close; abort if that has
        not finished within ABORT_AFTER. TLS defers loseConnection while a producer is
        registered, so unregister first; and its close reads the peer's close_notify, so
        reading paused for a Connect being verified resumes."""
        if self._proving is not None:
            self._proving = None
            self.transport.resumeProducing()
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        if self.connected:
            self.setTimeout(ABORT_AFTER)

    def send(self, message: wire.Message):
        self.transport.write(message.encode())

    def write(self, data: bytes):
        self.transport.write(data)

    # --- bytes to frames to events --------------------------------------------

    def dataReceived(self, data):
        if self._closing:
            return
        proving = self._proving
        if proving is not None:
            # Reading is paused, but a read already under way still arrives.
            if len(proving) + len(data) > self.factory.connect_budget:
                return self.fail("over --connect-budget bytes while its Connect was verified")
            proving += data
            return
        session = self.session
        if session is not None:
            # Moves the deadline only; the wheel looks at it when its old one is due.
            # Before Connect it is absolute: bytes trickled one at a time held connections
            # open for ever when each of them moved it.
            f = self.factory
            self._deadline = f.clock.seconds() + f.silence_timeout
        frames = self.decoder.feed(data)
        try:
            for frame in frames:
                self.frameReceived(wire.parse(frame))
                if self._closing or self._proving is not None:
                    break
        except wire.WireError as e:
            if self.session is None:
                e = f"{e} (before Connect)"  # its limit there: --connect-budget
            self.fail(str(e))
        finally:
            # Closed here, not when the last reference goes: its finally keeps the bytes
            # not yet framed in the decoder before the held bytes are fed after them.
            frames.close()
        session = self.session  # (made in this read, if it carried the Connect)
        if session is not None:
            session.flush()  # the acks of this read, deleted together

    def frameReceived(self, msg):
        session = self.session
        if session is None:
            if not isinstance(msg, wire.Connect):
                return self.fail(f"{type(msg).__name__} before Connect")
            return self.connectReceived(msg)
        if type(msg) is wire.KeepAlive:
            # Liveness is the connection's business (its deadline moved on the read).
            return self.send(wire.KeepAliveAck())
        handler = getattr(session, f"handle_{type(msg).__name__}", None)
        if handler is None:
            return self.fail(f"unexpected {type(msg).__name__} from a device")
        handler(msg)

    # --- Connect ---------------------------------------------------------------------

    def connectReceived(self, msg: wire.Connect):
        d = self.factory.verifier.verify(msg, self.transport)
        if not d.called:  # a remote replay cache: hold what follows until it answers
            self._proving = bytearray()
            self.transport.pauseProducing()
        d.addCallbacks(self._verified, self._refused, (msg,))

    def _verified(self, device_id, msg):
        held, self._proving = self._proving, None
        if self._closing:
            return
        self._accept(device_id, msg, proof_of(msg))
        if held is not None:  # answered later: go on with what came meanwhile
            self.transport.resumeProducing()
            self.dataReceived(bytes(held))

    def _refused(self, failure):
        if not failure.check(ConnectRefused):
            self.log.failure("verifying a Connect failed", failure)
            reason = "Connect verification failed"
        else:
            reason = failure.value.reason
        if not self._closing:
            self._refuse(reason)

    def _refuse(self, reason: str):
        f = self.factory
        f.auth_failures += 1
        # The server time even in a refusal: a device whose clock is off by more than the
        # nonce window sets its next nonce by it (else it is refused for good).
        self.send(wire.ConnectAck(status=wire.STATUS_ERROR, max_message_size=0,
                                  unknown5=b"", capabilities=b"",
                                  server_time=int(f.clock.seconds() * 1000)))
        self.fail(f"Connect refused: {reason}")

    def _accept(self, device_id: str, msg: wire.Connect, proof: str):
        f = self.factory
        f.unauthenticated -= 1
        self.decoder.max_frame = wire.MAX_FRAME  # authenticated: the protocol's bound, not --connect-budget
        self.setTimeout(f.silence_timeout)
        ack = wire.ConnectAck(
            status=wire.STATUS_OK,
            token=f.router.base_token(device_id),
            max_message_size=wire.MAX_PAYLOAD,
            unknown5=b"",
            capabilities=b"",
            server_time=int(f.clock.seconds() * 1000),
        )
        if msg.pushd_version:
            self.pushd = True
            ack.keepalive_interval = f.keepalive_interval
        self.send(ack)
        self.session = f.sessions.open(device_id, self)
        self.log.info("device {device} connected from {peer} (Connect {proof})",
                      device=device_id, peer=self.peer, proof=proof)

    # --- IPushProducer: the transport's buffer ---------------------------------------

    def go_away(self, window_ms: int):
        """
        The gateway drains: nothing more is sent; a pushd device is told GoAway (reconnect
        now, within ``window_ms``) and, with nothing in flight, closed at once; with
        notifications in flight, it sends their acks and closes itself (the drain's timeout
        bounds that). Any other client is closed at once: what it has not acked stays
        stored. Return "waiting" (for its acks and its close), "told" (and closed),
        "closed", or None (closing already).
        """
        if self._closing:
            return None
        # Nothing more is sent from here: ``closing`` is true for the session now.
        told = self.session is not None and self.pushd
        if told:
            self.send(wire.GoAway(window_ms=window_ms))
            if self.unacked():
                return "waiting"
        self._closing = True
        self._close()
        return "told" if told else "closed"

    def unacked(self) -> int:
        """Notifications sent and not acked."""
        return 0 if self.session is None else self.session.unacked()

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        if self.session is not None:
            self.session.wake()

    def stopProducing(self):
        self._closing = True


def _log_preauth(counts, total, sample):
    CourierServerProtocol.log.warn(
        "closed {total} unauthenticated courier connections since the last line: {counts}"
        " (last from {peer})",
        total=total, counts=counts, peer=sample.get("peer"),
    )


class CourierFactory(Factory):
    protocol = CourierServerProtocol

    def __init__(
        self,
        router,
        ca_cert,
        clock=None,
        keepalive_interval: int = 60,
        grace: float = 3.0,
        connect_timeout: float = 10.0,
        window: int = 64,
        replay_cache=None,
        registry=None,
        connect_budget: int = 8192,
        max_unauthenticated: int = 4096,
    ):
        from twisted.internet import reactor

        self.router = router
        if registry is not None:
            # The router checks certificates against its registry; given here as before.
            router.registry = registry
        self.clock = clock or reactor
        #: The Connect proof: certificate, signature, registry (through the router), replay cache.
        self.verifier = ConnectVerifier(ca_cert, self.clock, router, replay_cache)
        self.keepalive_interval = keepalive_interval
        self.grace = grace
        #: Seconds from accept to a verified Connect (TLS handshake included), absolute.
        self.connect_timeout = connect_timeout
        #: The largest frame before Connect: a Connect is 490 bytes (EC P-256) to ~2 KiB
        #: (RSA-4096 certificate and signature); without it a trickled 32 KiB frame held
        #: ~86 KB a connection.
        self.connect_budget = min(connect_budget, wire.MAX_FRAME)
        #: Connections not yet past Connect at most; beyond, closed at once. They cannot
        #: fill --max-connections, so connected devices always find room.
        self.max_unauthenticated = max_unauthenticated
        self.unauthenticated = 0
        #: Closes of unauthenticated connections (deadline, budget, bad frames, refused
        #: Connects): counted by reason, logged at most once a second.
        self.preauth = LogThrottle(self.clock, _log_preauth)
        #: A connected device silent this long is closed.
        self.silence_timeout = keepalive_interval * grace
        #: The silence deadlines of all connections, on one timer.
        self.deadlines = DeadlineWheel(self.clock)
        #: Returns the heap's free pages to the OS once a burst of connections is over.
        self.heap = HeapTrimmer(self.clock)
        #: The devices' sessions: their window, the router and clock they share.
        self.sessions = Sessions(router, self.clock, window)
        #: While draining (drain()): counts for its summary line, else None.
        self.drained = None
        #: Draining: the connections whose acks are awaited (each closes itself after them).
        self._awaiting = set()
        self._drain_done = self._drain_timer = None
        self.protocol_errors = 0
        self.auth_failures = 0

    @property
    def window(self) -> int:
        return self.sessions.window

    @property
    def delivered(self) -> int:
        """Notifications acked by devices."""
        return self.sessions.delivered

    @property
    def retry_delay(self) -> float:
        """Seconds before a session reads its queue again after the store failed to answer."""
        return self.sessions.retry_delay

    @property
    def ca_cert(self):
        return self.verifier.ca_cert

    @property
    def registry(self):
        """The device registry (IDeviceRegistry) the router checks, or None: any
        certificate of the CA connects."""
        return self.router.registry

    @registry.setter
    def registry(self, registry):
        self.router.registry = registry

    @property
    def replay_cache(self):
        """Nonces of nonce-only Connects seen inside the window (IReplayCache)."""
        return self.verifier.replay_cache

    @replay_cache.setter
    def replay_cache(self, cache):
        self.verifier.replay_cache = cache

    def churned(self):
        """A connection came or went."""
        if self.numPorts:  # listening (not a factory driven by hand, nor one stopped)
            self.heap.poke()

    def drain(self, window: float, timeout: float):
        """
        The gateway stops (its listeners are closed): every connection is told to go
        (CourierServerProtocol.go_away). Fire with the counts (told, closed, unacked,
        aborted) once the devices whose acks are awaited have closed, those still open
        after ``timeout`` seconds aborted. Connections closed here are not waited for:
        their TLS close finishes meanwhile, or the reactor closes them at exit (waiting for
        17,000 peers to answer the close took seconds). Nothing is logged per connection.
        """
        self.drained = counts = {"told": 0, "closed": 0, "unacked": 0, "aborted": 0}
        self.sessions.quiet = True
        self._drain_done = done = defer.Deferred()
        window_ms = int(window * 1000)
        awaiting = self._awaiting
        for p in self.deadlines.members():
            what = p.go_away(window_ms)
            if what == "waiting":
                awaiting.add(p)
                counts["told"] += 1
            elif what is not None:
                counts[what] += 1
                counts["unacked"] += p.unacked()  # an APNs-style client's: sent again later
        self._drain_timer = self.clock.callLater(timeout, self._drain_late)
        if not awaiting:
            self._drained_all()
        return done

    def lost_while_draining(self, p):
        awaiting = self._awaiting
        if p in awaiting:
            awaiting.discard(p)
            self.drained["unacked"] += p.unacked()
            if not awaiting and self._drain_done is not None:
                self._drained_all()

    def _drain_late(self):
        self._drain_timer = None
        awaiting, self._awaiting = self._awaiting, set()
        for p in awaiting:
            self.drained["aborted"] += 1
            self.drained["unacked"] += p.unacked()
            p.transport.abortConnection()
        self._drained_all()

    def _drained_all(self):
        done, self._drain_done = self._drain_done, None
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        done.callback(self.drained)

    def stopFactory(self):
        # The last listener using this factory stopped: no timer may outlive it.
        self.deadlines.stop()
        self.heap.stop()
        self.preauth.stop()
        stop = getattr(self.replay_cache, "stop", None)
        if stop is not None:
            stop()
