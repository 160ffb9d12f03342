"""Before Connect, a courier connection is bounded: an absolute deadline from accept (TLS
handshake included) that trickled bytes do not move, and a small byte budget."""

from twisted.internet import protocol
from twisted.logger import globalLogPublisher
from twisted.test import iosim
from twisted.trial import unittest

from pushd import tls, wire
from pushd.endpoints import LeanTLSFactory

from .helpers import CA_CERT, CA_KEY, Device, Gateway


def trickle(gw, proto, data, every):
    """Feed ``data`` one byte at a time, ``every`` seconds apart, while the connection lives."""
    for i in range(len(data)):
        if proto.transport.disconnecting:
            return i
        proto.dataReceived(data[i : i + 1])
        gw.clock.advance(every)
    return len(data)


class AbsoluteDeadlineTests(unittest.TestCase):
    def setUp(self):
        self.gw = Gateway(keepalive_interval=60, grace=3.0, connect_timeout=10.0)

    def test_trickled_connect_is_closed_at_the_deadline(self):
        """One byte every 0.5 s (a 490-byte Connect would take 4 min): still closed at 10 s."""
        proto, t = self.gw.connection()
        t0 = self.gw.clock.seconds()
        connect = Device().connect(self.gw.clock.seconds()).encode()
        sent = trickle(self.gw, proto, connect, 0.5)
        self.assertTrue(t.disconnecting)
        self.assertLess(sent, len(connect))
        closed_after = self.gw.clock.seconds() - t0
        self.assertGreaterEqual(closed_after, 10.0)
        self.assertLessEqual(closed_after, 11.5, "the wheel's resolution is 1 s")
        self.assertIsNone(proto.device_id)

    def test_reads_before_connect_do_not_move_the_deadline(self):
        proto, t = self.gw.connection()
        for _ in range(9):
            self.gw.clock.advance(1)
            proto.dataReceived(b"\x07")  # never completes a header
            proto.decoder._buf = b""  # stay within the budget: only the timing is tested
        self.assertFalse(t.disconnecting)
        self.gw.clock.advance(2)
        self.assertTrue(t.disconnecting)

    def test_connect_in_time_then_silence_timeout_as_before(self):
        d = Device()
        proto, t = self.gw.connection()
        self.gw.clock.advance(9)
        proto.dataReceived(d.connect(self.gw.clock.seconds()).encode())
        self.assertEqual(proto.device_id, d.id)
        self.gw.clock.advance(100)  # past the connect deadline: no longer applies
        self.assertFalse(t.disconnecting)
        proto.dataReceived(wire.KeepAlive().encode())  # a read moves the silence deadline
        self.gw.clock.advance(179)
        self.assertFalse(t.disconnecting)
        self.gw.clock.advance(2)
        self.assertTrue(t.disconnecting)

    def test_deadline_covers_the_tls_handshake(self):
        """A TLS client that never sends its ClientHello is closed at the deadline too."""
        pki_key, pki_cert = tls.issue_server_cert(CA_KEY, CA_CERT, ["localhost"])
        from OpenSSL import crypto
        from twisted.internet import ssl

        options = ssl.CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(pki_key),
            certificate=crypto.X509.from_cryptography(pki_cert),
            acceptableProtocols=tls.COURIER_ALPN,
        )
        server = LeanTLSFactory(options, False, self.gw.factory).buildProtocol(None)
        client = protocol.Protocol()  # connects, sends nothing
        st, ct = iosim.FakeTransport(server, False), iosim.FakeTransport(client, True)
        pump = iosim.connect(server, st, client, ct, greet=False)
        self.gw.clock.advance(9)
        pump.flush()
        self.assertFalse(st.disconnecting)
        self.gw.clock.advance(2)
        pump.flush()
        self.assertTrue(st.disconnecting or st.disconnected)


class ByteBudgetTests(unittest.TestCase):
    def setUp(self):
        self.gw = Gateway(connect_budget=4096)

    def test_header_over_the_budget_closes_before_buffering(self):
        proto, t = self.gw.connection()
        proto.dataReceived(wire.HEADER.pack(wire.CONNECT, 4097))
        self.assertTrue(t.disconnecting)
        self.assertEqual(proto.decoder.buffered, wire.HEADER.size)

    def test_frame_at_the_budget_is_read(self):
        proto, t = self.gw.connection()
        proto.dataReceived(wire.HEADER.pack(wire.CONNECT, 4096) + b"\x00" * 4000)
        self.assertFalse(t.disconnecting)

    def test_stalled_frame_holds_at_most_the_budget(self):
        """The attack that held ~86 KB a connection: a 32 KiB header, then a byte at a time."""
        proto, t = self.gw.connection()
        proto.dataReceived(wire.HEADER.pack(wire.CONNECT, wire.MAX_FRAME))
        self.assertTrue(t.disconnecting)
        self.assertLessEqual(proto.decoder.buffered, wire.HEADER.size)

    def test_after_connect_the_protocol_bound_applies(self):
        """Connect and a Filter larger than the budget in one read: both taken."""
        d = Device()
        proto, t = self.gw.connection()
        hashes = [wire.topic_hash(f"com.example.app{i}") for i in range(400)]  # ~9 KiB
        big = wire.Filter(token=b"t" * 32, enabled=hashes).encode()
        self.assertGreater(len(big), 4096)
        proto.dataReceived(d.connect(self.gw.clock.seconds()).encode() + big)
        self.assertFalse(t.disconnecting)
        self.assertEqual(proto.device_id, d.id)
        self.assertEqual(len(proto.session.topics), 400)
        self.assertEqual(proto.decoder.max_frame, wire.MAX_FRAME)

    def test_trickled_frame_grows_one_buffer_in_place(self):
        """A partial frame is appended to, not copied whole on every read (quadratic)."""
        dec = wire.FrameDecoder()
        frame = wire.encode_frame(wire.Frame(wire.FILTER, ((2, b"x" * 3000),)))
        list(dec.feed(frame[:10]))
        buf = dec._buf
        for i in range(10, len(frame) - 1):
            self.assertEqual(list(dec.feed(frame[i : i + 1])), [])
            self.assertIs(dec._buf, buf)
        (got,) = list(dec.feed(frame[-1:]))
        self.assertEqual(got.get(2), b"x" * 3000)
        self.assertEqual(dec.buffered, 0)
        self.assertEqual(dec._buf, b"")


class PreauthLogTests(unittest.TestCase):
    """Closes of unauthenticated connections are counted and logged at most once a second."""

    def setUp(self):
        self.gw = Gateway(connect_timeout=10.0)
        self.lines = []

        def observe(event):
            if "closed {total} unauthenticated" in (event.get("log_format") or ""):
                self.lines.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def test_many_closes_few_lines(self):
        conns = [self.gw.connection() for _ in range(200)]
        for proto, _ in conns[:50]:
            proto.dataReceived(b"\x63\x00\x00\x00\x00")  # unknown command
        self.gw.clock.advance(11)  # the other 150 miss the deadline
        self.assertTrue(all(t.disconnecting for _, t in conns))
        self.gw.clock.advance(2)
        # The first at once, the other 49 bad frames a second later, the 150 deadlines
        # together when they expire.
        self.assertEqual([e["total"] for e in self.lines], [1, 49, 150])
        self.assertEqual(self.lines[2]["counts"], {"no Connect within the connect deadline": 150})
        self.assertEqual(self.gw.factory.preauth.total, 200)
        self.assertEqual(self.gw.clock.getDelayedCalls(), [])

    def test_authenticated_silence_still_logged_per_device(self):
        proto, t, _ = self.gw.connected(Device())
        self.gw.clock.advance(10_000)
        self.assertTrue(t.disconnecting)
        self.assertEqual(self.lines, [])
