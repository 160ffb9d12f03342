"""A device's Session alone: a real router over a memory store, a fake sender, a Clock.
No bytes, no TLS, no Connect: what the session sends, acks, declines and closes."""

from __future__ import annotations

import uuid

from twisted.internet import defer, task
from twisted.trial import unittest

from pushd import wire
from pushd.gateway.router import ISession, Router
from pushd.gateway.session import ISender, Session, Sessions
from pushd.gateway.tokens import TokenMinter
from pushd.store.interfaces import StoreUnavailable
from pushd.store.memory import MemoryStore
from zope.interface import implementer
from zope.interface.verify import verifyObject

from .helpers import T0, frames_of

TOPIC = "com.example.app"
TH = wire.topic_hash(TOPIC)
DEVICE = "00112233445566778899aabbccddeeff"


@implementer(ISender)
class FakeSender:
    """The connection as a session sees it: frames written, closes asked for."""

    def __init__(self):
        self.paused = False
        self.closing = False
        self.frames = []
        self.writes = 0
        self.failed = []
        self.closed = []

    def send(self, message):
        self.frames.append(message)

    def write(self, data):
        self.writes += 1
        self.frames.extend(frames_of(data))

    def fail(self, reason):
        self.closing = True
        self.failed.append(reason)

    def close(self, reason):
        self.closing = True
        self.closed.append(reason)

    def taken(self):
        out, self.frames = self.frames, []
        return out


class SessionTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.store = MemoryStore()
        self.tokens = TokenMinter(b"secret")
        self.router = Router(self.store, self.tokens, self.clock)
        self.sessions = Sessions(self.router, self.clock, window=2)
        self.sender = FakeSender()
        self.session = self.sessions.open(DEVICE, self.sender)
        self.token = self.tokens.scoped_token(DEVICE, TH)

    def push(self, n=1, **kw):
        for i in range(n):
            self.successResultOf(self.router.accept(
                self.token, TOPIC, b'{"n":%d}' % i, uuid.uuid4(), expiry=int(self.clock.seconds()) + 3600, **kw))

    def pending(self):
        return self.successResultOf(self.store.pending(DEVICE, {TH}, 100, 0))

    def give(self, msg, session=None):
        """A frame from the device, as the connection hands it over (parsed from its bytes)."""
        (parsed,) = frames_of(msg.encode())
        getattr(session or self.session, f"handle_{type(parsed).__name__}")(parsed)

    def ack(self, *notes, status=wire.STATUS_OK):
        for n in notes:
            self.give(wire.NotificationAck(message_id=n.message_id, status=status))
        self.session.flush()  # the connection's read ends

    def test_provides_its_interfaces_and_is_attached_with_an_epoch(self):
        verifyObject(ISession, self.session)
        verifyObject(ISender, self.sender)
        self.assertIs(self.router.sessions[DEVICE], self.session)
        self.assertGreater(self.session.epoch, 0)
        self.assertFalse(hasattr(self.session, "__dict__"))

    def test_nothing_sent_before_a_filter(self):
        self.push()
        self.assertEqual(self.sender.taken(), [])
        self.give(wire.Filter(enabled=[TH]))
        (n,) = self.sender.taken()
        self.assertEqual((n.token, n.topic, n.payload), (self.token, TH, b'{"n":0}'))

    def test_window_bounds_what_is_in_flight(self):
        self.give(wire.Filter(enabled=[TH]))
        self.push(5)
        first = self.sender.taken()
        self.assertEqual([n.payload for n in first], [b'{"n":0}', b'{"n":1}'])
        self.assertEqual(len(self.session.inflight), 2)
        self.ack(first[0])
        (nxt,) = self.sender.taken()
        self.assertEqual(nxt.payload, b'{"n":2}')
        self.assertEqual(len(self.pending()), 4)
        self.assertEqual(self.sessions.delivered, 1)

    def test_a_backlog_goes_out_in_one_write(self):
        self.push(2)
        self.give(wire.Filter(enabled=[TH]))
        self.assertEqual((self.sender.writes, len(self.sender.taken())), (1, 2))

    def test_acked_stays_in_flight_until_the_store_deleted_it(self):
        gate = defer.Deferred()
        real = self.store.ack_many
        calls = []
        self.store.ack_many = lambda device, mids: calls.append(list(mids)) or gate.addCallback(
            lambda _: real(device, mids))
        self.give(wire.Filter(enabled=[TH]))
        self.push(2)
        first, second = self.sender.taken()
        self.give(wire.NotificationAck(message_id=first.message_id, status=0))
        self.give(wire.NotificationAck(message_id=first.message_id, status=0))
        self.give(wire.NotificationAck(message_id=second.message_id, status=0))
        self.assertEqual(calls, [], "deleted when the read ends, together")
        self.session.flush()
        self.assertEqual(calls, [[first.message_id, second.message_id]], "a repeated ack counted once")
        self.session.wake()
        self.assertEqual(self.sender.taken(), [], "still pending in the store, but being deleted")
        self.assertEqual(self.session.unacked(), 0)
        self.assertEqual(len(self.session.inflight), 2, "still counted in the window")
        gate.callback(None)
        self.assertEqual(len(self.session.inflight), 0)
        self.assertEqual(self.pending(), [])

    def test_declined_not_offered_again_until_the_next_filter(self):
        self.give(wire.Filter(enabled=[TH]))
        self.push(2)
        first, second = self.sender.taken()
        self.ack(first, status=wire.STATUS_ERROR)
        self.assertEqual(self.sender.taken(), [], "declined: not offered again on this Filter")
        self.assertEqual(self.session.declined, {first.message_id})
        self.assertEqual(len(self.pending()), 2, "a decline keeps it stored")
        self.ack(second)
        self.assertEqual(self.sender.taken(), [])
        self.give(wire.Filter(enabled=[TH]))
        (again,) = self.sender.taken()
        self.assertEqual(again.message_id, first.message_id)
        self.assertEqual(len(self.session.declined), 0)

    def test_unknown_ack_ignored(self):
        self.give(wire.NotificationAck(message_id=b"nope", status=0))
        self.session.flush()
        self.assertEqual(self.sessions.delivered, 0)

    def test_replaced_by_a_newer_session(self):
        self.give(wire.Filter(enabled=[TH]))
        self.push()
        (n,) = self.sender.taken()
        sender2 = FakeSender()
        session2 = self.sessions.open(DEVICE, sender2)
        self.assertEqual(self.sender.closed, ["replaced by a newer connection"])
        self.assertEqual(sender2.closed, [])
        self.assertIs(self.router.sessions[DEVICE], session2)
        self.assertGreater(session2.epoch, self.session.epoch)
        self.session.ended()  # the old connection goes
        self.assertIs(self.router.sessions[DEVICE], session2, "the old session's end must not detach the new one")
        self.give(wire.Filter(enabled=[TH]), session2)
        (again,) = sender2.taken()
        self.assertEqual(again.message_id, n.message_id, "unacked on the old session: sent on the new one")

    def test_revoked_closes(self):
        self.router.revoked([DEVICE])
        self.assertEqual(self.sender.closed, ["device revoked"])

    def test_ended_detaches_and_sends_nothing_more(self):
        self.give(wire.Filter(enabled=[TH]))
        self.session.ended()
        self.assertNotIn(DEVICE, self.router.sessions)
        self.push()
        self.assertEqual(self.sender.taken(), [])

    def test_paused_sender_holds_back_until_woken(self):
        self.give(wire.Filter(enabled=[TH]))
        self.sender.paused = True
        self.push()
        self.assertEqual(self.sender.taken(), [])
        self.sender.paused = False
        self.session.wake()  # what the connection does when its transport resumes
        self.assertEqual(len(self.sender.taken()), 1)

    def test_closing_while_the_store_reads_sends_nothing(self):
        self.push()
        gate = defer.Deferred()
        real = self.store.pending
        self.store.pending = lambda *a: gate.addCallback(lambda _: real(*a))
        self.give(wire.Filter(enabled=[TH]))
        self.sender.closing = True
        gate.callback(None)
        self.assertEqual(self.sender.taken(), [])
        self.assertEqual(len(self.session.inflight), 0)

    def test_woken_while_reading_reads_again(self):
        gate = defer.Deferred()
        real = self.store.pending
        reads = []

        def pending(*a):
            reads.append(a)
            answer = real(*a)  # what the store has now...
            if len(reads) == 1:  # ...answered later, for the first read
                return gate.addCallback(lambda _: answer)
            return answer

        self.store.pending = pending
        self.give(wire.Filter(enabled=[TH]))  # reads: nothing yet
        self.push()  # stored while the read is out: the wake is remembered
        gate.callback(None)
        self.assertEqual(len(reads), 2)
        self.assertEqual(len(self.sender.taken()), 1, "sent after the second read")

    def test_store_down_read_again_later(self):
        self.push()
        real = self.store.pending
        self.store.pending = lambda *a: defer.fail(StoreUnavailable("Redis did not answer"))
        self.give(wire.Filter(enabled=[TH]))
        self.assertEqual(self.sender.taken(), [])
        self.store.pending = real
        self.clock.advance(self.sessions.retry_delay * 1.5)
        self.assertEqual(len(self.sender.taken()), 1)

    def test_scoped_token_and_unregister_through_the_router(self):
        self.give(wire.ScopedToken(topic=TH))
        (ack,) = self.sender.taken()
        self.assertEqual((ack.status, ack.scoped_token), (wire.STATUS_OK, self.token))
        self.give(wire.Unregister(topic=TH, token=b"x" * 32))
        self.assertEqual(self.sender.failed, ["Unregister names a token that is not this device's"])
        self.give(wire.Unregister(topic=TH, token=self.token))
        self.assertEqual(self.successResultOf(self.store.invalidated(self.token)), self.clock.seconds())

    def test_bad_scoped_token_topic_fails_the_connection(self):
        self.give(wire.ScopedToken(topic=b"short"))
        self.assertEqual(self.sender.failed, ["ScopedToken topic is not a SHA-1 hash"])

    def test_upstream_notification_refused(self):
        self.give(
            wire.Notification(token=b"t" * 32, topic=TH, payload=b"{}", message_id=b"1"))
        (ack,) = self.sender.taken()
        self.assertEqual((ack.message_id, ack.status), (b"1", wire.STATUS_NOT_ALLOWED))


class SessionSizeTests(unittest.TestCase):
    def test_slots_only(self):
        """One per connected device, idle most of its life: no per-instance dict."""
        self.assertFalse(hasattr(Session(None, None, DEVICE), "__dict__"))
