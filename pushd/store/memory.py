"""
The in-process store: bounded per-device queues in memory. Loses everything when the
process ends; the durable providers (SQLite, Redis) implement the same interface.
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from pushd.store.interfaces import IMessageStore


@implementer(IMessageStore)
class MemoryStore:
    log = Logger()

    def __init__(self, per_device: int = 1000):
        self.per_device = per_device
        self.dropped = 0
        self._queues: dict = {}

    def enqueue(self, message):
        q = self._queues.setdefault(message.device_id, OrderedDict())
        if message.collapse_id is not None:
            for mid, old in list(q.items()):
                if old.topic_hash == message.topic_hash and old.collapse_id == message.collapse_id:
                    del q[mid]
        q[message.message_id] = message
        while len(q) > self.per_device:
            q.popitem(last=False)
            self.dropped += 1
            self.log.warn("queue of {device} full: dropped its oldest message", device=message.device_id)
        return defer.succeed(None)

    def pending(self, device_id, topic_hashes, limit, now):
        out = []
        for m in self._queues.get(device_id, {}).values():
            if len(out) >= limit:
                break
            if m.topic_hash in topic_hashes and (m.expiry == 0 or m.expiry >= now):
                out.append(m)
        return defer.succeed(out)

    def ack(self, device_id, message_id):
        q = self._queues.get(device_id)
        found = q is not None and q.pop(message_id, None) is not None
        if q is not None and not q:
            del self._queues[device_id]
        return defer.succeed(found)

    def expire(self, now):
        n = 0
        for device_id in list(self._queues):
            q = self._queues[device_id]
            for mid in [mid for mid, m in q.items() if m.expiry and m.expiry < now]:
                del q[mid]
                n += 1
            if not q:
                del self._queues[device_id]
        return defer.succeed(n)

    def close(self):
        return defer.succeed(None)
