from hypothesis import given, settings, strategies as st
from twisted.trial import unittest

from pushd import wire

field_values = st.binary(max_size=300)
frames = st.builds(
    wire.Frame,
    st.integers(0, 255),
    st.lists(st.tuples(st.integers(0, 255), field_values), max_size=8).map(tuple),
)


class FramingTests(unittest.TestCase):
    def test_known_bytes(self):
        """The layout is u8 command, u32 length, then u8 id, u16 length, value per field."""
        frame = wire.Frame(wire.KEEPALIVE_ACK, ((1, b"\x05"),))
        self.assertEqual(wire.encode_frame(frame), b"\x0d\x00\x00\x00\x04\x01\x00\x01\x05")

    def test_one_byte_at_a_time(self):
        data = wire.ConnectAck(status=0, token=b"t" * 32, max_message_size=4096,
                               unknown5=b"", capabilities=b"", server_time=7).encode()
        data += wire.KeepAliveAck().encode()
        dec = wire.FrameDecoder()
        got = []
        for i in range(len(data)):
            got.extend(dec.feed(data[i:i + 1]))
        self.assertEqual([f.command for f in got], [wire.CONNECT_ACK, wire.KEEPALIVE_ACK])
        self.assertEqual(wire.parse(got[0]).token, b"t" * 32)
        self.assertEqual(dec.buffered, 0)

    def test_oversize_length_rejected_before_buffering(self):
        dec = wire.FrameDecoder(max_frame=1024)
        with self.assertRaises(wire.WireError) as e:
            list(dec.feed(b"\x0a\x00\x00\x04\x01"))
        self.assertIn("over the limit", str(e.exception))

    def test_buffer_is_bounded(self):
        """A frame arriving slowly never buffers more than header + max_frame."""
        dec = wire.FrameDecoder(max_frame=100)
        list(dec.feed(b"\x0c\x00\x00\x00\x64"))
        for _ in range(99):
            list(dec.feed(b"\x00"))
        self.assertLessEqual(dec.buffered, 105)

    def test_truncated_field(self):
        with self.assertRaises(wire.WireError):
            list(wire.FrameDecoder().feed(b"\x0c\x00\x00\x00\x04\x01\x00\x09\x00"))

    def test_unknown_command(self):
        with self.assertRaises(wire.WireError):
            wire.parse(wire.Frame(99, ()))

    def test_unknown_fields_skipped(self):
        frame = wire.Frame(wire.KEEPALIVE, ((1, b"WiFi"), (77, b"whatever")))
        self.assertEqual(wire.parse(frame).connection_method, "WiFi")

    def test_repeated_scalar_field(self):
        with self.assertRaises(wire.WireError):
            wire.parse(wire.Frame(wire.NOTIFICATION_ACK, ((4, b"a"), (4, b"b"), (8, b"\x00"))))

    def test_integer_width_checked(self):
        with self.assertRaises(wire.WireError):
            wire.parse(wire.Frame(wire.NOTIFICATION_ACK, ((4, b"a"), (8, b"\x00\x00"))))

    def test_required_field(self):
        with self.assertRaises(wire.WireError):
            wire.parse(wire.Frame(wire.CONNECT, ((13, b"n"),)))

    def test_list_fields(self):
        hashes = [wire.topic_hash("a"), wire.topic_hash("b")]
        f = wire.parse(wire.FrameDecoder().feed(wire.Filter(token=b"x", enabled=hashes).encode()).__next__())
        self.assertEqual(f.enabled, hashes)

    def test_notification_layout(self):
        """Server to device: token in field 1, topic hash in 2, as pypush reads it."""
        n = wire.Notification(token=b"T" * 32, topic=wire.topic_hash("t"), payload=b"{}",
                              message_id=b"i" * 16, expiry=5)
        frame = n.to_frame()
        self.assertEqual(frame.get(1), b"T" * 32)
        self.assertEqual(frame.get(2), wire.topic_hash("t"))
        self.assertEqual(frame.get(5), b"\x00\x00\x00\x05")

    def test_connect_binding_field(self):
        """pushd's binding rides in Connect field 33 as a u8; APNs clients leave it out."""
        c = wire.Connect(certificate=b"c", nonce=b"n", signature=b"s", pushd_version=1,
                         binding=wire.BINDING_TLS_EXPORTER)
        self.assertEqual(c.to_frame().get(33), b"\x01")
        (frame,) = wire.FrameDecoder().feed(c.encode())
        self.assertEqual(wire.parse(frame).binding, 1)
        plain = wire.Connect(certificate=b"c", nonce=b"n", signature=b"s")
        self.assertIsNone(plain.to_frame().get(33))
        self.assertIsNone(wire.parse(plain.to_frame()).binding)

    def test_field_too_long_to_encode(self):
        with self.assertRaises(wire.WireError):
            wire.encode_frame(wire.Frame(1, ((1, b"x" * 70000),)))


class GoAwayTests(unittest.TestCase):
    """pushd's GoAway (command 33): the gateway drains, the device reconnects at once."""

    def test_known_bytes(self):
        """Command 33, field 1 the window in milliseconds as a u32."""
        self.assertEqual(wire.GoAway(window_ms=2500).encode(),
                         b"\x21\x00\x00\x00\x07\x01\x00\x04\x00\x00\x09\xc4")
        self.assertEqual(wire.GoAway().encode(), b"\x21\x00\x00\x00\x00")

    def test_one_byte_at_a_time(self):
        """Fed a byte at a time between two other frames, each comes out whole, in order."""
        data = (wire.KeepAliveAck().encode() + wire.GoAway(window_ms=70000).encode()
                + wire.GoAway().encode())
        dec = wire.FrameDecoder()
        got = []
        for i in range(len(data)):
            got.extend(dec.feed(data[i:i + 1]))
        self.assertEqual([f.command for f in got], [wire.KEEPALIVE_ACK, wire.GOAWAY, wire.GOAWAY])
        self.assertEqual(wire.parse(got[1]), wire.GoAway(window_ms=70000))
        self.assertIsNone(wire.parse(got[2]).window_ms)  # absent: the device's default window
        self.assertEqual(dec.buffered, 0)

    def test_wrong_width_and_repeats_are_errors(self):
        with self.assertRaises(wire.WireError):
            wire.parse(wire.Frame(wire.GOAWAY, ((1, b"\x00\x01"),)))
        with self.assertRaises(wire.WireError):
            wire.parse(wire.Frame(wire.GOAWAY, ((1, b"\x00" * 4), (1, b"\x00" * 4))))

    def test_unknown_fields_skipped(self):
        """A later gateway may add fields: a device of today still reads the window."""
        frame = wire.Frame(wire.GOAWAY, ((1, (300).to_bytes(4, "big")), (9, b"later")))
        self.assertEqual(wire.parse(frame).window_ms, 300)

    def test_an_older_decoder_sees_an_unknown_command(self):
        """What a device from before GoAway gets: an unknown command, which it skips
        (docs/protocol.md), then the close that follows."""
        (frame,) = wire.FrameDecoder().feed(wire.GoAway(window_ms=5).encode())
        older = {c: m for c, m in wire.MESSAGES.items() if c != wire.GOAWAY}
        self.assertNotIn(frame.command, older)


class PropertyTests(unittest.TestCase):
    @settings(max_examples=300, deadline=None)
    @given(frames)
    def test_round_trip(self, frame):
        self.assertEqual(list(wire.FrameDecoder().feed(wire.encode_frame(frame))), [frame])

    @settings(max_examples=100, deadline=None)
    @given(st.lists(frames, max_size=5), st.integers(1, 50))
    def test_any_chunking(self, fs, step):
        data = b"".join(wire.encode_frame(f) for f in fs)
        dec = wire.FrameDecoder()
        got = []
        for i in range(0, len(data), step):
            got.extend(dec.feed(data[i:i + step]))
        self.assertEqual(got, fs)

    @settings(max_examples=1000, deadline=None)
    @given(st.binary(max_size=2000))
    def test_arbitrary_bytes_raise_only_wire_error(self, data):
        dec = wire.FrameDecoder(max_frame=1000)
        try:
            for frame in dec.feed(data):
                try:
                    wire.parse(frame)
                except wire.WireError:
                    pass
        except wire.WireError:
            pass

    @settings(max_examples=200, deadline=None)
    @given(
        st.builds(
            wire.Notification,
            token=st.binary(min_size=1, max_size=64),
            topic=st.binary(min_size=20, max_size=20),
            payload=st.binary(max_size=5120),
            message_id=st.binary(min_size=1, max_size=16),
            expiry=st.none() | st.integers(0, 2**32 - 1),
            timestamp=st.none() | st.integers(0, 2**64 - 1),
        )
    )
    def test_typed_round_trip(self, msg):
        (frame,) = wire.FrameDecoder().feed(msg.encode())
        self.assertEqual(wire.parse(frame), msg)
