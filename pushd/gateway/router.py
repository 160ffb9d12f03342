"""
Accept -> persist -> wake. The provider API hands notifications here; the devices'
sessions (ISession, pushd/gateway/session.py) attach here. A wake carries no payload: the
session reads what is pending from the store, so a device that connects between persist
and wake loses nothing. Refusals are domain errors (pushd/gateway/errors.py); their HTTP
statuses are the provider API's business. The courier reaches the store and the tokens
through the router only.
"""

from __future__ import annotations

import itertools
import time
import uuid

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Attribute, Interface

from pushd import wire
from pushd.gateway.errors import BadToken, ShuttingDown, StoreDown, Unregistered
from pushd.gateway.tokens import TokenError
from pushd.store.interfaces import StoredMessage, StoreUnavailable


class ISession(Interface):
    """
    A device's live delivery state on this node (pushd.gateway.session.Session), as the
    router (and the cluster) sees it. The courier connection creates one per verified
    Connect and attaches it; the router wakes it when something is stored for its device,
    and closes it when another connection of the device takes over or the device is revoked.
    """

    device_id = Attribute("The device this session delivers to (hex of its certificate's id).")
    epoch = Attribute(
        "Set by Router.attach: an int, larger for each attach on this node. Tells an older "
        "session of a device from a newer one (a kick names the epoch it closes).")

    def wake():
        """Something new may be pending for this device: read the store and send."""

    def replaced():
        """Another connection of the same device took over; go away."""

    def wants(topic_hash):
        """True if the device has enabled this topic (Filter)."""

    def revoked():
        """The device was revoked (``pushctl device revoke``): close at once."""


class Router:
    log = Logger()

    def __init__(self, store, tokens, clock=None, node="local", registry=None):
        self.store = store
        #: The device registry (IDeviceRegistry): pushes to revoked devices are refused (Unregistered).
        self.registry = registry
        self.tokens = tokens
        self._clock = clock
        self.node = node
        #: The cluster hook (pushd.gateway.cluster.Node): wakes and kicks for other nodes.
        self.cluster = None
        # Session epochs: from the start time in ms, so that a node restarted under the same
        # --node-id never reuses one (a stale kick must not close a new session).
        self._epochs = itertools.count(int(self.now() * 1000))
        #: device id -> its ISession on this node.
        self.sessions: dict = {}
        self.accepted = 0
        self.dropped_offline = 0
        #: Set when the gateway stops: pushes are refused (ShuttingDown), providers go elsewhere.
        self.shutting_down = False
        #: Set by release_all (the drain): sessions leaving no longer release one by one.
        self.released = False
        #: Store writes (enqueues, acks) not yet answered, and who waits for none (drain).
        self.writes = 0
        self._settled: list = []

    def now(self) -> float:
        return self._clock.seconds() if self._clock is not None else time.time()

    # --- presence ---------------------------------------------------------------

    def attach(self, device_id: str, session) -> None:
        """``session`` (ISession) is now the device's live session here; it gets its epoch,
        and an older session of the device is closed."""
        session.epoch = next(self._epochs)
        old = self.sessions.get(device_id)
        self.sessions[device_id] = session
        if old is not None and old is not session:
            self.log.info("device {device} reconnected: closing its old session", device=device_id)
            old.replaced()
        self._claim(device_id, session)

    def detach(self, device_id: str, session) -> None:
        if self.sessions.get(device_id) is session:
            del self.sessions[device_id]
            if not self.released:
                self._release(device_id, session)

    # --- the drain ------------------------------------------------------------------

    def release_all(self):
        """The node drains: its presence goes in one store call, and the sessions closing
        after it release nothing (a release and a log line per device made closing 17,000
        devices take 10.7 s)."""
        self.released = True
        devices = list(self.sessions)

        def failed(f):
            self.log.warn("presence of this node ({node}) not released: {why}", node=self.node,
                          why=f.getErrorMessage())

        return self._write(self.store.release_all(self.node, devices)).addErrback(failed)

    def _write(self, d):
        """Count a store write until it is answered (the drain waits for them)."""
        self.writes += 1
        return d.addBoth(self._written)

    def _written(self, result):
        self.writes -= 1
        if not self.writes:
            waiters, self._settled = self._settled, []
            for w in waiters:
                w.callback(None)
        return result

    def settled(self):
        """Fire once no store write is outstanding."""
        if not self.writes:
            return defer.succeed(None)
        d = defer.Deferred()
        self._settled.append(d)
        return d

    def revoked(self, device_ids) -> None:
        """Close the live sessions of devices just revoked (their Connect is refused from now on)."""
        for device_id in device_ids:
            session = self.sessions.get(device_id)
            if session is not None:
                session.revoked()

    def certificate_refused(self, cert_der: bytes, device_id: str, now: float):
        """Why the device registry refuses this certificate for a Connect, or None (also
        without a registry: then any certificate of the CA connects)."""
        if self.registry is None:
            return None
        why = self.registry.check(cert_der, device_id, now)
        return None if why is None else str(why)

    # --- the cluster: presence, wakes and kicks across nodes ------------------------------

    def _claim(self, device_id, session):
        d = self.store.claim(device_id, self.node, session.epoch)
        d.addCallbacks(self._claimed, self._presence_failed, (device_id,), {}, (device_id,))

    def _claimed(self, before, device_id):
        # Another live node held the device: its session there is stale (one per cluster).
        if before is not None and before.node != self.node and self.cluster is not None:
            self.cluster.kick(before.node, device_id, before.epoch)

    def _release(self, device_id, session):
        self.store.release(device_id, self.node, session.epoch).addErrback(self._presence_failed, device_id)

    def _wake(self, device_id, owner):
        """Something is stored for the device: wake its session here, and its owner if elsewhere."""
        if owner is not None and owner.node != self.node and self.cluster is not None:
            self.cluster.wake(owner.node, device_id)
        session = self.sessions.get(device_id)
        if session is not None:
            session.wake()

    def wake_local(self, device_ids) -> None:
        """Another node stored something for these devices (or a sweep re-reads them)."""
        sessions = self.sessions
        for device_id in device_ids:
            session = sessions.get(device_id)
            if session is not None:
                session.wake()

    def kicked(self, device_id: str, epoch: int) -> None:
        """The device connected to another node: close its session here if it is that epoch's."""
        session = self.sessions.get(device_id)
        if session is not None and session.epoch == epoch:
            self.log.info("device {device} moved to another node: closing its session here", device=device_id)
            session.replaced()

    def _presence_failed(self, failure, device_id):
        self.log.warn("presence of {device} not recorded: {why}", device=device_id, why=failure.getErrorMessage())

    # --- the provider side ------------------------------------------------------

    def accept(
        self,
        token: bytes,
        topic: str,
        payload: bytes,
        apns_id: bytes | uuid.UUID,
        expiry: int = 0,
        priority: int = 10,
        collapse_id: str | None = None,
    ):
        """Fire once the notification is durable (or needs no storing); fail with a
        pushd.gateway.errors.Refusal: ShuttingDown, BadToken, Unregistered, StoreDown."""
        if self.shutting_down:
            return defer.fail(ShuttingDown())
        try:
            device_id, _ = self.tokens.resolve(token, topic)
        except TokenError as e:
            return defer.fail(BadToken(e.reason))
        if self.registry is not None:
            revoked = self.registry.revoked_at(device_id)
            if revoked is not None:
                return defer.fail(Unregistered(revoked))
        th = wire.topic_hash(topic)
        now = self.now()
        session = self.sessions.get(device_id)
        if expiry and expiry < now:
            # Already expired: APNs accepts and never delivers it (an unregistered token still gets 410).
            return self.store.invalidated(token).addCallbacks(self._gone, self._unavailable)
        message = StoredMessage(
            message_id=apns_id.bytes if isinstance(apns_id, uuid.UUID) else apns_id,
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
        if expiry == 0 and (session is None or not session.wants(th)):
            if session is None and self.cluster is not None and self.cluster.shared:
                # Not here, and maybe on another node: one look at presence (expiration 0 only).
                return self.store.where(device_id).addCallbacks(self._now_or_never, self._unavailable, (message,))
            return self._drop_offline(message)
        # The store checks the token's invalidation in the same call (one round trip).
        return self._write(self.store.enqueue(message)).addCallbacks(self._stored, self._unavailable, (device_id,))

    def _drop_offline(self, message):
        self.dropped_offline += 1
        self.log.debug("device {device} not reachable now; expiration 0 drops", device=message.device_id)
        return self.store.invalidated(message.token).addCallbacks(self._gone, self._unavailable)

    def _now_or_never(self, owner, message):
        """An expiration-0 push for a device with no session here: stored only if a live
        node holds it (that node's session delivers it, or keeps it while unacked)."""
        if owner is None or owner.node == self.node:
            return self._drop_offline(message)
        return self._write(self.store.enqueue(message)).addCallbacks(self._stored, self._unavailable, (message.device_id,))

    def _stored(self, result, device_id):
        self._gone(result.invalidated)
        self.accepted += 1
        self._wake(device_id, result.owner)

    @staticmethod
    def _gone(since):
        if since is not None:
            raise Unregistered(since)

    def _unavailable(self, failure):
        failure.trap(StoreUnavailable)
        self.log.warn("store unavailable: {why}", why=failure.getErrorMessage())
        raise StoreDown()

    # --- the courier side -------------------------------------------------------

    def base_token(self, device_id: str) -> bytes:
        """The device's own token (ConnectAck): reaches any of its topics."""
        return self.tokens.base_token(device_id)

    def scoped_token(self, device_id: str, topic_hash: bytes) -> bytes:
        """The device's token for one topic; TokenError if ``topic_hash`` is not a SHA-1 hash."""
        return self.tokens.scoped_token(device_id, topic_hash)

    def pending(self, device_id: str, topic_hashes, limit: int):
        return self.store.pending(device_id, topic_hashes, limit, self.now())

    def ack_many(self, device_id: str, message_ids):
        return self._write(self.store.ack_many(device_id, message_ids))

    def revalidate(self, token: bytes):
        """A device registered a topic (again): its token is valid, whatever an earlier
        unregister said."""
        return self.store.revalidate(token)

    def invalidate(self, token: bytes, when: float):
        """A device unregistered a topic: pushes to its token are refused (Unregistered) from ``when``."""
        return self.store.invalidate(token, when)
