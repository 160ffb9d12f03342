"""The router refuses with domain errors (pushd/gateway/errors.py), which carry no HTTP
status; the provider API (rules.py) alone turns them into APNs' statuses."""

from __future__ import annotations

import json
import uuid

from twisted.internet import defer, task
from twisted.trial import unittest

from pushd import wire
from pushd.gateway import errors
from pushd.gateway.provider.rules import REFUSAL_STATUS, DeviceAPI, Ticket, refused
from pushd.gateway.router import Router
from pushd.gateway.tokens import TokenMinter
from pushd.store.interfaces import StoreUnavailable
from pushd.store.memory import MemoryStore

from .helpers import T0

TOPIC = "com.example.app"
DEVICE = "00112233445566778899aabbccddeeff"


class RouterRefusalTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.store = MemoryStore()
        self.tokens = TokenMinter(b"secret")
        self.router = Router(self.store, self.tokens, self.clock)
        self.token = self.tokens.scoped_token(DEVICE, wire.topic_hash(TOPIC))
        self.api = DeviceAPI(self.router, auth=None)

    def accept(self, token=None, topic=TOPIC):
        return self.router.accept(token or self.token, topic, b"{}", uuid.uuid4(), expiry=int(T0) + 60)

    def refusal(self, d, kind):
        """The domain error ``d`` fails with: of ``kind``, with no HTTP status on it."""
        e = self.failureResultOf(d, kind).value
        self.assertIsInstance(e, errors.Refusal)
        self.assertFalse(hasattr(e, "status"), "a domain error carries no HTTP status")
        self.assertEqual([v for v in vars(e).values() if type(v) is int], [], "nor any other number like one")
        return e

    def answered(self, d):
        """What the provider API answers for the router's outcome ``d``."""
        t = Ticket("device", wire.MAX_PAYLOAD, "peer", True)
        t.apns_id = "0a9f0a9f-0000-4000-8000-000000000000"
        a = self.successResultOf(d.addCallbacks(lambda _: None, self.api._failed, errbackArgs=(t.apns_id,)))
        return a.status, json.loads(a.body)

    def test_shutting_down(self):
        self.router.shutting_down = True
        self.refusal(self.accept(), errors.ShuttingDown)
        self.assertEqual(self.answered(self.accept()), (503, {"reason": "Shutdown"}))

    def test_bad_token(self):
        e = self.refusal(self.accept(token=b"\0" * 32), errors.BadToken)
        self.assertEqual(e.reason, "BadDeviceToken")
        self.assertEqual(self.answered(self.accept(token=b"\0" * 32)), (400, {"reason": "BadDeviceToken"}))

    def test_token_not_for_topic(self):
        e = self.refusal(self.accept(topic="com.example.other"), errors.BadToken)
        self.assertEqual(e.reason, "DeviceTokenNotForTopic")
        self.assertEqual(self.answered(self.accept(topic="com.example.other")),
                         (400, {"reason": "DeviceTokenNotForTopic"}))

    def test_unregistered_token(self):
        self.successResultOf(self.store.invalidate(self.token, 1_700_000_000.5))
        e = self.refusal(self.accept(), errors.Unregistered)
        self.assertEqual(e.since, 1_700_000_000.5)
        self.assertEqual(self.answered(self.accept()),
                         (410, {"reason": "Unregistered", "timestamp": 1_700_000_000_500}))

    def test_revoked_device(self):
        class Registry:
            def revoked_at(self, device_id):
                return 1_700_000_001.0

        self.router.registry = Registry()
        self.assertEqual(self.refusal(self.accept(), errors.Unregistered).since, 1_700_000_001.0)
        self.assertEqual(self.answered(self.accept()),
                         (410, {"reason": "Unregistered", "timestamp": 1_700_000_001_000}))

    def test_store_down(self):
        self.store.enqueue = lambda m: defer.fail(StoreUnavailable("Redis did not answer"))
        self.refusal(self.accept(), errors.StoreDown)
        self.flushLoggedErrors()
        self.assertEqual(self.answered(self.accept()), (503, {"reason": "ServiceUnavailable"}))


class MappingTests(unittest.TestCase):
    def test_every_refusal_has_a_status(self):
        """A new domain error must be given its status in rules.py, not fall to 500."""
        kinds = [c for c in vars(errors).values()
                 if isinstance(c, type) and issubclass(c, errors.Refusal) and c is not errors.Refusal]
        self.assertEqual(sorted(k.__name__ for k in kinds if k not in REFUSAL_STATUS), [])
        for k in kinds:
            e = k(0.0) if k is errors.Unregistered else k()
            self.assertEqual(refused(e).status, REFUSAL_STATUS[k])
            self.assertEqual(refused(e).reason, k.reason)

    def test_provider_token_refusals(self):
        self.assertEqual((refused(errors.ProviderTokenRefused("ExpiredProviderToken")).status,
                          refused(errors.ProviderTokenRefused("ExpiredProviderToken")).reason),
                         (403, "ExpiredProviderToken"))
        self.assertEqual(refused(errors.TooManyProviderTokenUpdates()).status, 429)
