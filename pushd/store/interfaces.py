"""
What the gateway needs from storage. The router persists before it answers a provider,
and deletes only on a device's ACK, whatever provider sits behind these interfaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zope.interface import Attribute, Interface


@dataclass
class StoredMessage:
    message_id: bytes  # 16 bytes: the apns-id
    device_id: str
    token: bytes
    topic: str
    topic_hash: bytes
    payload: bytes
    expiry: int = 0  # UNIX seconds; 0 = deliver now or never
    priority: int = 10
    collapse_id: str | None = None
    received: float = field(default=0.0)


class IMessageStore(Interface):
    """Per-device queues of accepted, not yet acknowledged notifications."""

    dropped = Attribute("How many messages the per-device cap has pushed out.")

    def enqueue(message):
        """
        Persist ``message`` (a StoredMessage). A pending message of the same device and
        topic with the same collapse id is replaced. Fires when durable.
        """

    def pending(device_id, topic_hashes, limit, now):
        """
        Fire with up to ``limit`` unexpired messages of the device, oldest first,
        restricted to ``topic_hashes`` (a set of SHA-1 topic hashes).
        """

    def ack(device_id, message_id):
        """Delete one message; fire with True if it was there."""

    def expire(now):
        """Purge messages whose expiry has passed; fire with how many."""

    def close():
        """Release resources; fire when done."""
