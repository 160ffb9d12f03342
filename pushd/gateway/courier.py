"""
The server side of the courier: one long-lived connection per device.

The protocol turns bytes into frames and frames into calls on the router; it holds only
the connection's own state (identity, filter, messages in flight).
"""

from __future__ import annotations

import random

from types import MappingProxyType

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from pushd import wire
from pushd.gateway.connect import ConnectRefused, ConnectVerifier, proof_of
from pushd.gateway.deadlines import DeadlineWheel
from pushd.gateway.heap import HeapTrimmer
from pushd.gateway.router import ISession
from pushd.gateway.tokens import TokenError
from pushd.store.interfaces import StoreUnavailable
from pushd.throttle import LogThrottle

#: Shared, read-only stand-ins for a connection's empty containers: most connections idle
#: with nothing in flight, so the real dict/sets exist only while they hold something.
_NO_INFLIGHT = MappingProxyType({})
_NONE = frozenset()

#: Seconds a closed connection may take to finish its TLS close (close_notify both ways)
#: before it is aborted: a peer that never answers kept its fd until the silence deadline
#: (180 s). As the provider's HTTP/2 ABORT_AFTER, but on the deadline wheel (no timer).
ABORT_AFTER = 5.0


@implementer(ISession, IPushProducer)
class CourierServerProtocol(Protocol):
    log = Logger()

    # One idle connection is mostly this object: slots, no per-instance dict.
    __slots__ = (
        "factory", "transport", "connected", "decoder", "device_id", "base_token", "topics",
        "inflight", "declined", "_acking", "paused", "_pumping", "_again", "_closing",
        "_deadline", "_wheelslot", "_acked", "_proving",
        "epoch",  # set by router.attach: kicks from other nodes name it
    )

    def __init__(self):
        self.factory = None
        self.transport = None
        self.connected = 0
        self.decoder = wire.FrameDecoder()
        self.device_id = None
        self.base_token = None
        self.topics = _NONE
        #: message id -> stored message, sent and not yet acked (or being deleted).
        self.inflight = _NO_INFLIGHT
        #: Message ids the device declined on this connection (its app is away and its
        #: queue full); kept in the store, not offered again until the next Filter.
        self.declined = _NONE
        self._acking = _NONE
        self.paused = False
        self._pumping = False
        self._again = False
        self._closing = False
        #: When the connection counts as silent (factory clock), or None; watched by the
        #: factory's DeadlineWheel (one timer for all connections).
        self._deadline = None
        self._wheelslot = None
        #: Acked message ids read in this dataReceived, deleted together at its end.
        self._acked = None
        #: While a Connect is being verified (a remote replay cache answers later): the
        #: bytes that came meanwhile (reading is paused), at most --connect-budget of them,
        #: handled once it is answered.
        self._proving = None
        self.epoch = None

    @property
    def peer(self) -> str:
        return str(self.transport.getPeer())

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
        self.factory.churned()
        if self.device_id is None:
            self.factory.unauthenticated -= 1
        else:
            self.factory.router.detach(self.device_id, self)
            self.log.info(
                "device {device} disconnected ({inflight} unacked kept)",
                device=self.device_id,
                inflight=len(self.inflight) - len(self._acking),
            )

    def timeoutConnection(self):
        if self._closing:
            pass  # closed for a reason already logged; its TLS close did not finish in time
        elif self.device_id is None:
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
        if self.device_id is None:
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
        if self.device_id is not None:
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
            if self.device_id is None:
                e = f"{e} (before Connect)"  # its limit there: --connect-budget
            self.fail(str(e))
        finally:
            # Closed here, not when the last reference goes: its finally keeps the bytes
            # not yet framed in the decoder before the held bytes are fed after them.
            frames.close()
        if self._acked:
            self._delete_acked()

    def frameReceived(self, msg):
        if self.device_id is None:
            if not isinstance(msg, wire.Connect):
                return self.fail(f"{type(msg).__name__} before Connect")
            return self.connectReceived(msg)
        handler = getattr(self, f"handle_{type(msg).__name__}", None)
        if handler is None:
            return self.fail(f"unexpected {type(msg).__name__} from a device")
        handler(msg)

    # --- handlers ----------------------------------------------------------------

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
        self.device_id = device_id
        f.unauthenticated -= 1
        self.decoder.max_frame = wire.MAX_FRAME  # authenticated: the protocol's bound, not --connect-budget
        self.base_token = f.router.tokens.base_token(device_id)
        self.setTimeout(f.silence_timeout)
        ack = wire.ConnectAck(
            status=wire.STATUS_OK,
            token=self.base_token,
            max_message_size=wire.MAX_PAYLOAD,
            unknown5=b"",
            capabilities=b"",
            server_time=int(f.clock.seconds() * 1000),
        )
        if msg.pushd_version:
            ack.keepalive_interval = f.keepalive_interval
        self.send(ack)
        f.router.attach(device_id, self)
        self.log.info("device {device} connected from {peer} (Connect {proof})",
                      device=device_id, peer=self.peer, proof=proof)

    def handle_Filter(self, msg: wire.Filter):
        self.topics = frozenset(msg.enabled) | frozenset(msg.opportunistic)
        self.declined = _NONE
        self.wake()

    def handle_ScopedToken(self, msg: wire.ScopedToken):
        try:
            token = self.factory.router.tokens.scoped_token(self.device_id, msg.topic)
        except TokenError:
            return self.fail("ScopedToken topic is not a SHA-1 hash")

        def answer(_):
            if not self._closing:
                self.send(wire.ScopedTokenAck(status=wire.STATUS_OK, scoped_token=token, topic=msg.topic))

        # Registering (again) makes the token valid, even if an earlier unregister invalidated it.
        self.factory.router.revalidate(token).addErrback(
            lambda f: self.log.warn("revalidating a token failed: {why}", why=f.getErrorMessage())
        ).addCallback(answer)

    def handle_Unregister(self, msg: wire.Unregister):
        try:
            token = self.factory.router.tokens.scoped_token(self.device_id, msg.topic)
        except TokenError:
            return self.fail("Unregister topic is not a SHA-1 hash")
        if token != msg.token:
            return self.fail("Unregister names a token that is not this device's")
        self.log.info("device {device} unregistered a topic", device=self.device_id)
        self.factory.router.invalidate(token, self.factory.clock.seconds()).addErrback(
            lambda f: self.log.warn("invalidating a token failed: {why}", why=f.getErrorMessage())
        )

    def handle_NotificationAck(self, msg: wire.NotificationAck):
        mid = msg.message_id
        if mid not in self.inflight or mid in self._acking:
            self.log.debug("ack for unknown message from {device}", device=self.device_id)
            return
        if msg.status != wire.STATUS_OK:
            # Not taken: it stays stored, and is offered again after the next Filter.
            self._forget(mid)
            if not self.declined:
                self.declined = set()
            self.declined.add(mid)
            self.wake()
            return
        self.factory.delivered += 1
        # It stays in flight until the store has deleted it: a pump in between would
        # read it as pending and send it again.
        if not self._acking:
            self._acking = set()
        self._acking.add(mid)
        if self._acked is None:
            self._acked = []
        self._acked.append(mid)

    def _delete_acked(self):
        """The acks of one read, deleted in one store call (one transaction, one script)."""
        mids, self._acked = self._acked, None

        def deleted(result):
            acking = self._acking
            for mid in mids:
                if acking:
                    acking.discard(mid)
                self._forget(mid)
            if not acking:
                self._acking = _NONE
            self.wake()

        self.factory.router.ack_many(self.device_id, mids).addErrback(
            lambda f: self.log.failure("deleting acked messages failed", f)
        ).addBoth(deleted)

    def _forget(self, mid):
        inflight = self.inflight
        if mid in inflight:
            del inflight[mid]
            if not inflight:
                self.inflight = _NO_INFLIGHT

    def handle_Notification(self, msg: wire.Notification):
        # Device-to-server notifications are not a pushd service.
        self.send(wire.NotificationAck(message_id=msg.message_id, status=wire.STATUS_NOT_ALLOWED))

    def handle_KeepAlive(self, msg):
        self.send(wire.KeepAliveAck())

    def handle_SetState(self, msg):
        pass

    def handle_NoStorage(self, msg):
        pass

    # --- pushing -----------------------------------------------------------------

    def wants(self, topic_hash):
        return topic_hash in self.topics

    def replaced(self):
        self.log.info("session of {device} replaced by a newer connection", device=self.device_id)
        self._closing = True
        self._close()

    def revoked(self):
        self.log.info("device {device} revoked: closing its session", device=self.device_id)
        self._closing = True
        self._close()

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        self.wake()

    def stopProducing(self):
        self._closing = True

    def wake(self):
        if self._pumping:
            self._again = True
            return
        self._pump()

    @defer.inlineCallbacks
    def _pump(self):
        f = self.factory
        self._pumping = True
        try:
            while not (self._closing or self.paused) and self.topics:
                room = f.window - len(self.inflight)
                if room <= 0:
                    break
                self._again = False
                limit = room + len(self.inflight) + len(self.declined)
                batch = yield f.router.pending(self.device_id, self.topics, limit)
                if self._closing:
                    break
                inflight = self.inflight
                declined = self.declined
                window = f.window
                frames = []
                for m in batch:
                    if len(inflight) >= window:
                        break
                    mid = m.message_id
                    if mid in inflight or mid in declined:
                        continue
                    if not inflight:
                        inflight = self.inflight = {}
                    inflight[mid] = m
                    frames.append(
                        wire.encode_notification(
                            m.token, m.topic_hash, m.payload, mid,
                            m.expiry or None, int(m.received * 1e9), m.priority,
                        )
                    )
                if frames:
                    # One write per pass: one TLS record and one send for the batch, not
                    # one per notification.
                    self.transport.write(b"".join(frames))
                elif not self._again:
                    break
                if len(batch) < limit and not self._again:
                    # The store had no more than this; whatever arrives later wakes us.
                    break
        except StoreUnavailable as e:
            # Nothing is lost (it stays stored), but nothing else may wake this device
            # soon: look again shortly rather than leave its queue until it reconnects.
            self.log.warn("reading {device}'s queue failed ({why}); retrying in {delay} s",
                          device=self.device_id, why=str(e), delay=self.factory.retry_delay)
            # Jittered: the devices that failed together must not come back together.
            self.factory.clock.callLater(self.factory.retry_delay * random.uniform(0.5, 1.5), self.wake)
        except Exception:
            self.log.failure("pushing to {device} failed", device=self.device_id)
        finally:
            self._pumping = False


def _log_preauth(counts, total, sample):
    CourierServerProtocol.log.warn(
        "closed {total} unauthenticated courier connections since the last line: {counts}"
        " (last from {peer})",
        total=total, counts=counts, peer=sample.get("peer"),
    )


class CourierFactory(Factory):
    protocol = CourierServerProtocol
    #: Seconds before a connection reads its queue again after the store failed to answer.
    retry_delay = 1.0

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
        self.window = window
        self.protocol_errors = 0
        self.auth_failures = 0
        self.delivered = 0

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

    def stopFactory(self):
        # The last listener using this factory stopped: no timer may outlive it.
        self.deadlines.stop()
        self.heap.stop()
        self.preauth.stop()
        stop = getattr(self.replay_cache, "stop", None)
        if stop is not None:
            stop()
