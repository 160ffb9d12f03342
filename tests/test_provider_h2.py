"""The provider API over real HTTP/2 (ALPN h2, and the bare preface as aioapns sends it)."""

from __future__ import annotations

import time
import uuid

from twisted.internet import defer, protocol, reactor, ssl, task
from twisted.trial import unittest

from pushd import wire
from pushd.gateway.auth import make_jwt
from pushd.gateway.ratelimit import Buckets
from pushd.store.interfaces import StoreUnavailable

from . import h2client
from .test_provider import DEVICE, TOPIC, ServerMixin


class HTTP2Tests(ServerMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        yield ServerMixin.setUp(self)
        self.client = yield h2client.connect(self.port.getHost().port, self.ca_pem)
        self.addCleanup(self.client.close)

    def jwt(self, kid="KEY1", team="TEAM1", iat=None):
        return make_jwt(self.jwt_key, kid, team, iat=iat)

    def post(self, client=None, path=None, body=b'{"aps":{"alert":"h2"}}', auth="jwt", drop=(), **extra):
        headers = {"apns-topic": TOPIC}
        if auth == "jwt":
            headers["authorization"] = "bearer " + self.jwt()
        elif auth is not None:
            headers["authorization"] = auth
        headers.update({k.replace("_", "-"): v for k, v in extra.items()})
        for k in drop:
            headers.pop(k)
        return (client or self.client).request(
            path or f"/3/device/{self.token}", list(headers.items()), body,
            method=extra.pop("method", "POST") if "method" in extra else "POST",
        )

    @defer.inlineCallbacks
    def test_alpn_h2_with_jwt(self):
        r = yield self.post()
        self.assertEqual(r.status, 200, r.body)
        uuid.UUID(r.headers["apns-id"])
        (m,) = self.successResultOf(self.store.pending(DEVICE, {wire.topic_hash(TOPIC)}, 10, 0))
        self.assertEqual(m.payload, b'{"aps":{"alert":"h2"}}')

    @defer.inlineCallbacks
    def test_preface_without_alpn(self):
        """What aioapns does: no ALPN, the HTTP/2 preface straight away."""
        bare = yield h2client.connect(self.port.getHost().port, self.ca_pem, alpn=False)
        self.addCleanup(bare.close)
        self.assertIsNone(bare.transport.negotiatedProtocol)
        r = yield self.post(client=bare)
        self.assertEqual(r.status, 200, r.body)

    @defer.inlineCallbacks
    def test_many_concurrent_streams(self):
        rs = yield defer.gatherResults([self.post(body=b'{"n":%d}' % i) for i in range(100)])
        self.assertEqual({r.status for r in rs}, {200})
        self.assertEqual(len({r.headers["apns-id"] for r in rs}), 100)
        c = yield self.store.counters()
        self.assertEqual(c["pending"], 100)

    @defer.inlineCallbacks
    def test_every_reason(self):
        other_token = self.tokens.scoped_token(DEVICE, wire.topic_hash("com.example.other")).hex()
        yield self.store.invalidate(bytes.fromhex(self.tokens.scoped_token(
            DEVICE, wire.topic_hash("com.example.gone")).hex()), 1_700_000_000.0)
        gone = self.tokens.scoped_token(DEVICE, wire.topic_hash("com.example.gone")).hex()
        static = f"bearer {self.pki.provider_key}"
        cases = [
            (400, "BadCollapseId", dict(apns_collapse_id="c" * 65)),
            (400, "BadDeviceToken", dict(path="/3/device/zz")),
            (400, "BadDeviceToken", dict(path="/3/device/" + "00" * 32)),
            (400, "BadExpirationDate", dict(apns_expiration="tomorrow")),
            (400, "BadMessageId", dict(apns_id="123")),
            (400, "BadPriority", dict(apns_priority="3")),
            (400, "DeviceTokenNotForTopic", dict(path=f"/3/device/{other_token}", auth=static)),
            (400, "InvalidPushType", dict(apns_push_type="telegram")),
            (400, "MissingDeviceToken", dict(path="/3/device/")),
            (400, "MissingTopic", dict(drop=["apns-topic"])),
            (400, "PayloadEmpty", dict(body=b"")),
            (400, "BadPayload", dict(body=b"[1,2")),
            (403, "ExpiredProviderToken", dict(auth="bearer " + self.jwt(iat=int(time.time()) - 4000))),
            (403, "InvalidProviderToken", dict(auth="bearer " + self.jwt(kid="NOPE"))),
            (403, "InvalidProviderToken", dict(auth="bearer x.y.z")),
            (403, "MissingProviderToken", dict(auth=None)),
            (400, "TopicDisallowed", dict(auth="bearer " + self.jwt(kid="KEY2", team="TEAM2"))),
            (404, "BadPath", dict(path="/3/devices/" + self.token)),
            (405, "MethodNotAllowed", dict(method="PUT")),
            (410, "Unregistered", dict(path=f"/3/device/{gone}", apns_topic="com.example.gone", auth=static)),
            (413, "PayloadTooLarge", dict(body=b'{"a":"' + b"x" * 4100 + b'"}')),
        ]
        results = yield defer.gatherResults([self.post(**kw) for _, _, kw in cases])
        for (status, reason, kw), r in zip(cases, results):
            self.assertEqual((r.status, r.json and r.json["reason"]), (status, reason), kw)
            uuid.UUID(r.headers["apns-id"])
        gone_r = results[[c[1] for c in cases].index("Unregistered")]
        self.assertEqual(gone_r.json["timestamp"], 1_700_000_000_000)

    @defer.inlineCallbacks
    def test_too_many_requests_per_token_and_per_team(self):
        clock = task.Clock()
        device = self.site.resource.device
        device.token_limit = Buckets(rate=1, burst=2, clock=clock)
        statuses = []
        for _ in range(3):
            r = yield self.post()
            statuses.append((r.status, r.json and r.json["reason"]))
        self.assertEqual(statuses, [(200, None), (200, None), (429, "TooManyRequests")])
        clock.advance(1)
        r = yield self.post()
        self.assertEqual(r.status, 200)
        device.token_limit = None
        device.team_limit = Buckets(rate=1, burst=1, clock=clock)
        r1, r2 = yield defer.gatherResults([self.post(), self.post()])
        self.assertEqual(sorted([r1.status, r2.status]), [200, 429])

    @defer.inlineCallbacks
    def test_store_failures(self):
        self.store.enqueue = lambda m: defer.fail(StoreUnavailable("Redis is down"))
        r = yield self.post()
        self.assertEqual((r.status, r.json["reason"]), (503, "ServiceUnavailable"))
        self.store.enqueue = lambda m: defer.fail(RuntimeError("a bug"))
        r = yield self.post()
        self.assertEqual((r.status, r.json["reason"]), (500, "InternalServerError"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    @defer.inlineCallbacks
    def test_shutdown(self):
        self.router.shutting_down = True
        r = yield self.post()
        self.assertEqual((r.status, r.json["reason"]), (503, "Shutdown"))

    @defer.inlineCallbacks
    def test_huge_header_does_not_stop_others(self):
        try:
            r = yield self.client.request(f"/3/device/{self.token}", [("x-huge", "h" * 70_000)], b"{}")
            self.assertNotEqual(r.status, 200)
        except ConnectionError:
            pass  # refused with a GOAWAY: fine too
        other = yield h2client.connect(self.port.getHost().port, self.ca_pem)
        self.addCleanup(other.close)
        r = yield self.post(client=other)
        self.assertEqual(r.status, 200)

    @defer.inlineCallbacks
    def test_stream_reset_mid_body_leaves_connection_serving(self):
        d = self.client.request(
            f"/3/device/{self.token}", [("apns-topic", TOPIC), ("authorization", "bearer " + self.jwt())],
            b'{"partial":', end=False)
        self.client.reset(d.stream_id)
        r = yield d
        self.assertEqual(r.reset, "local")
        r = yield self.post()
        self.assertEqual(r.status, 200)
        c = yield self.store.counters()
        self.assertEqual(c["pending"], 1, "the reset request stored nothing")


class StalledClientTests(ServerMixin, unittest.TestCase):
    """A client that never finishes its request is cut off by the idle timeout (on a Clock)."""

    @defer.inlineCallbacks
    def setUp(self):
        self.clock = task.Clock()
        yield ServerMixin.setUp(self)
        self.site.reactor = self.clock  # the channels' timeouts (HTTPFactory.buildProtocol)
        self.site.timeOut = 30
        self.channels = []  # the server's side of each connection, to wait on its state
        build = self.site.buildProtocol

        def recording(addr):
            p = build(addr)
            self.channels.append(p)
            return p

        self.site.buildProtocol = recording

    def server(self):
        return self.channels[-1]._channel

    @defer.inlineCallbacks
    def test_http2_stalled_stream(self):
        client = yield h2client.connect(self.port.getHost().port, self.ca_pem)
        d = client.request(f"/3/device/{self.token}", [("apns-topic", TOPIC)], b'{"half":', end=False)
        d.addErrback(lambda f: f.trap(ConnectionError, Exception))
        yield h2client.until(lambda: self.channels and getattr(self.server(), "headers_seen", False))
        self.assertFalse(client.closed.called)
        self.clock.advance(31)  # no token, idle: the server sends GOAWAY and closes...
        yield h2client.until(lambda: client.terminated is not None)
        self.clock.advance(16)  # ...aborting the connection if the close does not complete
        yield client.closed
        self.assertIsNotNone(client.terminated, "a GOAWAY came first")
        other = yield h2client.connect(self.port.getHost().port, self.ca_pem)
        self.addCleanup(other.close)
        r = yield other.request(f"/3/device/{self.token}", [
            ("apns-topic", TOPIC), ("authorization", f"bearer {self.pki.provider_key}")], b"{}")
        self.assertEqual(r.status, 200)

    @defer.inlineCallbacks
    def test_http11_stalled_body(self):
        from .test_e2e import _Raw

        raw = _Raw(b"POST /3/device/" + self.token.encode() + b" HTTP/1.1\r\nHost: localhost\r\n"
                   b"authorization: bearer " + self.pki.provider_key.encode() + b"\r\n"
                   b"apns-topic: " + TOPIC.encode() + b"\r\ncontent-length: 100\r\n\r\n{\"half\":")
        opts = ssl.optionsForClientTLS("localhost", ssl.Certificate.loadPEM(self.ca_pem))
        reactor.connectSSL("127.0.0.1", self.port.getHost().port, protocol.ClientFactory.forProtocol(lambda: raw), opts)
        # The headers judged (a valid key): only the body is missing.
        yield h2client.until(lambda: self.channels and self.server().authenticated)
        self.assertFalse(raw.closed.called)
        self.clock.advance(31)
        closed, data = yield raw.closed
        self.assertTrue(closed)

    @defer.inlineCallbacks
    def test_http11_slowloris_headers(self):
        """Over TLS: header bytes trickled one a second do not outlive --header-deadline (5 s)."""
        from .test_e2e import _Raw

        raw = _Raw(b"POST /3/device/" + self.token.encode() + b" HTTP/1.1\r\nHost: localhost\r\n")
        opts = ssl.optionsForClientTLS("localhost", ssl.Certificate.loadPEM(self.ca_pem))
        reactor.connectSSL("127.0.0.1", self.port.getHost().port, protocol.ClientFactory.forProtocol(lambda: raw), opts)
        yield h2client.until(lambda: self.channels and self.server().started is not None)
        for second in range(1, 6):
            received = len(self.server()._buffer)
            raw.transport.write(b"x")
            yield h2client.until(lambda: len(self.server()._buffer) > received or raw.closed.called)
            self.assertFalse(raw.closed.called, second)
            self.clock.advance(1 if second < 5 else 1.01)
        yield raw.closed  # at 5 s from the start on the server's clock, however many bytes trickled
