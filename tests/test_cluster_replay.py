"""
Replays across nodes (issue 11 item 8): two RedisStores on one real redis-server are two
gateway nodes. A nonce-only Connect or an enrolment accepted by one node is refused by the
other; with Redis stopped both are refused (fail closed), never let through unchecked.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from cryptography import x509
from twisted.internet import defer, protocol, reactor, ssl, task, threads
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from pushd import tls, wire
from pushd.gateway.connect import ConnectRefused, ConnectVerifier
from pushd.gateway.enrol import Enrolment, EnrolSecrets
from pushd.gateway.provider.rules import enrol_answer
from pushd.gateway.registry import DeviceRegistry
from pushd.gateway.replay import MemoryReplayCache
from pushd.gateway.tap import Options, replay_caches
from pushd.store.redis import RedisStore
from pushd.store.redis_replay import RedisReplayCache

from . import procs
from .helpers import CA_CERT, CA_KEY, T0, Device, frames_of
from .redis_server import RedisServer
from .stack import Stack
from .test_connect_replay import NonceOnlyClient
from .test_e2e import raw_exchange
from .test_enrol import PEER, enrol_body

SHORT = 1.0  # the store timeout while Redis is stopped


class Node:
    """What one gateway node holds that matters here: its own connection to Redis, its caches."""

    def __init__(self, case, url, clock, pki, secrets, timeout=5.0):
        self.store = RedisStore(url, timeout=timeout)
        case.addCleanup(self.store.close)
        self.replay = RedisReplayCache(self.store, "replay", clock=clock)
        self.nonces = RedisReplayCache(self.store, "enrol", clock=clock)
        for cache in (self.replay, self.nonces):
            case.addCleanup(cache.stop)
        self.verifier = ConnectVerifier(CA_CERT, clock, None, self.replay)
        # Each node its own registry, as on two hosts: only the shared nonces can refuse the replay
        # (a shared registry would also refuse it, as a key already enrolled).
        state = Path(case.mktemp())
        state.mkdir()
        self.registry = DeviceRegistry(state / "devices.sqlite3")
        case.addCleanup(self.registry.close)
        self.enrolment = Enrolment(pki, secrets, self.registry, clock, rate_limit=None, nonces=self.nonces)

    def enrol(self, body):
        d = defer.maybeDeferred(enrol_answer, self.enrolment, body, False, PEER)
        return d.addCallback(lambda a: (a.status, json.loads(a.body)))


class CrossNodeTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.redis = RedisServer(self)
        yield self.redis.start()
        self.clock = task.Clock()
        self.clock.advance(T0)
        state = Path(self.mktemp())
        state.mkdir()
        tls.secret_file(state / "enrol.secret")
        secrets = EnrolSecrets(state, self.clock)
        self.secret = secrets.accepted()[0]
        pki = SimpleNamespace(ca_key=CA_KEY, ca_cert=CA_CERT, enrol_secret=self.secret)
        self.a, self.b = (Node(self, self.redis.url, self.clock, pki, secrets, SHORT) for _ in range(2))

    @defer.inlineCallbacks
    def refused(self, d):
        with self.assertRaises(ConnectRefused) as e:
            yield d
        return e.exception.reason

    @defer.inlineCallbacks
    def test_connect_replayed_to_another_node_refused(self):
        d = Device()
        connect = d.connect(self.clock.seconds())
        self.assertEqual((yield self.a.verifier.verify(connect, None)), d.id)
        reason = yield self.refused(self.b.verifier.verify(connect, None))
        self.assertEqual(reason, f"replayed Connect of device {d.id} (its nonce was accepted before)")
        self.clock.advance(1)
        fresh = d.connect(self.clock.seconds())
        self.assertEqual((yield self.b.verifier.verify(fresh, None)), d.id, "a new nonce is not a replay")

    @defer.inlineCallbacks
    def test_per_device_quota_is_the_clusters(self):
        """One device's nonces count together whatever node they reach."""
        for node in (self.a, self.b):
            node.replay.per_owner = 2
        d = Device()
        for node in (self.a, self.b):
            self.clock.advance(0.01)
            yield node.verifier.verify(d.connect(self.clock.seconds()), None)
        self.clock.advance(0.01)
        reason = yield self.refused(self.a.verifier.verify(d.connect(self.clock.seconds()), None))
        self.assertIn(f"device {d.id} holds 2 live nonces (--replay-per-device)", reason)

    @defer.inlineCallbacks
    def test_enrolment_replayed_to_another_node_refused(self):
        body = enrol_body(self.secret)
        status, out = yield self.a.enrol(body)
        self.assertEqual(status, 200, out)
        status, out = yield self.b.enrol(body)
        self.assertEqual((status, out["reason"]), (409, "ReplayedRequest"))
        self.assertEqual(self.b.registry.certificates(), [], "node B issued nothing")
        self.assertEqual((yield self.b.enrol(enrol_body(self.secret)))[0], 200, "a new request is enrolled")

    @defer.inlineCallbacks
    def test_redis_stopped_refuses_connects_and_enrolments(self):
        """Fail closed: no answer from Redis is a refusal, said in the log."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        yield self.a.verifier.verify(Device().connect(self.clock.seconds()), None)  # the pool is up
        yield self.redis.stop()
        reason = yield self.refused(self.b.verifier.verify(Device().connect(self.clock.seconds()), None))
        self.assertIn("replay cache unavailable, nonce-only Connect refused", reason)
        status, out = yield self.a.enrol(enrol_body(self.secret))
        self.assertEqual((status, out["reason"].split(":")[0]), (503, "NonceCacheUnavailable"))
        self.assertEqual(self.a.registry.certificates(), [], "nothing issued unchecked")
        lines = [e for e in events if "cache at Redis refused" in e.get("log_format", "")]
        self.assertEqual(sorted(e["name"] for e in lines), ["enrol", "replay"])
        for e in lines:
            self.assertEqual(e["counts"], {"Redis unavailable: refused (fail closed)": 1})


class WiringTests(unittest.TestCase):
    """With a Redis store, the gateway's Connect replay cache and enrolment nonces are on it."""

    timeout = 60

    @defer.inlineCallbacks
    def test_redis_store_gives_shared_caches(self):
        redis = RedisServer(self)
        yield redis.start()
        o = Options()
        o.parseOptions(["--replay-cache-size", "7", "--replay-per-device", "3", "--enrol-nonces", "9"])
        store = RedisStore(redis.url)
        self.addCleanup(store.close)
        replay, nonces = replay_caches(o, store, task.Clock())
        self.assertIsInstance(replay, RedisReplayCache)
        self.assertIsInstance(nonces, RedisReplayCache)
        self.assertEqual((replay.name, replay.max_entries, replay.per_owner), ("replay", 7, 3))
        self.assertEqual((nonces.name, nonces.max_entries), ("enrol", 9))
        self.assertIs(replay.store, store, "the store's own connection")
        memory = replay_caches(o, object(), task.Clock())
        self.assertEqual([type(c) for c in memory], [MemoryReplayCache, MemoryReplayCache])
        self.assertEqual((memory[0].max_entries, memory[0].per_owner, memory[1].max_entries), (7, 3, 9))


class TwoGatewayProcessesTests(unittest.TestCase):
    """End to end: two real gateway processes on one Redis (one host, one state directory, as
    workers are); a nonce-only Connect and an enrolment accepted by one, replayed over TLS to
    the other."""

    timeout = 60

    @defer.inlineCallbacks
    def test_connect_and_enrolment_replayed_to_the_other_gateway(self):
        redis = RedisServer(self)
        yield redis.start()
        s = Stack(self, "--store", redis.url)
        yield s.start_gateway()
        other_port, other_provider = procs.free_port(), procs.free_port()
        other = procs.spawn("gateway-b", procs.TWISTD + [
            "pushd-gateway", "--state-dir", str(s.gw_state), "--store", redis.url,
            "--courier", f"tls:{other_port}:interface=127.0.0.1",
            "--provider", f"tls:{other_provider}:interface=127.0.0.1"], s.dir)
        self.addCleanup(other.stop)
        yield other.wait_for(r"Site \(TLS\) starting on")
        ca_pem = (s.gw_state / "ca.pem").read_bytes()
        ca = (tls.load_key((s.gw_state / "ca.key").read_bytes()), x509.load_pem_x509_certificate(ca_pem))
        device = Device(ca=ca)
        registry = DeviceRegistry(s.gw_state / "devices.sqlite3")
        registry.record_cert(x509.load_der_x509_certificate(device.der), "test")
        registry.close()

        captured = device.connect(reactor.seconds()).encode()
        client = NonceOnlyClient(captured)
        opts = ssl.optionsForClientTLS("localhost", ssl.Certificate.loadPEM(ca_pem), acceptableProtocols=tls.COURIER_ALPN)
        connector = reactor.connectSSL("127.0.0.1", s.courier_port,
                                       protocol.ClientFactory.forProtocol(lambda: client), opts)
        self.addCleanup(lambda: (connector.disconnect(), client.closed)[1])
        yield client.up  # gateway A accepted it
        closed, back = yield raw_exchange(other_port, ca_pem, captured)
        self.assertTrue(closed, "gateway B closes the replayer's connection")
        (ack,) = frames_of(back)
        self.assertEqual(ack.status, wire.STATUS_ERROR)
        yield other.wait_for(f"Connect refused: replayed Connect of device {device.id}", timeout=10)
        self.assertFalse(client.closed.called, "the real client is still connected to gateway A")

        # An enrolment (HTTP/1.1 over TLS) accepted by A, the same request sent to B.
        body = enrol_body((s.gw_state / "enrol.secret").read_bytes().strip(), when=reactor.seconds())
        self.assertEqual((yield threads.deferToThread(post, s.provider_port, body))[0], 200)
        status, out = yield threads.deferToThread(post, other_provider, body)
        self.assertEqual((status, out["reason"]), (409, "ReplayedRequest"))


def post(port, body):
    """(status, JSON) of an enrolment POST; blocking (run in a thread)."""
    import ssl as stdssl
    import urllib.error
    import urllib.request

    ctx = stdssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, stdssl.CERT_NONE
    req = urllib.request.Request(f"https://127.0.0.1:{port}/pushd/v1/enrol", body, method="POST")
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
