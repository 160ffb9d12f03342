"""
Accept -> persist -> wake. The provider API hands notifications here; the courier
connections register here. A wake carries no payload: the connection reads what is
pending from the store, so a device that connects between persist and wake loses nothing.
"""

from __future__ import annotations

import time
import uuid

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Interface

from pushd import wire
from pushd.gateway.tokens import TokenError
from pushd.store.interfaces import StoredMessage, StoreUnavailable


class Rejected(Exception):
    """A provider request refused with an APNs status and reason (and extra JSON fields)."""

    def __init__(self, status: int, reason: str, **extra):
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.extra = extra


class ISession(Interface):
    """A device's live courier connection, as the router sees it."""

    def wake():
        """Something new may be pending for this device."""

    def replaced():
        """Another connection of the same device took over; go away."""

    def wants(topic_hash):
        """True if the device has enabled this topic (Filter)."""


class Router:
    log = Logger()

    def __init__(self, store, tokens, clock=None, node="local"):
        self.store = store
        self.tokens = tokens
        self._clock = clock
        self.node = node
        self.sessions: dict = {}
        self.accepted = 0
        self.dropped_offline = 0
        #: Set when the gateway stops: providers get 503 Shutdown and go elsewhere.
        self.shutting_down = False

    def now(self) -> float:
        return self._clock.seconds() if self._clock is not None else time.time()

    # --- presence ---------------------------------------------------------------

    def attach(self, device_id: str, session) -> None:
        old = self.sessions.get(device_id)
        self.sessions[device_id] = session
        if old is not None and old is not session:
            self.log.info("device {device} reconnected: closing its old session", device=device_id)
            old.replaced()
        self.store.claim(device_id, self.node).addErrback(self._presence_failed, device_id)

    def detach(self, device_id: str, session) -> None:
        if self.sessions.get(device_id) is session:
            del self.sessions[device_id]
            self.store.release(device_id, self.node).addErrback(self._presence_failed, device_id)

    def _presence_failed(self, failure, device_id):
        self.log.warn("presence of {device} not recorded: {why}", device=device_id, why=failure.getErrorMessage())

    # --- the provider side ------------------------------------------------------

    @defer.inlineCallbacks
    def accept(
        self,
        token: bytes,
        topic: str,
        payload: bytes,
        apns_id: uuid.UUID,
        expiry: int = 0,
        priority: int = 10,
        collapse_id: str | None = None,
    ):
        if self.shutting_down:
            raise Rejected(503, "Shutdown")
        try:
            device_id, _ = self.tokens.resolve(token, topic)
        except TokenError as e:
            raise Rejected(400, e.reason)
        try:
            since = yield self.store.invalidated(token)
        except StoreUnavailable as e:
            self.log.warn("store unavailable: {why}", why=str(e))
            raise Rejected(503, "ServiceUnavailable")
        if since is not None:
            raise Rejected(410, "Unregistered", timestamp=int(since * 1000))
        th = wire.topic_hash(topic)
        now = self.now()
        if expiry and expiry < now:
            # Already expired: APNs accepts and never delivers it.
            return
        session = self.sessions.get(device_id)
        if expiry == 0 and (session is None or not session.wants(th)):
            self.dropped_offline += 1
            self.log.debug("device {device} not reachable now; expiration 0 drops", device=device_id)
            return
        message = StoredMessage(
            message_id=apns_id.bytes,
            device_id=device_id,
            token=token,
            topic=topic,
            topic_hash=th,
            payload=payload,
            expiry=expiry,
            priority=priority,
            collapse_id=collapse_id,
            received=now,
        )
        try:
            yield self.store.enqueue(message)
        except StoreUnavailable as e:
            self.log.warn("store unavailable: {why}", why=str(e))
            raise Rejected(503, "ServiceUnavailable")
        self.accepted += 1
        session = self.sessions.get(device_id)
        if session is not None:
            session.wake()

    # --- the courier side -------------------------------------------------------

    def pending(self, device_id: str, topic_hashes, limit: int):
        return self.store.pending(device_id, topic_hashes, limit, self.now())

    def ack(self, device_id: str, message_id: bytes):
        return self.store.ack(device_id, message_id)
