"""
What the gateway needs from storage. The router persists before it answers a provider,
and deletes only on a device's ACK, whatever provider sits behind these interfaces.
Every method returns a Deferred.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from zope.interface import Attribute, Interface


class StoreUnavailable(Exception):
    """The store cannot take or give data now (down, overloaded, timed out)."""


@dataclass
class StoredMessage:
    message_id: bytes  # 16 bytes: the apns-id; also the id on the wire
    device_id: str
    token: bytes
    topic: str
    topic_hash: bytes
    payload: bytes
    expiry: int = 0  # UNIX seconds; 0 = deliver now or never (kept only while unacked)
    priority: int = 10
    collapse_id: str | None = None
    received: float = 0.0


@dataclass(frozen=True)
class Owner:
    """Where a device's live session is: a gateway node and that session's epoch there."""

    node: str
    epoch: int


@dataclass(frozen=True)
class Enqueued:
    """What ``IMessageStore.enqueue`` fires with."""

    #: The token's invalidation time (UNIX seconds) if it is invalidated: nothing was stored.
    invalidated: float | None = None
    #: The live node holding the device, found in the same operation (one round trip), for
    #: a store several nodes share; None if no live node holds it, or for a one-node store
    #: (the router then wakes its own session, if any).
    owner: Owner | None = None


def topic_scoped_id(message_id: bytes, topic_hash: bytes) -> bytes:
    """
    The id a message takes when another topic's message on the device already has its
    apns-id: derived from both, so the same provider's retry maps to the same id. A UUID
    of version 8 (RFC 9562, "custom"), never equal to a random (version 4) apns-id.
    """
    d = int.from_bytes(hashlib.sha256(b"pushd/topic-scoped-id\0" + topic_hash + message_id).digest()[:16], "big")
    return ((d & _KEEP) | _V8).to_bytes(16, "big")


# The version nibble (8) and the variant bits (10) of an RFC 9562 UUID, set on 128 bits.
_KEEP = ((1 << 128) - 1) ^ (0xF << 76) ^ (0xC0 << 56)
_V8 = (0x8 << 76) | (0x80 << 56)


class IMessageStore(Interface):
    """Per-(device, topic) queues of accepted, not yet acknowledged notifications."""

    def enqueue(message):
        """
        Persist ``message`` (a StoredMessage); fire with an Enqueued once it is durable,
        naming the device's live owner (IPresence) if the store is shared by nodes. If its
        token is invalidated (ITokenRegistry), store nothing and fire with an Enqueued
        carrying the time it was: one call per push, not two, on the provider's hot path. The same message id
        for the same device and topic again replaces the earlier one (a provider's retry).
        An apns-id is not proof of ownership: a message of another topic (another team's)
        with the same id is left alone, and this one is stored under
        ``topic_scoped_id(id, topic hash)`` instead, or a random id if another topic holds
        that too; so a device's messages keep distinct ids on the wire, and a retry still
        finds its copy. A pending message of the same device and topic with the same
        collapse id is replaced. Beyond the per-(device, topic) cap the oldest is dropped
        and counted.
        """

    def pending(device_id, topic_hashes, limit, now):
        """
        Fire with up to ``limit`` messages of the device whose topic hash is in
        ``topic_hashes`` and whose expiry is 0 or not before ``now``, in acceptance order.
        """

    def ack(device_id, message_id):
        """Delete one message; fire with True if it was there."""

    def ack_many(device_id, message_ids):
        """
        Delete several messages of one device in one store operation (the acks that
        arrived in one read); fire with how many were there.
        """

    def expire(now):
        """Delete messages whose (non-zero) expiry is before ``now``; fire with how many."""

    def counters():
        """Fire with a dict: ``pending`` (messages stored) and ``dropped`` (by the cap)."""

    def close():
        """Release connections and threads; fire when done."""


class ITokenRegistry(Interface):
    """Tokens resolve without a lookup (pushd.gateway.tokens); this keeps their invalidation."""

    def invalidate(token, when):
        """Mark ``token`` (bytes) unregistered since ``when`` (UNIX seconds)."""

    def invalidated(token):
        """Fire with the invalidation time, or None if the token is valid."""

    def revalidate(token):
        """The app registered again: the token is valid from now on."""


class IDeviceRegistry(Interface):
    """
    The device certificates this gateway issued, and which devices are revoked (device lifecycle).

    Unlike the store's interfaces these answer synchronously: ``check`` runs on every Connect and
    ``revoked_at`` on every push, so a provider answers from the node's own view (SQLite on disk,
    revocations held in memory) and ``poll`` brings that view up to date about once a second.
    A Redis provider (the cluster issue) keeps the same view: revocations in memory, refreshed on
    a pub/sub message or the poll.
    """

    def record(fingerprint, serial, device_id, key_fingerprint, issued_at, not_after, via):
        """Remember an issued certificate (``via``: which enrolment or renewal issued it)."""

    def check(cert_der, device_id, now):
        """None if the certificate (DER) may Connect, else the reason it may not (a string)."""

    def revoked_at(device_id):
        """When the device was revoked (UNIX seconds), or None."""

    def key_known(key_fingerprint):
        """True if a certificate was issued for this public key already."""

    def retire(fingerprint, until):
        """A renewal replaced this certificate: accept it no later than ``until``."""

    def retired(cert_der):
        """True if a renewal replaced this certificate (it may still Connect, never renew)."""

    def current_key(device_id, key_fingerprint):
        """True if this key is that of one of the device's certificates no renewal replaced."""

    def revoke(device_id, when):
        """Revoke the device (all its certificates); True if it was not revoked before."""

    def certificates(limit):
        """Up to ``limit`` issued certificates, newest first, as dicts (for ``pushctl device list``)."""

    def poll():
        """Re-read what another process changed; return the device ids newly revoked."""


class IPresence(Interface):
    """
    Which gateway node holds which device's live session, as an Owner (node, epoch). An entry
    naming a node whose heartbeat (INodeBus.beat) has expired counts as absent, so nothing
    is renewed per device: an idle device costs the store nothing.
    """

    def claim(device_id, node, epoch):
        """
        Record that ``node`` holds the device with the session of ``epoch``; fire with the
        Owner recorded before if it is another live one (to be told to close it), else None.
        """

    def release(device_id, node, epoch):
        """Forget the device's owner, only if it is still (``node``, ``epoch``)."""

    def where(device_id):
        """Fire with the device's live Owner, or None."""

    def release_all(node, device_ids):
        """The node stops (drain): forget it for every device still on it, in one call (a
        release per device cost the drain of 17,000 devices seconds). ``device_ids`` are
        the node's own devices, for a store that cannot find them by node."""


class INodeBus(Interface):
    """
    Gateway nodes' liveness and their messages to each other: each node listens on its own
    channel. At-most-once: a message may be lost (a reconnect, a failover), so what rides
    on it (wakes, kicks) must be safe to lose; ``connected`` says when to assume it was.
    """

    shared = Attribute("True if nodes of other processes are on this bus: a device may be held elsewhere.")

    def listen(node, received, connected):
        """
        Listen on ``node``'s channel from now until ``close``: ``received(data)`` (bytes) per
        message; ``connected()`` each time the subscription is (re)established.
        """

    def publish(node, data):
        """Send ``data`` (bytes) on ``node``'s channel; fire with how many listeners got it."""

    def beat(node, ttl):
        """
        Mark ``node`` alive for ``ttl`` seconds (its heartbeat); fire with True if it was
        alive already, False if not (other nodes took its devices for absent meanwhile).
        """

    def reconnect():
        """Drop the subscription and establish it again (it stopped delivering)."""

    def close():
        """Stop listening; fire when done."""


# --- the Connect replay cache (issue 10) --------------------------------------------


class ReplayCacheFull(Exception):
    """No room to remember one more nonce: the Connect is refused, never let through."""


class IReplayCache(Interface):
    """
    Nonces of nonce-only Connects (APNs-style clients), and of enrolments, seen inside the
    nonce window, so that a captured request replayed on another connection is refused.
    Memory provider: ``pushd.gateway.replay``; a cluster shares one on Redis
    (``pushd.store.redis_replay``), so a replay sent to another node is refused too.
    """

    def seen(key, expires_at, owner=None):
        """
        Remember ``key`` (bytes) until ``expires_at`` (UNIX seconds). Fire with True if it
        was already remembered (a replay), False if it is new and now remembered; fail
        with ReplayCacheFull when it cannot be remembered (TooManyNonces when ``owner``, a
        device id, holds its quota), and with StoreUnavailable when the cache cannot be
        asked: the caller refuses then (fail closed).
        """
