"""
The provider API bounded before authenticated: HTTP/2 (ProviderH2 driven by a real h2 client
in memory, on a Clock) and HTTP/1.1 (the site's channel on a StringTransport).
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (ConnectionTerminated, DataReceived, PingAckReceived, ResponseReceived, StreamEnded,
                       StreamReset)
from h2.settings import SettingCodes
from hpack import Encoder
from hyperframe.frame import (AltSvcFrame, ContinuationFrame, DataFrame, HeadersFrame, PingFrame,
                              PriorityFrame, RstStreamFrame, SettingsFrame, WindowUpdateFrame)
from twisted.internet import address, task
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.python import usage
from twisted.trial import unittest

from pushd import tls, wire
from pushd.gateway import enrol, tap
from pushd.gateway.auth import Authenticator, ProviderKeys, make_jwt
from pushd.gateway.provider import Limits, make_site
from pushd.gateway.provider.http2 import ControlFrames, Logs, ProviderH2
from pushd.gateway.provider.limits import H2_INITIAL_WINDOW
from pushd.gateway.provider.rules import ENROL_LIMIT, DeviceAPI, ProviderAPI
from pushd.gateway.router import Router
from pushd.gateway.tokens import TokenMinter
from pushd.store.memory import MemoryStore

from .helpers import T0

ROOT = Path(__file__).resolve().parent.parent
TOPIC = "com.example.app"
DEVICE = "00112233445566778899aabbccddeeff"
STATIC = "operator-key-for-tests"
JWT_KEY = tls.new_key("ec")


class Harness:
    """One ProviderH2 on a StringTransport and a Clock, and a real h2 client talking to it in memory."""

    def __init__(self, case, limits=Limits(), idle=60.0, logs=None, clock=None, enrol=None):
        self.clock = clock or task.Clock()
        if clock is None:
            self.clock.advance(T0)
        self.store = MemoryStore()
        self.tokens = TokenMinter(b"k")
        router = Router(self.store, self.tokens, self.clock)
        keys_path = Path(case.mktemp())
        keys = ProviderKeys()
        public = JWT_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
        keys.add_key("KEY1", "TEAM1", public, [TOPIC])
        keys.save(keys_path)
        auth = Authenticator(keys_path, [STATIC], self.clock)
        self.api = ProviderAPI(DeviceAPI(router, auth), enrol)
        self.events = []
        self.logs = logs or Logs(self.clock, Logger(observer=self.events.append))
        self.server = ProviderH2(self.api, self.clock, idle, limits, self.logs, peer="test")
        self.transport = StringTransport()
        self.server.makeConnection(self.transport)
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.client.initiate_connection()
        self.token = self.tokens.scoped_token(DEVICE, wire.topic_hash(TOPIC)).hex()
        self.sent = 0

    def jwt(self):
        return make_jwt(JWT_KEY, "KEY1", "TEAM1", iat=int(self.clock.seconds()))

    def headers(self, auth=None, method="POST"):
        h = [(":method", method), (":scheme", "https"), (":authority", "localhost"),
             (":path", f"/3/device/{self.token}"), ("apns-topic", TOPIC)]
        if auth is not None:
            h.append(("authorization", auth))
        return h

    def to_server(self, data=None):
        data = self.client.data_to_send() if data is None else data
        self.sent += len(data)
        if data:
            self.server.dataReceived(data)

    def to_client(self):
        out = self.transport.value()
        self.transport.clear()
        return self.client.receive_data(out) if out else []

    def pump(self):
        self.to_server()
        return self.to_client()

    def post(self, auth, body=b'{"aps":{}}'):
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, self.headers(auth), end_stream=False)
        self.client.send_data(sid, body, end_stream=True)
        return sid

    def status(self, events, sid):
        for e in events:
            if isinstance(e, ResponseReceived) and e.stream_id == sid:
                return int(dict(e.headers)[b":status"])
        return None

    def goaway(self, events):
        for e in events:
            if isinstance(e, ConnectionTerminated):
                return e.error_code
        return None

    def closed_promptly(self):
        """Closed by the server, and unregistered as producer first (TLS waits for that)."""
        return self.transport.disconnecting and self.transport.producer is None

    def log_lines(self, text):
        return [e for e in self.events if text in e.get("log_format", "")]


class _Enrol:
    """Enrolment's answer() shape (pushd.gateway.enrol), for routing only."""

    def answer(self, raw, overflow, peer):
        return {}


class StreamsTests(unittest.TestCase):
    def test_one_stream_until_a_valid_token(self):
        """As APNs: MAX_CONCURRENT_STREAMS is 1 until a valid provider token arrives, then 1,000."""
        h = Harness(self)
        h.pump()
        h.pump()
        self.assertEqual(h.client.remote_settings.max_concurrent_streams, 1)
        sid = h.post("bearer wrong")
        events = h.pump()
        self.assertEqual(h.status(events, sid), 403)
        h.pump()
        self.assertEqual(h.client.remote_settings.max_concurrent_streams, 1)
        sid = h.post("bearer " + h.jwt())
        events = h.pump()
        self.assertEqual(h.status(events, sid), 200)
        h.pump()
        self.assertEqual(h.client.remote_settings.max_concurrent_streams, 1000)
        self.assertTrue(h.server.authenticated)

    def test_streams_beyond_the_limit_are_refused(self):
        """A client that opens a second stream before any valid token gets REFUSED_STREAM for it."""
        h = Harness(self, enrol=_Enrol())
        enrol = [(":method", "POST"), (":scheme", "https"), (":authority", "localhost"),
                 (":path", "/pushd/v1/enrol")]
        h.client.send_headers(1, enrol, end_stream=False)  # needs no token; its body is still coming
        h.client.send_headers(3, h.headers("bearer " + STATIC), end_stream=True)  # before it saw our SETTINGS
        events = h.pump()
        resets = {e.stream_id: e.error_code for e in events if isinstance(e, StreamReset)}
        self.assertEqual(resets.get(3), ErrorCodes.REFUSED_STREAM)
        self.assertIsNone(h.status(events, 3))
        self.assertFalse(h.server.authenticated, "a refused stream is not judged")
        h.client.send_data(1, b"{}", end_stream=True)
        self.assertEqual(h.status(h.pump(), 1), 200)

    def test_unauthenticated_bodies_are_never_kept(self):
        """A flood of unauthenticated streams with 16 KiB bodies: each refused on its HEADERS, no byte held."""
        h = Harness(self, Limits(unauthenticated_requests=1000, auth_deadline=1000))
        h.pump()
        refused = 0
        for _ in range(100):
            sid = h.client.get_next_available_stream_id()
            h.client.send_headers(sid, h.headers(None), end_stream=False)
            h.client.send_data(sid, b"x" * 16000, end_stream=False)
            events = h.pump()
            refused += h.status(events, sid) == 403
            self.assertEqual(h.server.held, 0)
            self.assertEqual(h.server.streams, {})
            h.pump()
        self.assertEqual(refused, 100)
        self.assertEqual(h.server.held_peak, 0)
        self.assertGreater(h.sent, 1_600_000)
        self.assertFalse(h.transport.disconnecting, "an honest-looking client keeps its connection")

    def test_undispatched_bodies_held_within_the_budget(self):
        """
        Authenticated, 100 streams whose bodies never end: the server holds at most the budget
        and does not reopen the client's window for them; once they are reset it does.
        """
        budget = 96 * 1024
        h = Harness(self, Limits(body_budget=budget))
        sid = h.post("bearer " + STATIC)
        h.pump()
        h.pump()
        open_streams = []
        for _ in range(100):
            sid = h.client.get_next_available_stream_id()
            h.client.send_headers(sid, h.headers("bearer " + STATIC), end_stream=False)
            open_streams.append(sid)
        sent = dict.fromkeys(open_streams, 0)
        for _ in range(5):  # send what the window allows (each body under 4096), let the server answer, again
            for sid in open_streams:
                room = min(h.client.local_flow_control_window(sid), 1000, 2900 - sent[sid])
                if room > 0:
                    h.client.send_data(sid, b"y" * room, end_stream=False)
                    sent[sid] += room
            h.pump()
            self.assertLessEqual(h.server.held, budget)
        self.assertGreater(sum(sent.values()), budget - 1000)
        self.assertEqual(h.server.held, sum(sent.values()), "every byte sent is held: nothing was dispatched")
        self.assertLessEqual(h.server.held_peak, budget)
        self.assertLessEqual(h.client.outbound_flow_control_window, 0, "window not reopened for held bodies")
        for sid in open_streams:
            h.client.reset_stream(sid)
        h.pump()
        self.assertEqual(h.server.held, 0)
        self.assertGreater(h.client.outbound_flow_control_window, 0)
        self.assertFalse(h.transport.disconnecting)


class RateTests(unittest.TestCase):
    def authenticated(self, **limits):
        h = Harness(self, Limits(**limits))
        h.post("bearer " + STATIC)
        h.pump()
        h.pump()
        return h

    def test_rapid_reset_gets_enhance_your_calm(self):
        """CVE-2023-44487: HEADERS + RST_STREAM in a loop ends with GOAWAY ENHANCE_YOUR_CALM, closed."""
        h = self.authenticated(resets_per_second=100)
        events = []
        for _ in range(150):
            sid = h.client.get_next_available_stream_id()
            h.client.send_headers(sid, h.headers("bearer " + STATIC), end_stream=False)
            h.client.reset_stream(sid)
            h.to_server()
            if h.transport.disconnecting:
                break
        events += h.to_client()
        self.assertEqual(h.goaway(events), ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertTrue(h.closed_promptly())
        self.assertLessEqual(h.server.resets, 101 + 1)
        self.assertEqual(len(h.log_lines("ENHANCE_YOUR_CALM")), 1)

    def test_unauthenticated_rapid_reset_in_one_read_is_parsed_only_k_deep(self):
        """Before a valid token h2 parses at most ``unauthenticated_requests`` requests of a read:
        a read packed with HEADERS + RST_STREAM costs ten HPACK decodes, not thousands."""
        h = Harness(self, Limits(unauthenticated_requests=10))
        for _ in range(200):
            sid = h.client.get_next_available_stream_id()
            h.client.send_headers(sid, h.headers("bearer nope"), end_stream=False)
            h.client.reset_stream(sid)
        h.to_server()  # one read
        self.assertEqual(h.goaway(h.to_client()), ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertTrue(h.closed_promptly())
        self.assertLessEqual(h.server.conn.highest_inbound_stream_id, 2 * 10 - 1)

    def test_a_first_flight_with_a_valid_token_is_read_whole(self):
        h = Harness(self, Limits(unauthenticated_requests=10))
        sids = [h.post("bearer " + h.jwt()) for _ in range(30)]
        events = h.pump()
        self.assertNotEqual(h.goaway(events), ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertFalse(h.transport.disconnecting)
        self.assertEqual(h.status(events, sids[0]), 200)
        self.assertGreater(h.server.conn.highest_inbound_stream_id, 2 * 10 - 1)

    def test_requests_per_second(self):
        """More requests in one second than allowed: GOAWAY ENHANCE_YOUR_CALM; below it: served."""
        h = self.authenticated(requests_per_second=50)
        for _ in range(3):
            h.clock.advance(1)
            for _ in range(40):
                h.post("bearer " + STATIC)
            events = h.pump()
            self.assertIsNone(h.goaway(events))
            self.assertEqual(sum(isinstance(e, StreamEnded) for e in events), 40)
        h.clock.advance(1)
        for _ in range(60):
            h.post("bearer " + STATIC)
        events = h.pump()
        self.assertEqual(h.goaway(events), ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertTrue(h.closed_promptly())


class ProtocolErrorTests(unittest.TestCase):
    def test_protocol_error_logged_once_then_nothing_is_read(self):
        h = Harness(self)
        h.pump()
        h.to_server(b"\x00\x00\x04\x00\x00\x00\x00\x00\x00abcd")  # DATA on stream 0: PROTOCOL_ERROR
        self.assertEqual(h.goaway(h.to_client()), ErrorCodes.PROTOCOL_ERROR)
        self.assertTrue(h.closed_promptly())
        for _ in range(100):
            h.clock.advance(1)
            h.to_server(b"\x00\x00\x04\x00\x00\x00\x00\x00\x00abcd")
        self.assertEqual(len(h.log_lines("closing HTTP/2 connection")), 1)
        self.assertEqual(h.transport.value(), b"")

    def test_log_lines_bounded_across_connections(self):
        """Many connections failing at once: one line a second, with the count of the others."""
        clock = task.Clock()
        events = []
        logs = Logs(clock, Logger(observer=events.append))
        for _ in range(10):
            h = Harness(self, logs=logs, clock=clock)
            h.pump()
            h.to_server(b"\x00\x00\x04\x00\x00\x00\x00\x00\x00abcd")
        self.assertEqual(len(events), 1)
        clock.advance(1.5)  # the other nine, counted, in one line a second after the first
        self.assertEqual([e["total"] for e in events], [1, 9])
        h = Harness(self, logs=logs, clock=clock)
        h.to_server(h.client.data_to_send() + b"\x00\x00\x04\x00\x00\x00\x00\x00\x00abcd")
        self.assertEqual(len(events), 2, "within a second of the last line: counted, not logged")
        logs.stop()  # the listener stops: the last count is logged too
        self.assertEqual([e["total"] for e in events], [1, 9, 1])
        self.assertIsNone(logs.protocol_error.throttle._call, "no timer left behind")


class TimeTests(unittest.TestCase):
    def test_pings_do_not_keep_a_connection_open(self):
        h = Harness(self, idle=60)
        h.post("bearer " + STATIC)
        h.pump()
        for _ in range(5):
            h.clock.advance(20)
            h.client.ping(b"01234567")
            events = h.pump()
            if h.goaway(events) is not None:
                break
        self.assertEqual(h.goaway(events), ErrorCodes.NO_ERROR)
        self.assertTrue(h.closed_promptly())
        self.assertLessEqual(h.clock.seconds() - T0, 80)

    def test_busy_connection_stays(self):
        h = Harness(self, idle=60)
        for _ in range(5):
            sid = h.post("bearer " + STATIC)
            self.assertEqual(h.status(h.pump(), sid), 200)
            h.clock.advance(30)
        self.assertFalse(h.transport.disconnecting)

    def test_silent_connection_closed_at_the_header_deadline(self):
        h = Harness(self, Limits(header_deadline=5))
        h.pump()
        h.clock.advance(4.9)
        self.assertFalse(h.transport.disconnecting)
        h.clock.advance(0.2)
        self.assertEqual(h.goaway(h.to_client()), ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertTrue(h.closed_promptly())

    def trickle_block(self, h, first_sid):
        """A header block sent as HEADERS + one-byte CONTINUATIONs, one a second."""
        block = Encoder().encode(h.headers("bearer " + STATIC))
        frames = [HeadersFrame(first_sid, data=block[:5])]
        frames += [ContinuationFrame(first_sid, data=block[i:i + 1]) for i in range(5, len(block) - 1)]
        for i, f in enumerate(frames):
            h.to_server(f.serialize())
            if h.transport.disconnecting:
                return i
            h.clock.advance(1)
        return None

    def test_trickled_header_block_does_not_extend_the_deadline(self):
        h = Harness(self, Limits(header_deadline=5))
        h.pump()
        h.post("bearer " + STATIC)  # a first request in time
        h.pump()
        h.clock.advance(30)
        sent = self.trickle_block(h, 3)
        self.assertIsNotNone(sent, "closed while trickling")
        self.assertLessEqual(sent, 6)
        self.assertEqual(h.goaway(h.to_client()), ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertTrue(h.closed_promptly())
        self.assertEqual(len(h.log_lines("closing provider connection")), 1)

    def test_trickled_first_request_from_connection_start(self):
        h = Harness(self, Limits(header_deadline=5))
        h.clock.advance(3)
        h.to_server()  # the preface, 3 s in
        sent = self.trickle_block(h, 1)
        self.assertIsNotNone(sent)
        self.assertLessEqual(sent, 3)

    def test_unauthenticated_body_held_to_the_deadline(self):
        """Before a valid token, a body trickled a byte a second (enrolment needs none) ends at the deadline."""
        h = Harness(self, Limits(header_deadline=5), enrol=_Enrol())
        h.client.send_headers(1, [(":method", "POST"), (":scheme", "https"), (":authority", "localhost"),
                                  (":path", "/pushd/v1/enrol")], end_stream=False)
        h.pump()
        for second in range(1, 30):
            h.client.send_data(1, b" ", end_stream=False)
            h.pump()
            h.clock.advance(1)
            if h.transport.disconnecting:
                break
        self.assertLessEqual(second, 6)
        self.assertTrue(h.closed_promptly())

    def test_authenticated_slow_body_answered_at_the_body_deadline(self):
        """
        After a valid token, a body trickled a byte a second gets APNs' 400 IdleTimeout at the
        body deadline from its HEADERS, then RST_STREAM NO_ERROR; its budget is given back and
        the connection serves on.
        """
        h = Harness(self, Limits(header_deadline=5, body_deadline=5), idle=60)
        h.post("bearer " + STATIC)
        h.pump()
        h.client.send_headers(3, h.headers("bearer " + STATIC), end_stream=False)
        events = []
        for second in range(20):
            h.client.send_data(3, b" ", end_stream=False)
            events += h.pump()
            if h.status(events, 3) is not None:
                break
            h.clock.advance(1)
        self.assertEqual(second, 5)
        self.assertEqual(h.status(events, 3), 400)
        body = b"".join(e.data for e in events if isinstance(e, DataReceived) and e.stream_id == 3)
        self.assertEqual(body, b'{"reason": "IdleTimeout"}')
        self.assertIn((3, ErrorCodes.NO_ERROR), [(e.stream_id, e.error_code) for e in events
                                                 if isinstance(e, StreamReset)])
        self.assertEqual((h.server.held, h.server.streams), (0, {}))
        self.assertFalse(h.transport.disconnecting)
        sid = h.post("bearer " + STATIC)
        self.assertEqual(h.status(h.pump(), sid), 200)
        self.assertEqual(len(h.log_lines("400 IdleTimeout")), 1)

    def test_each_body_has_its_own_deadline(self):
        """Bodies started at 0 s and 3 s, never ended: answered at 5 s and 8 s, each by its own HEADERS."""
        h = Harness(self, Limits(body_deadline=5), idle=60)
        h.post("bearer " + STATIC)
        h.pump()
        h.client.send_headers(3, h.headers("bearer " + STATIC), end_stream=False)
        h.pump()
        h.clock.advance(3)
        h.client.send_headers(5, h.headers("bearer " + STATIC), end_stream=False)
        h.client.send_data(5, b"{", end_stream=False)
        h.pump()
        self.assertEqual(h.server.held, 1)
        h.clock.advance(2)
        events = h.to_client()
        self.assertEqual((h.status(events, 3), h.status(events, 5)), (400, None))
        self.assertEqual(h.server.held, 1)
        h.clock.advance(2.9)
        self.assertIsNone(h.status(h.to_client(), 5))
        h.clock.advance(0.2)
        self.assertEqual(h.status(h.to_client(), 5), 400)
        self.assertEqual((h.server.held, h.server.streams), (0, {}))

    def test_a_body_in_one_byte_frames_costs_what_its_bytes_do(self):
        """
        CVE-2019-9511-style dribble: 4,000 one-byte DATA frames on an open stream; the memory
        kept grows by about their bytes (a list of chunks: ~40 bytes each, the budget x 40).
        """
        import gc
        import tracemalloc

        h = Harness(self, idle=60)
        h.post("bearer " + STATIC)
        h.pump()
        h.client.send_headers(3, h.headers("bearer " + STATIC), end_stream=False)
        h.pump()
        frames = [DataFrame(3, data=b" ").serialize() for _ in range(4000)]
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for f in frames:
                h.server.dataReceived(f)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        self.assertEqual(h.server.held, 4000)
        self.assertLess(grown, 4000 * 10)

    def test_answers_withheld_by_the_clients_window_do_not_keep_the_connection(self):
        """A client that never opens its window for our answers is idle all the same (CVE-2019-9517)."""
        h = Harness(self, idle=60)
        h.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 0})
        h.post("bearer " + STATIC)
        h.pump()
        for _ in range(20):
            h.post("bearer " + STATIC, body=b"[")  # 400 BadPayload: an answer with a body
        h.pump()
        self.assertEqual(len(h.server.unsent), 20)
        h.clock.advance(61)
        self.assertEqual(h.goaway(h.to_client()), ErrorCodes.NO_ERROR)
        self.assertTrue(h.closed_promptly())

    def test_header_block_bytes_bounded(self):
        """CONTINUATION frames without END_HEADERS: closed once the block passes the cap."""
        h = Harness(self, Limits(max_header_bytes=8192))
        h.pump()
        h.to_server(HeadersFrame(1, data=b"\x00" * 1000).serialize())
        for i in range(100):
            h.to_server(ContinuationFrame(1, data=b"\x00" * 1000).serialize())
            if h.transport.disconnecting:
                break
        self.assertLessEqual(i, 9)
        self.assertEqual(h.goaway(h.to_client()), ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertTrue(h.closed_promptly())


class ControlFrameTests(unittest.TestCase):
    """The 2019 HTTP/2 floods (CVE-2019-9512 PING, -9515 SETTINGS, -9518 empty frames, ...)."""

    LIMIT = 50

    def authenticated(self, **limits):
        h = Harness(self, Limits(control_frames_per_second=self.LIMIT, **limits))
        sid = h.post("bearer " + STATIC)
        self.assertEqual(h.status(h.pump(), sid), 200)
        h.pump()
        return h

    def flood(self, h, frame, n):
        for _ in range(n):
            h.to_server(frame)
            if h.transport.disconnecting:
                break
        return h.to_client()

    def test_each_kind_of_control_frame_is_bounded(self):
        """
        60 frames of one kind in a second, where 50 are allowed: GOAWAY ENHANCE_YOUR_CALM and
        closed, for kinds h2 answers itself (PING, SETTINGS) and ones it takes without an event
        (RST_STREAM of a closed stream, ALTSVC, unknown types).
        """
        kinds = {
            "PING": PingFrame(0, opaque_data=b"12345678"),
            "SETTINGS": SettingsFrame(0),
            "PRIORITY": PriorityFrame(7, depends_on=0, stream_weight=1),
            "WINDOW_UPDATE": WindowUpdateFrame(0, window_increment=1),
            "RST_STREAM of a closed stream": RstStreamFrame(1, error_code=8),
            "empty DATA": DataFrame(3, data=b""),
            "padded DATA": DataFrame(3, data=b"", pad_length=0, flags=["PADDED"]),
            "ALTSVC": AltSvcFrame(0, origin=b"x", field=b"y"),
        }
        kinds = {name: frame.serialize() for name, frame in kinds.items()}
        kinds["unknown type"] = b"\x00\x00\x01\xfa\x00\x00\x00\x00\x00x"  # (ExtensionFrame serializes as DATA)
        for name, frame in kinds.items():
            h = self.authenticated()
            h.client.send_headers(3, h.headers("bearer " + STATIC), end_stream=False)  # an open stream for DATA
            h.pump()
            events = self.flood(h, frame, 60)
            self.assertEqual(h.goaway(events), ErrorCodes.ENHANCE_YOUR_CALM, name)
            self.assertTrue(h.closed_promptly(), name)
            self.assertLessEqual(sum(isinstance(e, PingAckReceived) for e in events), self.LIMIT, name)

    def test_empty_continuation_flood(self):
        """CVE-2024-27316 style: empty CONTINUATION frames are control frames too (h2 alone allows 64)."""
        h = self.authenticated()
        h.to_server(HeadersFrame(3, data=b"").serialize())
        events = self.flood(h, ContinuationFrame(3, data=b"").serialize(), 60)
        self.assertEqual(h.goaway(events), ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertTrue(h.closed_promptly())

    def test_a_read_over_the_limit_is_not_answered(self):
        """The count is taken before h2 parses the bytes: none of the PINGs of a flooding read is ACKed."""
        h = self.authenticated()
        events = self.flood(h, PingFrame(0, opaque_data=b"12345678").serialize() * 5000, 1)
        self.assertEqual(h.goaway(events), ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertEqual(sum(isinstance(e, PingAckReceived) for e in events), 0)
        self.assertEqual(len(h.log_lines("ENHANCE_YOUR_CALM")), 1)

    def test_below_the_limit_every_second(self):
        """45 PINGs a second, fed a byte at a time (frame headers cut anywhere), for 3 s: all ACKed, open."""
        h = self.authenticated()
        acks = 0
        for _ in range(3):
            h.clock.advance(1)
            for byte in PingFrame(0, opaque_data=b"12345678").serialize() * 45:
                h.to_server(bytes([byte]))
            acks += sum(isinstance(e, PingAckReceived) for e in h.to_client())
        self.assertEqual(acks, 135)
        self.assertFalse(h.transport.disconnecting)

    def test_requests_are_not_control_frames(self):
        """500 requests with bodies (HEADERS, DATA with END_STREAM) and empty END_STREAM DATA: not counted."""
        h = self.authenticated()
        for _ in range(250):
            h.post("bearer " + STATIC)
            sid = h.client.get_next_available_stream_id()
            h.client.send_headers(sid, h.headers("bearer " + STATIC), end_stream=False)
            h.client.send_data(sid, b'{"a":1}', end_stream=False)
            h.client.send_data(sid, b"", end_stream=True)
        events = h.pump()
        self.assertEqual(sum(isinstance(e, StreamEnded) for e in events), 500)
        self.assertFalse(h.transport.disconnecting)
        self.assertLessEqual(h.server.control, self.LIMIT)

    def test_frame_counter(self):
        c = ControlFrames()
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        stream = (preface + SettingsFrame(0).serialize() + HeadersFrame(1, data=b"x" * 100).serialize()
                  + DataFrame(1, data=b"y" * 20000).serialize() + PingFrame(0).serialize()
                  + DataFrame(1, data=b"", flags=["END_STREAM"]).serialize())
        self.assertEqual(c.count(stream), 2)
        for cut in (1, 7, 9, 30, 140, 20000):
            c = ControlFrames()
            self.assertEqual(sum(c.count(stream[i:i + cut]) for i in range(0, len(stream), cut)), 2, cut)

    def test_empty_header_flood_bounded_by_the_advertised_list_size(self):
        """CVE-2019-9516: 1,000 empty headers (3 bytes each, 32 by RFC 7541's count) pass 16 KiB decoded."""
        h = self.authenticated()
        block = Encoder().encode(h.headers("bearer " + STATIC)) + b"\x00\x00\x00" * 1000
        h.to_server(HeadersFrame(3, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize())
        self.assertTrue(h.closed_promptly(), "answered instead")
        self.assertIsNotNone(h.goaway(h.to_client()))


class EnrolLimitTests(unittest.TestCase):
    def test_a_renewal_at_its_fields_limits_fits(self):
        """Enrolment's own field limits decide the body kept, and it fits HTTP/2's window before a token."""
        import json
        body = json.dumps({"csr": ("x" * 64 + "\n") * (enrol.MAX_CSR // 65),
                           "certificate": ("x" * 64 + "\n") * (enrol.MAX_CSR // 65),
                           "nonce": "0" * 32, "time": 2**40, "signature": "ab" * enrol.MAX_SIGNATURE,
                           "mac": "0" * 64}).encode()
        self.assertLessEqual(len(body), ENROL_LIMIT)
        self.assertEqual(ENROL_LIMIT, enrol.MAX_BODY)
        self.assertLessEqual(ENROL_LIMIT, H2_INITIAL_WINDOW)


class HTTP11DeadlineTests(unittest.TestCase):
    """twisted.web's idle timer is reset by every byte; the header deadline is not."""

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(T0)
        router = Router(MemoryStore(), TokenMinter(b"k"), self.clock)
        self.site = make_site(router, Authenticator(Path(self.mktemp()), [STATIC], self.clock),
                              clock=self.clock, limits=Limits(header_deadline=5))
        self.site.timeOut = 60

    def connect(self):
        proto = self.site.buildProtocol(address.IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def test_slowloris_closed_at_the_deadline(self):
        proto, transport = self.connect()
        line = b"POST /3/device/00 HTTP/1.1\r\nHost: localhost\r\nx-slow: " + b"a" * 100
        for i, byte in enumerate(line):
            proto.dataReceived(bytes([byte]))
            self.clock.advance(1)
            if transport.disconnected:
                break
        self.assertTrue(transport.disconnected, "aborted")
        self.assertLessEqual(i, 5)

    def test_slow_body_closed_at_the_deadline(self):
        proto, transport = self.connect()
        proto.dataReceived(b"POST /pushd/v1/enrol HTTP/1.1\r\nHost: localhost\r\ncontent-length: 1000\r\n\r\n")
        for i in range(30):
            proto.dataReceived(b" ")
            self.clock.advance(1)
            if transport.disconnected:
                break
        self.assertTrue(transport.disconnected)
        self.assertLessEqual(i, 5)

    def test_deadline_starts_again_with_each_request(self):
        proto, transport = self.connect()
        request = (b"POST /3/device/00 HTTP/1.1\r\nHost: localhost\r\nauthorization: bearer " + STATIC.encode()
                   + b"\r\napns-topic: " + TOPIC.encode() + b"\r\ncontent-length: 2\r\n\r\n{}")
        proto.dataReceived(request)
        self.assertIn(b"400", transport.value().split(b"\r\n")[0])
        self.clock.advance(30)  # idle between requests: the idle timeout's business, not the deadline's
        self.assertFalse(transport.disconnected or transport.disconnecting)
        proto.dataReceived(b"POST /3/dev")
        self.clock.advance(4)
        proto.dataReceived(b"ice/00 HTTP/1.1\r\n")
        self.assertFalse(transport.disconnected)
        self.clock.advance(1.1)
        self.assertTrue(transport.disconnected)


class SettingsTests(unittest.TestCase):
    def test_limits_from_options(self):
        o = tap.Options()
        o.parseOptions(["--header-deadline", "3", "--h2-max-streams", "10", "--h2-body-budget", "100000",
                        "--h2-requests-per-second", "7", "--h2-resets-per-second", "8",
                        "--h2-max-header-bytes", "9000", "--h2-control-frames-per-second", "11",
                        "--h2-body-deadline", "2.5", "--auth-deadline", "4", "--unauthenticated-requests", "3"])
        self.assertEqual(tap.provider_limits(o), Limits(3.0, 10, 100000, 7, 8, 9000, 11, 2.5, 4.0, 3))

    def test_defaults_match_the_shipped_config(self):
        """gateway.conf shows each limit's default, commented."""
        o = tap.Options()
        o.parseOptions([])
        text = (ROOT / "etc/pushd/gateway.conf").read_text()
        for name in ("header-deadline", "h2-max-streams", "h2-body-budget", "h2-requests-per-second",
                     "h2-resets-per-second", "h2-max-header-bytes", "hpack-cache-bytes",
                     "h2-control-frames-per-second", "h2-body-deadline", "auth-deadline", "unauthenticated-requests",
                     "auth-verify-rate", "auth-verify-burst"):
            self.assertIn(f"# {name} = {o[name]:g}" if isinstance(o[name], float) else f"# {name} = {o[name]}", text)
        self.assertEqual(tap.provider_limits(o), Limits())

    def test_bad_values_name_the_option(self):
        for argv, message in [(["--h2-body-budget", "1000"], "--h2-body-budget must be at least 65535"),
                              (["--h2-max-header-bytes", "10"], "--h2-max-header-bytes must be at least 4096"),
                              (["--hpack-cache-bytes", "lots"], "--hpack-cache-bytes must be a number, not 'lots'"),
                              (["--auth-deadline", "0"], "--auth-deadline must be between 0.1 and 3600"),
                              (["--unauthenticated-requests", "0"], "--unauthenticated-requests must be between 1"),
                              (["--auth-verify-burst", "0.5"], "--auth-verify-burst must be at least 1"),
                              (["--h2-control-frames-per-second", "1"],
                               "--h2-control-frames-per-second must be at least 10")]:
            with self.assertRaisesRegex(usage.UsageError, message):
                tap.Options().parseOptions(argv)
