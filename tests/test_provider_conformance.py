"""APNs conformance over real HTTP/2 on loopback TLS (h2 client, curl), one test per rule."""

from __future__ import annotations

import functools
import shutil
import socket
import time
from pathlib import Path

from h2.errors import ErrorCodes
from hyperframe.frame import PingFrame
from twisted.internet import defer, reactor, task, utils
from twisted.trial import unittest

from pushd import tls, wire
from pushd.gateway.auth import make_jwt

from pushd.gateway.provider import Limits

from . import h2client
from .test_provider import DEVICE, TOPIC, ServerMixin


class H2Mixin(ServerMixin):
    @defer.inlineCallbacks
    def setUp(self):
        yield ServerMixin.setUp(self)
        self.client = yield self.connect()

    @defer.inlineCallbacks
    def connect(self):
        c = yield h2client.connect(self.port.getHost().port, self.ca_pem)
        self.addCleanup(c.close)
        yield c.settings
        return c

    def token_for(self, topic):
        return self.tokens.scoped_token(DEVICE, wire.topic_hash(topic)).hex()

    def post(self, topic=TOPIC, headers=(), body=b'{"aps":{}}', auth=None, method="POST", client=None, token=None):
        h = [("authorization", auth or f"bearer {self.pki.provider_key}"), ("apns-topic", topic), *headers]
        return (client or self.client).request(f"/3/device/{token or self.token_for(topic)}", h, body, method=method)


class WellFormedTests(H2Mixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_curl_head_over_http2(self):
        """curl -I --http2 must succeed: a HEAD answer is HEADERS with END_STREAM and no DATA."""
        curl = shutil.which("curl")
        self.assertIsNotNone(curl, "curl is not installed (.ci/run installs it)")
        ca = Path(self.mktemp())
        ca.write_bytes(self.ca_pem)
        out, err, code = yield utils.getProcessOutputAndValue(curl, [
            "-sS", "-I", "--http2", "--cacert", str(ca), f"{self.url}/3/device/{self.token}"])
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith(b"HTTP/2 405"), out)

    @defer.inlineCallbacks
    def test_head_answer_has_no_data(self):
        r = yield self.post(method="HEAD", body=b"")
        self.assertEqual(r.status, 405)
        self.assertEqual((r.data_frames, r.body, r.ended_on_headers), (0, b"", True))
        self.assertNotIn("content-length", r.headers)

    @defer.inlineCallbacks
    def test_errors_have_exact_content_length(self):
        """Every error: content-length matches the DATA (the h2 client checks it), END_STREAM on the last."""
        for kw in [dict(topic=""), dict(auth="bearer nope"), dict(body=b"[")]:
            r = yield self.post(**kw)
            self.assertEqual(int(r.headers["content-length"]), len(r.body), kw)
            self.assertIsNone(r.reset)
            self.assertTrue(r.json["reason"])

    @defer.inlineCallbacks
    def test_early_refusal_then_reset_no_error(self):
        """Refused on HEADERS while the body is still coming: a whole answer, then RST_STREAM NO_ERROR."""
        d = self.client.request(f"/3/device/{self.token}", [("apns-topic", TOPIC), ("authorization", "bearer x")],
                                b'{"aps":', end=False)
        r = yield d
        self.assertEqual((r.status, r.json["reason"]), (403, "InvalidProviderToken"))
        yield h2client.until(lambda: (d.stream_id, 0) in self.client.resets_received)
        r = yield self.post()
        self.assertEqual(r.status, 200)


class GoawayTests(H2Mixin, unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.clock = task.Clock()
        yield H2Mixin.setUp(self)

    @defer.inlineCallbacks
    def test_goaway_closes_promptly_while_the_client_pings(self):
        """The idle GOAWAY ends the TLS connection at once though the client keeps sending PINGs."""
        self.site.reactor = self.clock  # the connection's timers
        self.site.timeOut = 30
        client = yield self.connect()
        r = yield self.post(client=client)
        self.assertEqual(r.status, 200)
        pinger = task.LoopingCall(client.ping)
        pinger.start(0.05)
        self.addCleanup(lambda: pinger.running and pinger.stop())
        yield h2client.until(lambda: client.pings_acked > 0)
        self.clock.advance(31)
        # Prompt: the TLS close completes while the pings go on, long before the abort (15 s).
        yield h2client.until(lambda: client.closed.called, timeout=3)
        self.assertEqual(client.terminated.error_code, 0)
        self.assertEqual(client.terminated.additional_data, b'{"reason":"IdleTimeout"}')


class KeyRotationTests(H2Mixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_refusals_then_a_valid_token_then_refusals_keep_the_connection(self):
        """
        A provider whose key changed: a few refused requests, then a valid token; once it had
        one, neither --unauthenticated-requests nor --auth-deadline closes its connection.
        """
        clock = task.Clock()
        self.site.reactor = clock  # the connection's timers
        client = yield self.connect()
        self.post = functools.partial(self.post, client=client)
        other = tls.new_key("ec")
        n = self.site.limits.unauthenticated_requests
        for i in range(n - 1):
            r = yield self.post(auth="bearer " + make_jwt(other, "KEY1", "TEAM1", iat=int(time.time()) - i))
            self.assertEqual((r.status, r.json["reason"]), (403, "InvalidProviderToken"))
        r = yield self.post(auth="bearer " + make_jwt(self.jwt_key, "KEY1", "TEAM1"))
        self.assertEqual(r.status, 200)
        for i in range(3 * n):
            r = yield self.post(auth="bearer " + make_jwt(other, "KEY1", "TEAM1", iat=int(time.time()) - 100 - i))
            self.assertEqual(r.status, 403)
        clock.advance(self.site.limits.auth_deadline + 1)
        r = yield self.post(auth="bearer " + make_jwt(self.jwt_key, "KEY1", "TEAM1"))
        self.assertEqual(r.status, 200)
        self.assertIsNone(client.terminated)
        self.assertFalse(client.closed.called)


class HeaderRuleTests(H2Mixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_topic_disallowed_is_400(self):
        keys = make_jwt(self.jwt_key, "KEY2", "TEAM2")
        r = yield self.post(auth=f"bearer {keys}")
        self.assertEqual((r.status, r.json["reason"]), (400, "TopicDisallowed"))

    @defer.inlineCallbacks
    def test_duplicate_headers(self):
        values = {"apns-topic": TOPIC, "apns-priority": "10", "apns-push-type": "alert",
                  "apns-id": "123e4567-e89b-12d3-a456-426614174000", "apns-expiration": "0",
                  "apns-collapse-id": "c", "authorization": f"bearer {self.pki.provider_key}"}
        for name, value in values.items():
            r = yield self.client.request(f"/3/device/{self.token}", [
                ("authorization", f"bearer {self.pki.provider_key}"), ("apns-topic", TOPIC), (name, value),
                (name, value)], b'{"aps":{}}')
            self.assertEqual((r.status, r.json and r.json["reason"]), (400, "DuplicateHeaders"), name)
        r = yield self.post(headers=[("x-other", "1"), ("x-other", "2")])
        self.assertEqual(r.status, 200, "other headers may repeat")

    @defer.inlineCallbacks
    def test_push_type_needs_its_topic_suffix(self):
        for push_type, suffix in [("voip", ".voip"), ("complication", ".complication"),
                                  ("fileprovider", ".pushkit.fileprovider"), ("location", ".location-query"),
                                  ("liveactivity", ".push-type.liveactivity"), ("pushtotalk", ".voip-ptt"),
                                  ("widgets", ".push-type.widgets")]:
            r = yield self.post(headers=[("apns-push-type", push_type)])
            self.assertEqual((r.status, r.json and r.json["reason"]), (400, "BadTopic"), push_type)
            extra = [("apns-expiration", "0")] if push_type == "pushtotalk" else []
            r = yield self.post(topic=TOPIC + suffix, headers=[("apns-push-type", push_type), *extra])
            self.assertEqual(r.status, 200, (push_type, r.body))
            r = yield self.post(topic=TOPIC + suffix, headers=[("apns-push-type", "alert")])
            self.assertEqual((r.status, r.json and r.json["reason"]), (400, "InvalidPushType"), suffix)

    @defer.inlineCallbacks
    def test_background_priority_5_only(self):
        for priority in ("10", "1"):
            r = yield self.post(headers=[("apns-push-type", "background"), ("apns-priority", priority)])
            self.assertEqual((r.status, r.json and r.json["reason"]), (400, "BadPriority"), priority)
        r = yield self.post(headers=[("apns-push-type", "background"), ("apns-priority", "5")])
        self.assertEqual(r.status, 200)
        r = yield self.post(headers=[("apns-push-type", "background")], body=b'{"n":2}')
        self.assertEqual(r.status, 200)
        stored = self.successResultOf(self.store.pending(DEVICE, {wire.topic_hash(TOPIC)}, 10, 0))
        self.assertEqual({m.priority for m in stored}, {5}, "background without a priority is stored with 5")

    @defer.inlineCallbacks
    def test_pushtotalk_priority_10_and_expiration_0(self):
        topic = TOPIC + ".voip-ptt"
        cases = [([("apns-priority", "5")], "BadPriority"),
                 ([("apns-expiration", str(int(time.time()) + 60))], "BadExpirationDate")]
        for headers, reason in cases:
            r = yield self.post(topic=topic, headers=[("apns-push-type", "pushtotalk"), *headers])
            self.assertEqual((r.status, r.json and r.json["reason"]), (400, reason), headers)
        r = yield self.post(topic=topic, headers=[("apns-push-type", "pushtotalk"), ("apns-priority", "10"),
                                                  ("apns-expiration", "0")])
        self.assertEqual(r.status, 200)


class FloodTests(H2Mixin, unittest.TestCase):
    """Over real TLS: what the server holds for a hostile connection, read from its counters."""

    @defer.inlineCallbacks
    def setUp(self):
        self.protocols = []
        yield H2Mixin.setUp(self)
        build = self.site.buildProtocol

        def recording(addr):
            p = build(addr)
            self.protocols.append(p)
            return p

        self.site.buildProtocol = recording

    @defer.inlineCallbacks
    def test_unauthenticated_streams_with_bodies_hold_nothing(self):
        """
        Streams with 16 KiB bodies and no token: each refused on its HEADERS, no body byte held;
        the 10th refusal (--unauthenticated-requests) ends the connection with GOAWAY ENHANCE_YOUR_CALM.
        """
        client = yield self.connect()
        (server,) = [p._channel for p in self.protocols]
        rs = yield defer.DeferredList([
            client.request(f"/3/device/{self.token}", [("apns-topic", TOPIC)], b"x" * 16000) for _ in range(50)],
            consumeErrors=True)
        answered = [r for ok, r in rs if ok]
        self.assertEqual(len(answered), self.site.limits.unauthenticated_requests)
        self.assertEqual({(r.status, r.json["reason"]) for r in answered}, {(403, "MissingProviderToken")})
        self.assertEqual((server.held_peak, server.held, server.streams), (0, 0, {}))
        self.assertFalse(server.authenticated)
        self.assertEqual(client.conn.remote_settings.max_concurrent_streams, 1)
        self.assertEqual(client.terminated.error_code, ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertEqual(client.terminated.additional_data, b'{"reason": "MissingProviderToken"}')
        yield client.closed

    @defer.inlineCallbacks
    def test_authenticated_open_bodies_stay_within_the_budget(self):
        client = yield self.connect()
        (server,) = [p._channel for p in self.protocols]
        r = yield self.post(client=client)
        self.assertEqual(r.status, 200)
        pending = [client.request(f"/3/device/{self.token}", [
            ("apns-topic", TOPIC), ("authorization", f"bearer {self.pki.provider_key}")], b"{" + b" " * 4000, end=False)
            for _ in range(100)]
        budget = self.site.limits.body_budget
        # 100 x 4 KiB asked for; the server takes what its window (the budget) allows.
        yield h2client.until(lambda: len(server.streams) == 100 and server.held > budget // 2)
        self.assertLessEqual(server.held_peak, budget)
        for d in pending:
            client.reset(d.stream_id)
        yield h2client.until(lambda: server.held == 0 and not server.streams)
        r = yield self.post(client=client, body=b'{"after":1}')
        self.assertEqual(r.status, 200)

    @defer.inlineCallbacks
    def test_ping_flood_gets_enhance_your_calm(self):
        """CVE-2019-9512: 5,000 PINGs at once after a request; GOAWAY ENHANCE_YOUR_CALM, at most the allowed ACKs, closed."""
        client = yield self.connect()
        r = yield self.post(client=client)  # past the header deadline's reach: only this limit ends it
        self.assertEqual(r.status, 200)
        for _ in range(5000):
            client.ping()
        yield client.closed
        self.assertEqual(client.terminated.error_code, ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertLessEqual(client.pings_acked, self.site.limits.control_frames_per_second)

    @defer.inlineCallbacks
    def test_slow_body_gets_idle_timeout_and_the_connection_serves_on(self):
        self.site.limits = Limits(body_deadline=0.3)
        client = yield self.connect()
        r = yield self.post(client=client)
        self.assertEqual(r.status, 200)
        started = time.monotonic()
        r = yield client.request(f"/3/device/{self.token}", [
            ("apns-topic", TOPIC), ("authorization", f"bearer {self.pki.provider_key}")], b'{"aps":', end=False)
        self.assertEqual((r.status, r.json["reason"]), (400, "IdleTimeout"))
        self.assertGreaterEqual(time.monotonic() - started, 0.25)
        (server,) = [p._channel for p in self.protocols]
        self.assertEqual((server.held, server.streams), (0, {}))
        r = yield self.post(client=client, body=b'{"after":1}')
        self.assertEqual(r.status, 200)

    @defer.inlineCallbacks
    def test_a_client_that_does_not_read_is_not_read(self):
        """
        PINGs from a client that reads nothing (socket buffers of 4 KiB): once Twisted's buffer of
        our output passes 64 KiB, through TLS, the server stops reading; it holds no more.
        """
        self.site.limits = Limits(control_frames_per_second=10**6)  # this test is about output, not the rate
        client = yield self.connect()
        self.addCleanup(lambda: client.transport.abortConnection())
        r = yield self.post(client=client)
        self.assertEqual(r.status, 200)
        (server,) = [p._channel for p in self.protocols]
        server.transport.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        client.transport.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.transport.pauseProducing()
        pings = PingFrame(0, opaque_data=b"12345678").serialize() * 500
        started = time.monotonic()
        while not server.paused and time.monotonic() - started < 5:
            client.transport.write(pings)
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.assertTrue(server.paused, "still reading")
        held = server.transport.transport._tempDataLen + len(server.transport.transport.dataBuffer)
        for _ in range(10):
            client.transport.write(pings)
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.assertTrue(server.paused)
        self.assertLess(server.transport.transport._tempDataLen + len(server.transport.transport.dataBuffer),
                        held + 4096)
