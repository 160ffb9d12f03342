"""
Provider connections that never present a valid token: an absolute deadline, a small count of
refused requests, a per-address bucket of token verifications and a cache of failed tokens
bound what they cost (HTTP/2 and HTTP/1.1); a connection that authenticated once is left alone.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated
from twisted.internet import address, task
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from pushd import tls
from pushd.gateway import auth as auth_module
from pushd.gateway import enrol
from pushd.gateway.auth import Authenticator, ProviderKeys, make_jwt
from pushd.gateway.provider import Limits, make_site
from pushd.gateway.provider.http1 import BoundedRequest
from pushd.gateway.provider.rules import DeviceAPI, Refused
from pushd.gateway.ratelimit import Buckets
from pushd.gateway.router import Router
from pushd.gateway.tokens import TokenMinter
from pushd.store.memory import MemoryStore

from .helpers import T0
from .test_provider_limits import JWT_KEY, STATIC, TOPIC, Harness

OTHER_KEY = tls.new_key("ec")


def bad_jwt(h, n=0):
    """A JWT with a known key id and a bad signature (the most expensive one to refuse): n makes it unique."""
    return make_jwt(OTHER_KEY, "KEY1", "TEAM1", iat=int(h.clock.seconds()) - n)


def goaway(events):
    for e in events:
        if isinstance(e, ConnectionTerminated):
            return e
    return None


class H2UnauthenticatedTests(unittest.TestCase):
    def test_refused_requests_without_a_token_end_the_connection(self):
        """The 10th refused request before a valid token is answered, then GOAWAY ENHANCE_YOUR_CALM, APNs' JSON."""
        h = Harness(self, Limits(unauthenticated_requests=10))
        h.pump()
        for i in range(9):
            sid = h.post("bearer " + bad_jwt(h, i))
            events = h.pump()
            self.assertEqual(h.status(events, sid), 403)
            self.assertIsNone(goaway(events))
            h.clock.advance(1)
        sid = h.post("bearer " + bad_jwt(h, 9))
        events = h.pump()
        self.assertEqual(h.status(events, sid), 403, "the last one is answered all the same")
        end = goaway(events)
        self.assertEqual(end.error_code, ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertEqual(json.loads(end.additional_data), {"reason": "InvalidProviderToken"})
        self.assertTrue(h.closed_promptly())
        self.assertEqual(len(h.log_lines("without a valid token")), 1)

    def test_no_valid_token_within_the_auth_deadline(self):
        """One refused request a second (each moves no deadline): closed at auth_deadline from the start."""
        h = Harness(self, Limits(auth_deadline=10, unauthenticated_requests=1000))
        h.pump()
        for i in range(9):
            h.post("bearer wrong")
            self.assertIsNone(goaway(h.pump()))
            h.clock.advance(1)
        h.clock.advance(0.9)
        self.assertFalse(h.transport.disconnecting)
        h.clock.advance(0.2)
        end = goaway(h.to_client())
        self.assertIsNotNone(end)
        self.assertEqual(json.loads(end.additional_data), {"reason": "InvalidProviderToken"})
        self.assertTrue(h.closed_promptly())

    def test_a_connection_that_authenticated_once_stays(self):
        """A provider whose key changed: refused requests, then a valid token; later refusals do not close it."""
        h = Harness(self, Limits(auth_deadline=10, unauthenticated_requests=5))
        h.pump()
        for i in range(4):
            sid = h.post("bearer " + bad_jwt(h, i))
            self.assertEqual(h.status(h.pump(), sid), 403)
        sid = h.post("bearer " + h.jwt())
        self.assertEqual(h.status(h.pump(), sid), 200)
        for i in range(20):
            sid = h.post("bearer " + bad_jwt(h, 100 + i))
            self.assertEqual(h.status(h.pump(), sid), 403)
            h.clock.advance(1)
        self.assertIsNone(goaway(h.pump()))
        self.assertFalse(h.transport.disconnecting)
        sid = h.post("bearer " + h.jwt())
        self.assertEqual(h.status(h.pump(), sid), 200)


class VerificationBucketTests(unittest.TestCase):
    """DeviceAPI with its per-address bucket of token verifications (cache misses only)."""

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(T0)
        keys_path = Path(self.mktemp())
        keys = ProviderKeys()
        public = JWT_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
        keys.add_key("KEY1", "TEAM1", public, [TOPIC])
        keys.save(keys_path)
        self.keys_path = keys_path
        self.auth = Authenticator(keys_path, [STATIC], self.clock)
        self.calls = 0
        verify = self.auth._verify

        def counting(token, now):
            self.calls += 1
            return verify(token, now)

        self.auth._verify = counting
        router = Router(MemoryStore(), TokenMinter(b"k"), self.clock)
        self.api = DeviceAPI(router, self.auth, verify_limit=Buckets(1.0, 3, self.clock))

    def head(self, token, source):
        headers = {b"authorization": b"bearer " + token.encode(), b"apns-topic": TOPIC.encode()}
        t = self.api.head(b"POST", b"/3/device/00ff", headers.get, False, "peer", source)
        return (t.answer.status, json.loads(t.answer.body)["reason"]) if type(t) is Refused else (200, None)

    def jwt(self, key=JWT_KEY, n=0):
        return make_jwt(key, "KEY1", "TEAM1", iat=int(self.clock.seconds()) - n)

    def test_fresh_bad_tokens_from_one_address_beyond_the_burst_are_not_verified(self):
        good = self.jwt()
        self.assertEqual(self.head(good, "A"), (200, None))
        self.assertEqual(self.calls, 1)
        for i in range(2):
            self.assertEqual(self.head(self.jwt(OTHER_KEY, i), "A"), (403, "InvalidProviderToken"))
        self.assertEqual(self.calls, 3)
        for i in range(50):
            self.assertEqual(self.head(self.jwt(OTHER_KEY, 10 + i), "A"), (429, "TooManyProviderTokenUpdates"))
        self.assertEqual(self.calls, 3, "beyond the burst, nothing is verified")
        self.assertEqual(self.head(good, "A"), (200, None), "a verified token costs nothing and still works")
        self.assertEqual(self.head(self.jwt(OTHER_KEY, 99), "B"), (403, "InvalidProviderToken"), "per address")
        self.clock.advance(1)
        self.assertEqual(self.head(self.jwt(n=5), "A"), (200, None), "refilled at the rate")

    def test_a_failed_token_sent_again_is_not_verified_again(self):
        bad = self.jwt(OTHER_KEY)
        for _ in range(100):
            self.assertEqual(self.head(bad, None), (403, "InvalidProviderToken"))
        self.assertEqual(self.calls, 1)
        self.clock.advance(auth_module.FAILED_TTL + 1)
        self.assertEqual(self.head(bad, None), (403, "InvalidProviderToken"))
        self.assertEqual(self.calls, 2, "remembered for FAILED_TTL only (a future iat becomes valid later)")

    def test_the_failed_cache_is_bounded_and_forgotten_when_keys_change(self):
        for i in range(auth_module.FAILED_CACHE_SIZE + 100):
            self.auth._failed[i.to_bytes(16, "big")] = self.clock.seconds()
        self.head(self.jwt(OTHER_KEY), None)
        self.assertEqual(len(self.auth._failed), auth_module.FAILED_CACHE_SIZE)
        token = make_jwt(OTHER_KEY, "KEY9", "TEAM1", iat=int(self.clock.seconds()))
        self.assertEqual(self.head(token, None), (403, "InvalidProviderToken"))
        keys = ProviderKeys.load(self.keys_path)
        keys.add_key("KEY9", "TEAM1", OTHER_KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        keys.save(self.keys_path)
        st = self.keys_path.stat()
        os.utime(self.keys_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        self.clock.advance(1.5)
        self.assertEqual(self.head(token, None), (200, None), "a key added since: the token is judged again")


class HTTP11Tests(unittest.TestCase):
    """The site's HTTP/1.1 channel on a StringTransport and a Clock."""

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(T0)
        router = Router(MemoryStore(), TokenMinter(b"k"), self.clock)
        self.auth = Authenticator(Path(self.mktemp()), [STATIC], self.clock)
        self.site = make_site(router, self.auth, clock=self.clock,
                              limits=Limits(header_deadline=5, auth_deadline=10, unauthenticated_requests=10),
                              verify_limit=Buckets(0.001, 2, self.clock))
        self.site.timeOut = 60

    def connect(self, host="127.0.0.1"):
        peer = address.IPv4Address("TCP", host, 1234)
        proto = self.site.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        proto.makeConnection(transport)
        return proto, transport

    @staticmethod
    def request(auth=b"bearer wrong", length=0, body=b""):
        return (b"POST /3/device/00ff HTTP/1.1\r\nHost: localhost\r\nauthorization: " + auth
                + b"\r\napns-topic: " + TOPIC.encode() + b"\r\ncontent-length: %d\r\n\r\n" % length + body)

    def test_refused_before_its_body_is_read(self):
        """An unauthenticated POST announcing 60 KB: 403 and Connection: close at once, no body byte read."""
        proto, transport = self.connect()
        proto.dataReceived(self.request(length=60000))
        out = transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 403 "), out[:40])
        self.assertIn(b"connection: close", out.lower())
        self.assertIn(b"InvalidProviderToken", out)
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(transport.producer, "unregistered before the TLS close")
        proto.dataReceived(b"x" * 60000)
        self.assertEqual(transport.value(), out, "nothing more is read or answered")
        self.clock.advance(3)
        self.assertTrue(transport.disconnected, "aborted if the client does not close")

    def test_no_temporary_file_for_a_large_or_chunked_body(self):
        """twisted.web opens a TemporaryFile for a chunked body or Content-Length >= 100,000: one fd each."""
        req = BoundedRequest(self.connect()[0]._channel)
        for length in (None, 100_000, 10**9):
            req.gotLength(length)
            self.assertIsInstance(req.content, io.BytesIO)
        before = len(os.listdir("/proc/self/fd"))
        held = [self.connect() for _ in range(20)]
        for proto, _ in held:
            proto.dataReceived(self.request(b"bearer " + STATIC.encode(), 200_000))
            proto.dataReceived(b"x" * 1000)
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)

    def test_refusals_without_a_body_end_the_connection_at_the_limit(self):
        proto, transport = self.connect()
        for i in range(9):
            proto.dataReceived(self.request())
            self.assertFalse(transport.disconnecting, i)
        transport.clear()
        proto.dataReceived(self.request())
        out = transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 403 "))
        self.assertIn(b"connection: close", out.lower())
        self.assertTrue(transport.disconnecting)

    def test_no_valid_token_within_the_auth_deadline(self):
        proto, transport = self.connect()
        for i in range(9):
            proto.dataReceived(self.request())
            self.clock.advance(1)
        self.clock.advance(0.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(transport.producer)

    def test_a_connection_that_authenticated_once_stays(self):
        """After a valid token, a refused request's body is read and dropped: answered, connection kept."""
        proto, transport = self.connect()
        proto.dataReceived(self.request(b"bearer " + STATIC.encode(), 2, b"{}"))
        self.assertIn(b" 400 ", transport.value().split(b"\r\n")[0])  # BadDeviceToken-ish: the token was valid
        for i in range(20):
            transport.clear()
            proto.dataReceived(self.request(length=5000, body=b"x" * 5000))
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 403 "), i)
            self.clock.advance(1)
        self.assertFalse(transport.disconnecting)

    def test_the_verification_bucket_is_per_address(self):
        for i in range(2):
            proto, transport = self.connect()
            proto.dataReceived(self.request(b"bearer " + make_jwt(OTHER_KEY, "K", "T", iat=int(T0) - i).encode()))
            self.assertIn(b"InvalidProviderToken", transport.value())
        proto, transport = self.connect()
        proto.dataReceived(self.request(b"bearer " + make_jwt(OTHER_KEY, "K", "T", iat=int(T0) - 9).encode()))
        self.assertIn(b"TooManyProviderTokenUpdates", transport.value())
        self.assertIn(b" 429 ", transport.value().split(b"\r\n")[0])
        proto, transport = self.connect("127.0.0.2")
        proto.dataReceived(self.request(b"bearer " + make_jwt(OTHER_KEY, "K", "T", iat=int(T0) - 9).encode()))
        self.assertIn(b"InvalidProviderToken", transport.value())

    def test_the_bucket_counts_http2_connections_too(self):
        """The HTTP/2 switch carries the address key over (a client without ALPN: preface sniffed)."""
        from h2.config import H2Configuration
        from h2.connection import H2Connection

        statuses = []
        for i in range(3):
            proto, transport = self.connect()
            client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
            client.initiate_connection()
            jwt = make_jwt(OTHER_KEY, "K", "T", iat=int(T0) - 20 - i)
            client.send_headers(1, [(":method", "POST"), (":scheme", "https"), (":authority", "localhost"),
                                    (":path", "/3/device/00ff"), ("apns-topic", TOPIC),
                                    ("authorization", "bearer " + jwt)], end_stream=True)
            proto.dataReceived(client.data_to_send())
            for e in client.receive_data(transport.value()):
                if hasattr(e, "headers") and e.headers and dict(e.headers).get(b":status"):
                    statuses.append(int(dict(e.headers)[b":status"]))
        self.assertEqual(statuses, [403, 403, 429])


class _Enrol:
    """Enrolment's answer() shape, for routing only: 413 when the body was over its limit."""

    def __init__(self):
        self.bodies = []

    def answer(self, raw, overflow, peer):
        self.bodies.append((raw, overflow))
        if overflow:
            raise enrol.RequestTooLarge()
        return {}


class HTTP11EnrolTests(unittest.TestCase):
    def test_a_body_announced_over_its_limit_is_refused_before_it_is_read(self):
        """Enrolment needs no token: a Content-Length over its limit gets 413 and Connection: close at once."""
        clock = task.Clock()
        clock.advance(T0)
        enrol = _Enrol()
        site = make_site(Router(MemoryStore(), TokenMinter(b"k"), clock), Authenticator(Path(self.mktemp()), [STATIC], clock),
                         enrol, clock=clock)
        peer = address.IPv4Address("TCP", "127.0.0.1", 1234)
        proto = site.buildProtocol(peer)
        transport = StringTransport(peerAddress=peer)
        proto.makeConnection(transport)
        proto.dataReceived(b"POST /pushd/v1/enrol HTTP/1.1\r\nHost: localhost\r\ncontent-length: 10000000\r\n\r\n")
        out = transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 413 "), out[:40])
        self.assertIn(b"connection: close", out.lower())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(enrol.bodies, [(b"", True)])
        proto2 = site.buildProtocol(peer)
        t2 = StringTransport(peerAddress=peer)
        proto2.makeConnection(t2)
        proto2.dataReceived(b"POST /pushd/v1/enrol HTTP/1.1\r\nHost: localhost\r\ncontent-length: 2\r\n\r\n{}")
        self.assertTrue(t2.value().startswith(b"HTTP/1.1 200 "), "within its limit: read and answered")
