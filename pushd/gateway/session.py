"""
One device's delivery state on this node: its filter, the messages in flight, the pump
that reads its queue and sends, acks and declines.

The courier connection (pushd/gateway/courier.py) keeps the bytes: framing, the Connect
proof, deadlines. On a verified Connect it makes a Session, attaches it to the router
(which gives it its epoch), and hands it the device's frames after that. The session
answers through the connection's narrow ``ISender`` surface and reaches the store only
through the router. The router (and the cluster) talk to the session, never to the bytes.
"""

from __future__ import annotations

import random
from types import MappingProxyType

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from pushd import wire
from pushd.gateway.router import ISession
from pushd.gateway.tokens import TokenError
from pushd.store.interfaces import StoreUnavailable

#: Shared, read-only stand-ins for a session's empty containers: most devices idle with
#: nothing in flight, so the real dict/set exist only while they hold something (memory per
#: idle device, docs/benchmarks.md).
_NO_INFLIGHT = MappingProxyType({})
_NONE = frozenset()

#: The value of a message id in ``inflight`` once the device acked it: still counted in the
#: window, and never read as pending, until the store has deleted it (else a pump in between
#: sends it again). A marker rather than a second set: one container less per busy device.
_ACKING = object()

# The pump's state: not running, running, running and woken meanwhile (read again).
_IDLE, _PUMPING, _AGAIN = 0, 1, 2


class ISender(Interface):
    """What a session may do with its connection (CourierServerProtocol)."""

    paused = Attribute("True while the transport's buffer is full: nothing more is sent.")
    closing = Attribute("True once the connection is closing: nothing more is sent.")

    def send(message):
        """Write one frame (a wire message)."""

    def write(data):
        """Write frames already encoded, in one write (one TLS record for a batch)."""

    def fail(reason):
        """Close the connection for a protocol violation (counted, logged as a warning)."""

    def close(reason):
        """Close the connection; the session has logged why."""


class Sessions:
    """What the sessions of one courier share, and count: the router, the clock, the window."""

    #: Seconds before a session reads its queue again after the store failed to answer.
    retry_delay = 1.0

    def __init__(self, router, clock, window: int = 64):
        self.router = router
        self.clock = clock
        #: Messages in flight (sent, not yet acked) per device, at most.
        self.window = window
        #: Notifications acked by devices.
        self.delivered = 0
        #: The node drains: no line per ended session (one summary line, pushd.gateway.drain).
        self.quiet = False

    def open(self, device_id: str, sender) -> Session:
        """The session of a device whose Connect was verified, attached to the router."""
        session = Session(self, sender, device_id)
        self.router.attach(device_id, session)
        return session


@implementer(ISession)
class Session:
    log = Logger()

    # One per connected device, idle for most of its life: slots, shared empty containers.
    __slots__ = ("host", "sender", "device_id", "epoch", "topics", "inflight", "declined", "_acked", "_state")

    def __init__(self, host: Sessions, sender, device_id: str):
        self.host = host
        #: The connection (ISender); None once it is gone.
        self.sender = sender
        self.device_id = device_id
        #: Given by Router.attach.
        self.epoch = 0
        self.topics = _NONE
        #: message id -> stored message, sent and not yet acked (or _ACKING: being deleted).
        self.inflight = _NO_INFLIGHT
        #: Message ids the device declined on this connection (its app is away and its
        #: queue full); kept in the store, not offered again until the next Filter.
        self.declined = _NONE
        #: Acked message ids of the connection's current read, deleted together (flush).
        self._acked = None
        self._state = _IDLE

    # --- the connection's side -------------------------------------------------

    def flush(self):
        """The connection's read is done: delete what it acked, in one store call (one
        transaction, one script)."""
        if not self._acked:
            return
        mids, self._acked = self._acked, None

        def deleted(result):
            for mid in mids:
                self._forget(mid)
            self.wake()

        self.host.router.ack_many(self.device_id, mids).addErrback(
            lambda f: self.log.failure("deleting acked messages failed", f)
        ).addBoth(deleted)

    def ended(self):
        """The connection is gone: detach from the router; what is in flight stays stored."""
        self.sender = None
        self.host.router.detach(self.device_id, self)
        if not self.host.quiet:
            self.log.info("device {device} disconnected ({inflight} unacked kept)",
                          device=self.device_id, inflight=self.unacked())

    def unacked(self) -> int:
        """Messages sent and not acked (acked ones being deleted not counted)."""
        return sum(1 for m in self.inflight.values() if m is not _ACKING)

    def _sending(self):
        """The sender if the session may send now, else None."""
        sender = self.sender
        if sender is None or sender.closing or sender.paused:
            return None
        return sender

    # --- frames from the device ------------------------------------------------------

    def handle_Filter(self, msg: wire.Filter):
        self.topics = frozenset(msg.enabled) | frozenset(msg.opportunistic)
        self.declined = _NONE
        self.wake()

    def handle_ScopedToken(self, msg: wire.ScopedToken):
        router = self.host.router
        try:
            token = router.scoped_token(self.device_id, msg.topic)
        except TokenError:
            return self.sender.fail("ScopedToken topic is not a SHA-1 hash")

        def answer(_):
            sender = self.sender
            if sender is not None and not sender.closing:
                sender.send(wire.ScopedTokenAck(status=wire.STATUS_OK, scoped_token=token, topic=msg.topic))

        # Registering (again) makes the token valid, even if an earlier unregister invalidated it.
        router.revalidate(token).addErrback(
            lambda f: self.log.warn("revalidating a token failed: {why}", why=f.getErrorMessage())
        ).addCallback(answer)

    def handle_Unregister(self, msg: wire.Unregister):
        router = self.host.router
        try:
            token = router.scoped_token(self.device_id, msg.topic)
        except TokenError:
            return self.sender.fail("Unregister topic is not a SHA-1 hash")
        if token != msg.token:
            return self.sender.fail("Unregister names a token that is not this device's")
        self.log.info("device {device} unregistered a topic", device=self.device_id)
        router.invalidate(token, self.host.clock.seconds()).addErrback(
            lambda f: self.log.warn("invalidating a token failed: {why}", why=f.getErrorMessage())
        )

    def handle_NotificationAck(self, msg: wire.NotificationAck):
        mid = msg.message_id
        inflight = self.inflight
        m = inflight.get(mid)
        if m is None or m is _ACKING:
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
        self.host.delivered += 1
        # It stays in flight until the store has deleted it: a pump in between would
        # read it as pending and send it again.
        inflight[mid] = _ACKING
        if self._acked is None:
            self._acked = []
        self._acked.append(mid)

    def handle_Notification(self, msg: wire.Notification):
        # Device-to-server notifications are not a pushd service.
        self.sender.send(wire.NotificationAck(message_id=msg.message_id, status=wire.STATUS_NOT_ALLOWED))

    def handle_SetState(self, msg):
        pass

    def handle_NoStorage(self, msg):
        pass

    def _forget(self, mid):
        inflight = self.inflight
        if mid in inflight:
            del inflight[mid]
            if not inflight:
                self.inflight = _NO_INFLIGHT

    # --- ISession: the router's side -----------------------------------------------

    def wants(self, topic_hash):
        return topic_hash in self.topics

    def replaced(self):
        self.log.info("session of {device} replaced by a newer connection", device=self.device_id)
        if self.sender is not None:
            self.sender.close("replaced by a newer connection")

    def revoked(self):
        self.log.info("device {device} revoked: closing its session", device=self.device_id)
        if self.sender is not None:
            self.sender.close("device revoked")

    def wake(self):
        if self._state:
            self._state = _AGAIN
            return
        self._pump()

    @defer.inlineCallbacks
    def _pump(self):
        host = self.host
        self._state = _PUMPING
        try:
            while self.topics and self._sending() is not None:
                room = host.window - len(self.inflight)
                if room <= 0:
                    break
                self._state = _PUMPING
                limit = room + len(self.inflight) + len(self.declined)
                batch = yield host.router.pending(self.device_id, self.topics, limit)
                sender = self.sender
                if sender is None or sender.closing:
                    break
                inflight = self.inflight
                declined = self.declined
                window = host.window
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
                    sender.write(b"".join(frames))
                elif self._state != _AGAIN:
                    break
                if len(batch) < limit and self._state != _AGAIN:
                    # The store had no more than this; whatever arrives later wakes us.
                    break
        except StoreUnavailable as e:
            # Nothing is lost (it stays stored), but nothing else may wake this device
            # soon: look again shortly rather than leave its queue until it reconnects.
            self.log.warn("reading {device}'s queue failed ({why}); retrying in {delay} s",
                          device=self.device_id, why=str(e), delay=host.retry_delay)
            # Jittered: the devices that failed together must not come back together.
            host.clock.callLater(host.retry_delay * random.uniform(0.5, 1.5), self.wake)
        except Exception:
            self.log.failure("pushing to {device} failed", device=self.device_id)
        finally:
            self._state = _IDLE
