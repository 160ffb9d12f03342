import uuid

from twisted.trial import unittest

from pushd import wire
from pushd.gateway.errors import Unregistered

from .helpers import OTHER_CA_CERT, OTHER_CA_KEY, Device, Gateway, frames_of

TOPIC = "com.example.app"
TH = wire.topic_hash(TOPIC)


class ConnectTests(unittest.TestCase):
    def setUp(self):
        self.gw = Gateway()

    def test_connect_ack_fields(self):
        """The ConnectAck carries every field pypush's parser requires."""
        d = Device()
        proto, t, ack = self.gw.connected(d)
        self.assertIsInstance(ack, wire.ConnectAck)
        self.assertEqual(ack.status, 0)
        self.assertEqual(ack.token, self.gw.tokens.base_token(d.id))
        self.assertEqual(ack.max_message_size, 4096)
        self.assertEqual((ack.unknown5, ack.capabilities), (b"", b""))
        self.assertEqual(ack.server_time, int(self.gw.clock.seconds() * 1000))
        self.assertIsNone(ack.keepalive_interval, "a plain APNs client sees no extension")
        self.assertIs(self.gw.router.sessions[d.id], proto.session)

    def test_pushd_client_gets_keepalive_interval(self):
        proto, t = self.gw.connection()
        proto.dataReceived(Device().connect(self.gw.clock.seconds(), pushd_version=1).encode())
        self.assertEqual(frames_of(t.value())[0].keepalive_interval, 60)

    def test_connect_byte_by_byte(self):
        d = Device()
        proto, t = self.gw.connection()
        for b in d.connect(self.gw.clock.seconds()).encode():
            proto.dataReceived(bytes([b]))
        self.assertEqual(frames_of(t.value())[0].status, 0)

    def assertRefused(self, proto, t, reason):
        self.assertTrue(t.disconnecting)
        self.assertIsNone(proto.device_id)
        errors = self.flushLoggedErrors()
        self.assertEqual(errors, [])
        self.assertEqual(self.gw.router.sessions, {})

    def test_other_ca(self):
        proto, t = self.gw.connection()
        proto.dataReceived(Device(ca=(OTHER_CA_KEY, OTHER_CA_CERT)).connect(self.gw.clock.seconds()).encode())
        ack = frames_of(t.value())[0]
        self.assertNotEqual(ack.status, 0)
        self.assertRefused(proto, t, "not issued")
        self.assertEqual(self.gw.factory.auth_failures, 1)

    def test_stale_nonce_refusal_tells_the_server_time(self):
        """A device whose clock is off sets its next nonce by this (see the device tests)."""
        proto, t = self.gw.connection()
        proto.dataReceived(Device().connect(self.gw.clock.seconds() + 520).encode())
        ack = frames_of(t.value())[0]
        self.assertNotEqual(ack.status, 0)
        self.assertEqual(ack.server_time, int(self.gw.clock.seconds() * 1000))
        self.assertRefused(proto, t, "stale nonce")

    def test_forged_signature(self):
        d, other = Device(), Device()
        c = d.connect(self.gw.clock.seconds())
        c.signature = other.connect(self.gw.clock.seconds(), nonce=c.nonce).signature
        proto, t = self.gw.connection()
        proto.dataReceived(c.encode())
        self.assertRefused(proto, t, "signature")

    def test_unsigned(self):
        proto, t = self.gw.connection()
        c = Device().connect(self.gw.clock.seconds())
        frame = wire.Frame(wire.CONNECT, tuple((i, v) for i, v in c.to_frame().fields if i != 14))
        proto.dataReceived(wire.encode_frame(frame))
        self.assertRefused(proto, t, "lacks field 14")

    def test_frame_before_connect(self):
        proto, t = self.gw.connection()
        proto.dataReceived(wire.KeepAlive().encode())
        self.assertTrue(t.disconnecting)
        self.assertEqual(t.value(), b"")

    def test_random_bytes(self):
        proto, t = self.gw.connection()
        proto.dataReceived(b"\xff\x00\x00\x00\x01\x00GET / HTTP/1.1\r\n")
        self.assertTrue(t.disconnecting)
        self.assertEqual(self.gw.factory.protocol_errors, 1)

    def test_oversize_length(self):
        proto, t = self.gw.connection()
        proto.dataReceived(b"\x07\x7f\xff\xff\xff")
        self.assertTrue(t.disconnecting)
        self.assertEqual(proto.decoder.buffered, 5)

    def test_no_connect_in_time(self):
        proto, t = self.gw.connection()
        self.gw.clock.advance(9)  # the connect deadline: 10 s by default
        self.assertFalse(t.disconnecting)
        self.gw.clock.advance(2)
        self.assertTrue(t.disconnecting)

    def test_second_connection_replaces_first(self):
        d = Device()
        p1, t1, _ = self.gw.connected(d)
        p2, t2, _ = self.gw.connected(d)
        self.assertTrue(t1.disconnecting)
        self.assertFalse(t2.disconnecting)
        self.assertIs(self.gw.router.sessions[d.id], p2.session)
        p1.connectionLost(None)
        self.assertIs(self.gw.router.sessions[d.id], p2.session, "old session's close must not detach the new one")


class SessionTests(unittest.TestCase):
    def setUp(self):
        self.gw = Gateway(window=3)
        self.dev = Device()
        self.proto, self.t, ack = self.gw.connected(self.dev)
        self.token = self.gw.tokens.scoped_token(self.dev.id, TH)

    def push(self, body=b'{"n":1}', expiry=None, **kw):
        if expiry is None:
            expiry = int(self.gw.clock.seconds()) + 3600
        d = self.gw.router.accept(self.token, TOPIC, body, uuid.uuid4(), expiry=expiry, **kw)
        return self.successResultOf(d)

    def sent(self):
        out = frames_of(self.t.value())
        self.t.clear()
        return out

    def test_keepalive_answered_and_timer_reset(self):
        self.gw.clock.advance(170)
        self.proto.dataReceived(wire.KeepAlive().encode())
        self.assertEqual(self.sent(), [wire.KeepAliveAck()])
        self.gw.clock.advance(170)
        self.assertFalse(self.t.disconnecting)
        self.gw.clock.advance(11)
        self.assertTrue(self.t.disconnecting, "silent for keepalive x grace: closed")

    def test_scoped_token(self):
        self.proto.dataReceived(wire.ScopedToken(token=b"x", topic=TH).encode())
        (ack,) = self.sent()
        self.assertEqual((ack.status, ack.scoped_token, ack.topic), (0, self.token, TH))

    def test_delivered_only_after_filter(self):
        self.push()
        self.assertEqual(self.sent(), [])
        self.proto.dataReceived(wire.Filter(enabled=[TH]).encode())
        (n,) = self.sent()
        self.assertEqual((n.token, n.topic, n.payload), (self.token, TH, b'{"n":1}'))

    def test_ack_deletes_and_window_bounds_inflight(self):
        self.proto.dataReceived(wire.Filter(enabled=[TH]).encode())
        for i in range(5):
            self.push(b'{"n":%d}' % i)
        first = self.sent()
        self.assertEqual([n.payload for n in first], [b'{"n":%d}' % i for i in range(3)])
        self.proto.dataReceived(wire.NotificationAck(message_id=first[0].message_id, status=0).encode())
        (nxt,) = self.sent()
        self.assertEqual(nxt.payload, b'{"n":3}')
        pending = self.successResultOf(self.gw.store.pending(self.dev.id, {TH}, 100, 0))
        self.assertEqual(len(pending), 4)

    def test_acked_message_not_resent_while_its_delete_is_pending(self):
        """The store deletes asynchronously; until it has, the message must not look pending."""
        from twisted.internet import defer

        gate = defer.Deferred()
        real_ack = self.gw.store.ack_many
        self.gw.store.ack_many = lambda device, mids: gate.addCallback(lambda _: real_ack(device, mids))
        self.proto.dataReceived(wire.Filter(enabled=[TH]).encode())
        self.push(b'{"n":1}')
        (first,) = self.sent()
        self.proto.dataReceived(wire.NotificationAck(message_id=first.message_id, status=0).encode())
        self.push(b'{"n":2}')
        self.assertEqual([n.payload for n in self.sent()], [b'{"n":2}'])
        gate.callback(None)
        self.assertEqual(self.sent(), [])
        self.assertNotIn(first.message_id, self.proto.session.inflight)

    def test_acks_of_one_read_deleted_in_one_store_call(self):
        calls = []
        real = self.gw.store.ack_many
        self.gw.store.ack_many = lambda device, mids: calls.append(list(mids)) or real(device, mids)
        self.proto.dataReceived(wire.Filter(enabled=[TH]).encode())
        for i in range(3):
            self.push(b'{"n":%d}' % i)
        sent = self.sent()
        self.proto.dataReceived(b"".join(wire.NotificationAck(message_id=n.message_id, status=0).encode() for n in sent))
        self.assertEqual(calls, [[n.message_id for n in sent]])
        self.assertEqual(self.successResultOf(self.gw.store.pending(self.dev.id, {TH}, 100, 0)), [])

    def test_queue_read_again_after_the_store_failed(self):
        from twisted.internet import defer

        from pushd.store.interfaces import StoreUnavailable

        self.push(b'{"n":1}')
        real = self.gw.store.pending
        self.gw.store.pending = lambda *a: defer.fail(StoreUnavailable("Redis did not answer"))
        self.proto.dataReceived(wire.Filter(enabled=[TH]).encode())
        self.assertEqual(self.sent(), [])
        self.gw.store.pending = real
        self.gw.clock.advance(self.gw.factory.retry_delay * 1.5)
        self.assertEqual([n.payload for n in self.sent()], [b'{"n":1}'])

    def test_unacked_resent_on_reconnect(self):
        self.proto.dataReceived(wire.Filter(enabled=[TH]).encode())
        self.push()
        (n,) = self.sent()
        self.proto.connectionLost(None)
        proto2, t2, _ = self.gw.connected(self.dev)
        proto2.dataReceived(wire.Filter(enabled=[TH]).encode())
        (again,) = frames_of(t2.value())
        self.assertEqual(again.message_id, n.message_id)

    def test_declined_stays_stored_until_next_filter(self):
        self.proto.dataReceived(wire.Filter(enabled=[TH]).encode())
        self.push(b'{"n":1}')
        self.push(b'{"n":2}')
        first, second = self.sent()
        self.proto.dataReceived(wire.NotificationAck(message_id=first.message_id, status=wire.STATUS_ERROR).encode())
        self.assertEqual(self.sent(), [], "not offered again on this Filter")
        pending = self.successResultOf(self.gw.store.pending(self.dev.id, {TH}, 10, 0))
        self.assertEqual(len(pending), 2)
        self.proto.dataReceived(wire.NotificationAck(message_id=second.message_id, status=0).encode())
        self.proto.dataReceived(wire.Filter(enabled=[TH]).encode())
        (again,) = self.sent()
        self.assertEqual(again.message_id, first.message_id)

    def test_paused_transport_holds_back(self):
        self.proto.dataReceived(wire.Filter(enabled=[TH]).encode())
        self.proto.pauseProducing()
        self.push()
        self.assertEqual(self.sent(), [])
        self.proto.resumeProducing()
        self.assertEqual(len(self.sent()), 1)

    def test_expiration_zero_offline_is_dropped(self):
        self.proto.connectionLost(None)
        self.push(expiry=0)
        self.assertEqual(self.successResultOf(self.gw.store.pending(self.dev.id, {TH}, 10, 0)), [])
        self.assertEqual(self.gw.router.dropped_offline, 1)

    def test_expired_never_delivered(self):
        self.push(expiry=int(self.gw.clock.seconds()) + 10)
        self.gw.clock.advance(11)
        self.proto.dataReceived(wire.Filter(enabled=[TH]).encode())
        self.assertEqual(self.sent(), [])

    def test_collapse_id_replaces(self):
        self.push(b'{"v":1}', collapse_id="score")
        self.push(b'{"v":2}', collapse_id="score")
        self.proto.dataReceived(wire.Filter(enabled=[TH]).encode())
        self.assertEqual([n.payload for n in self.sent()], [b'{"v":2}'])

    def test_unregister_invalidates_and_scoped_token_revalidates(self):
        self.proto.dataReceived(wire.Unregister(token=self.token, topic=TH).encode())
        self.assertEqual(self.successResultOf(self.gw.store.invalidated(self.token)), self.gw.clock.seconds())
        d = self.gw.router.accept(self.token, TOPIC, b"{}", uuid.uuid4(), expiry=int(self.gw.clock.seconds()) + 60)
        self.assertEqual(self.failureResultOf(d, Unregistered).value.since, self.gw.clock.seconds())
        self.proto.dataReceived(wire.ScopedToken(token=b"x", topic=TH).encode())
        self.assertIsNone(self.successResultOf(self.gw.store.invalidated(self.token)))

    def test_unregister_of_another_devices_token_closes(self):
        other = self.gw.tokens.scoped_token(Device().id, TH)
        self.proto.dataReceived(wire.Unregister(token=other, topic=TH).encode())
        self.assertTrue(self.t.disconnecting)
        self.assertIsNone(self.successResultOf(self.gw.store.invalidated(other)))

    def test_unknown_command_closes(self):
        self.proto.dataReceived(wire.encode_frame(wire.Frame(99, ())))
        self.assertTrue(self.t.disconnecting)

    def test_upstream_notification_refused(self):
        self.proto.dataReceived(wire.Notification(token=b"t" * 32, topic=TH, payload=b"{}", message_id=b"1").encode())
        (ack,) = self.sent()
        self.assertEqual((ack.message_id, ack.status), (b"1", wire.STATUS_NOT_ALLOWED))
