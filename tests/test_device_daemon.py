from pathlib import Path

from twisted.internet import defer, task
from twisted.internet.testing import StringTransport
from twisted.internet.error import ConnectionLost
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from pushd import tls, wire
from pushd.device import amp as cmds
from pushd.device.daemon import DeviceDaemon
from pushd.device.identity import Identity

from .helpers import CA_CERT, Device

TOPIC = "com.example.app"
TH = wire.topic_hash(TOPIC)


class Courier:
    """Stands in for the courier protocol: records what the daemon sends."""

    def __init__(self):
        self.sent = []

    def send(self, msg):
        self.sent.append(msg)


class App:
    """Stands in for an app's AMP connection."""

    def __init__(self, uid=1000, process="app[1]"):
        self.topics = set()
        self.calls = []
        self.transport = StringTransport()
        self.uid = uid  # what AppProtocol reads from SO_PEERCRED
        self.process = process

    def callRemote(self, command, **kw):
        d = defer.Deferred()
        self.calls.append((command, kw, d))
        return d

    def answer_all(self, each=None):
        """Ack every Deliver, including those that acking brings; return their payloads."""
        got = []
        while self.calls:
            cmd, kw, d = self.calls.pop(0)
            got.append(kw["payload"])
            d.callback({})
            if each is not None:
                each(got)
        return got


def note(payload, mid):
    return wire.Notification(token=b"T" * 32, topic=TH, payload=payload, message_id=mid)


class Fixture:
    """A daemon on a fresh identity and a Clock, and a stand-in courier."""

    def setUp(self):
        dev = Device()
        self.ident = Identity.create(Path(self.mktemp()), dev.key, dev.cert, tls.cert_pem(CA_CERT))
        self.clock = task.Clock()
        self.daemon = DeviceDaemon(self.ident, self.clock)
        self.addCleanup(lambda: self.daemon.held.close())
        self.courier = Courier()


class DaemonTests(Fixture, unittest.TestCase):
    def test_register_offline_then_token_on_connect(self):
        app = App()
        d = self.daemon.register(TOPIC, app)
        self.assertNoResult(d)
        self.daemon.connected(self.courier, b"B" * 32)
        f, st = self.courier.sent
        self.assertEqual((f.enabled, f.token), ([TH], b"B" * 32))
        self.assertEqual(st.topic, TH)
        self.daemon.tokenReceived(TH, b"S" * 32)
        self.assertEqual(self.successResultOf(d), b"S" * 32)

    def test_identity_survives_restart(self):
        self.daemon.connected(self.courier, b"B" * 32)
        self.daemon.register(TOPIC, App())
        self.daemon.tokenReceived(TH, b"S" * 32)
        again = Identity.load(self.ident.state_dir)
        self.assertEqual(again.device_id, self.ident.device_id)
        self.assertFalse(again.provisioned_now)
        self.assertEqual(again.base_token, b"B" * 32)
        self.assertEqual(again.tokens, {TOPIC: b"S" * 32})
        self.assertEqual(again.apps[TOPIC]["created"], self.ident.apps[TOPIC]["created"])
        # A known token answers at once, even offline.
        d = DeviceDaemon(again, self.clock).register(TOPIC, App())
        self.assertEqual(self.successResultOf(d), b"S" * 32)

    def test_queued_push_is_acked_and_delivered_one_at_a_time_in_order(self):
        app = App()
        self.daemon.register(TOPIC, app)
        self.assertEqual(self.daemon.notificationReceived(note(b"1", b"m1")), wire.STATUS_OK)
        self.assertEqual(self.daemon.notificationReceived(note(b"2", b"m2")), wire.STATUS_OK)
        (cmd, kw, answer), = app.calls
        self.assertEqual((cmd, kw["payload"], kw["message_id"]), (cmds.Deliver, b"1", b"m1"))
        answer.callback({})
        (cmd, kw, answer), = app.calls[1:]
        self.assertEqual(kw["payload"], b"2")
        answer.callback({})
        self.assertEqual(self.daemon.held.count(TOPIC), 0)

    def test_duplicates_dropped(self):
        app = App()
        self.daemon.register(TOPIC, app)
        self.daemon.notificationReceived(note(b"{}", b"m1"))
        self.assertEqual(self.daemon.notificationReceived(note(b"{}", b"m1")), wire.STATUS_OK)
        self.assertEqual(len(app.calls), 1)
        self.assertEqual(self.daemon.duplicates, 1)

    def test_held_while_app_away_then_handed_over_in_order(self):
        app = App()
        self.daemon.register(TOPIC, app)
        self.daemon.app_gone(app)
        for i in range(3):
            self.daemon.notificationReceived(note(b"%d" % i, b"m%d" % i))
        self.assertEqual(self.daemon.held.count(TOPIC), 3)
        back = App()
        self.daemon.register(TOPIC, back)
        self.clock.advance(0)
        self.assertEqual(back.answer_all(), [b"0", b"1", b"2"])
        self.assertEqual(self.daemon.held.count(TOPIC), 0)

    def test_app_failure_keeps_push_at_head(self):
        app = App()
        self.daemon.register(TOPIC, app)
        self.daemon.notificationReceived(note(b"x", b"m1"))
        self.daemon.notificationReceived(note(b"y", b"m2"))
        self.daemon.app_gone(app)
        app.calls[0][2].errback(RuntimeError("gone"))
        self.assertEqual(self.daemon.held.items(TOPIC), [(b"x", b"m1"), (b"y", b"m2")])
        back = App()
        self.daemon.register(TOPIC, back)
        self.clock.advance(0)
        self.assertEqual(back.calls[0][1]["payload"], b"x")

    def test_held_pushes_survive_a_daemon_restart_in_order_once(self):
        app = App()
        self.daemon.register(TOPIC, app)
        self.daemon.app_gone(app)
        for i in range(3):
            self.daemon.notificationReceived(note(b"%d" % i, b"m%d" % i))
        self.daemon.held.close()

        again = DeviceDaemon(Identity.load(self.ident.state_dir), self.clock)
        self.addCleanup(again.held.close)
        self.assertEqual(again.notificationReceived(note(b"1", b"m1")), wire.STATUS_OK)
        self.assertEqual(again.duplicates, 1, "a resent push it already holds is taken once")
        back = App()
        again.register(TOPIC, back)
        self.clock.advance(0)
        self.assertEqual(back.answer_all(), [b"0", b"1", b"2"])
        self.assertEqual(again.held.count(TOPIC), 0)

    def test_unregister_online_and_offline(self):
        class Factory:
            gateway_is_pushd = True
            continueTrying = True

        self.daemon.factory = Factory()
        self.daemon.register(TOPIC, App())
        self.daemon.connected(self.courier, b"B" * 32)
        self.daemon.tokenReceived(TH, b"S" * 32)
        self.courier.sent.clear()
        self.assertTrue(self.daemon.unregister(TOPIC))
        f, u = self.courier.sent
        self.assertEqual(f.enabled, [])
        self.assertEqual((u.token, u.topic), (b"S" * 32, TH))
        self.assertNotIn(TOPIC, Identity.load(self.ident.state_dir).apps)
        self.assertFalse(self.daemon.unregister(TOPIC))

        # Offline: kept, and told the gateway on the next connect.
        self.daemon.register("com.example.two", App())
        self.daemon.tokenReceived(wire.topic_hash("com.example.two"), b"T" * 32)
        self.daemon.disconnected(Failure(ConnectionLost()))
        self.daemon.unregister("com.example.two")
        self.assertEqual(Identity.load(self.ident.state_dir).unregistered, {"com.example.two": b"T" * 32})
        self.courier.sent.clear()
        self.daemon.connected(self.courier, b"B" * 32)
        self.assertIn(wire.Unregister(token=b"T" * 32, topic=wire.topic_hash("com.example.two")), self.courier.sent)
        self.assertEqual(Identity.load(self.ident.state_dir).unregistered, {})

    def test_bad_topic(self):
        self.assertRaises(ValueError, self.daemon.register, "", App())
        self.assertRaises(ValueError, self.daemon.register, "x" * 256, App())

    def test_status(self):
        self.daemon.register(TOPIC, App())
        r = self.daemon.status()
        self.assertEqual(r["courier"]["courier status"], "Disabled")
        self.assertEqual(r["apps"][0]["application port name"], TOPIC)
        self.assertEqual(r["apps"][0]["persistent connection status"], "Not connected to service")
        self.daemon.connected(self.courier, b"B" * 32)
        r = self.daemon.status()
        self.assertEqual(r["courier"]["courier status"], "Connected")
        self.assertEqual(r["apps"][0]["persistent connection status"], "Waiting for push notifications")


class OwnershipTests(Fixture, unittest.TestCase):
    """A topic belongs to the uid that registered it (AppProtocol reads it by SO_PEERCRED;
    here the stand-in carries it; tests/test_isolation.py does it over a real socket)."""

    def setUp(self):
        Fixture.setUp(self)
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)
        self.owner = App(uid=1000, process="mail[10]")
        self.daemon.register(TOPIC, self.owner)

    def lines(self, word):
        return [formatEvent(e) for e in self.logged if word in e.get("log_format", "")]

    def test_another_uid_cannot_register_or_unregister(self):
        thief = App(uid=1001, process="thief[11]")
        with self.assertRaisesRegex(cmds.TopicOwned, "registered by another user \\(uid 1000\\)"):
            self.daemon.register(TOPIC, thief)
        with self.assertRaises(cmds.TopicOwned):
            self.daemon.unregister(TOPIC, thief)
        self.assertIs(self.daemon.apps[TOPIC], self.owner)
        self.assertFalse(self.owner.transport.disconnecting)
        self.assertIn(TOPIC, self.daemon.identity.apps)
        self.daemon.notificationReceived(note(b"for the owner", b"m1"))
        self.assertEqual([kw["payload"] for _, kw, _ in self.owner.calls], [b"for the owner"])
        self.assertEqual(thief.calls, [])
        (line,) = self.lines("refused")
        self.assertIn("refused to register com.example.app for thief[11] (uid 1001): it belongs to uid 1000", line)

    def test_unknown_uid_is_refused(self):
        with self.assertRaisesRegex(cmds.TopicOwned, "cannot tell which user"):
            self.daemon.register("com.example.other", App(uid=None))
        self.assertNotIn("com.example.other", self.daemon.identity.apps)

    def test_same_uid_takes_over_with_a_log_line(self):
        again = App(uid=1000, process="mail[12]")
        self.daemon.register(TOPIC, again)
        self.assertIs(self.daemon.apps[TOPIC], again)
        self.assertTrue(self.owner.transport.disconnecting)
        (line,) = self.lines("taken over")
        self.assertIn("com.example.app taken over by mail[12] from mail[10] (both uid 1000)", line)
        self.assertTrue(self.daemon.unregister(TOPIC, again), "the owner may unregister")

    def test_binding_survives_a_restart(self):
        self.daemon.held.close()
        again = DeviceDaemon(Identity.load(self.ident.state_dir), self.clock)
        self.addCleanup(again.held.close)
        self.assertEqual(again.owner(TOPIC), 1000)
        with self.assertRaises(cmds.TopicOwned):
            again.register(TOPIC, App(uid=1001))
        again.register(TOPIC, App(uid=1000))

    def test_topics_from_before_owners_were_kept_are_the_daemon_users(self):
        del self.ident.apps[TOPIC]["uid"]
        self.ident.save()
        self.daemon.held.close()
        again = DeviceDaemon(Identity.load(self.ident.state_dir), self.clock, default_uid=1002)
        self.addCleanup(again.held.close)
        with self.assertRaises(cmds.TopicOwned):
            again.register(TOPIC, App(uid=1000))
        again.register(TOPIC, App(uid=1002))
        self.assertEqual(Identity.load(self.ident.state_dir).apps[TOPIC]["uid"], 1002, "now explicit")

    def test_refusals_are_logged_at_most_once_a_second(self):
        for _ in range(50):
            self.assertRaises(cmds.TopicOwned, self.daemon.register, TOPIC, App(uid=1001))
        self.assertEqual(len(self.lines("refused")), 1)
        self.clock.advance(1)  # the rest, counted, in one line when the second is over
        self.assertEqual(len(self.lines("refused")), 2)
        self.assertIn("(49 refusals since the last line, the last shown)", self.lines("refused")[-1])


class BackpressureTests(Fixture, unittest.TestCase):
    """With its app away, a topic's pushes are queued up to a bound, then the topic is
    filtered out (the gateway keeps the rest) until the app has drained the queue to half."""

    def setUp(self):
        from pushd.device.daemon import HARD_LIMIT, HELD_PER_TOPIC

        Fixture.setUp(self)
        self.limit = HELD_PER_TOPIC
        self.hard = HARD_LIMIT
        app = App()
        self.daemon.register(TOPIC, app)
        self.daemon.app_gone(app)
        self.daemon.connected(self.courier, b"B" * 32)
        self.daemon.tokenReceived(TH, b"S" * 32)
        self.filters = lambda: [m.enabled for m in self.courier.sent if isinstance(m, wire.Filter)]

    def test_full_queue_filters_out_and_keeps_order(self):
        self.assertEqual(self.filters(), [[TH]])
        for i in range(self.limit):
            self.assertEqual(self.daemon.notificationReceived(note(b"%d" % i, b"m%d" % i)), wire.STATUS_OK)
        self.assertEqual(self.filters(), [[TH], []])
        # What the gateway had in flight before it saw the Filter is still taken, in order.
        for i in range(self.limit, self.limit + 10):
            self.assertEqual(self.daemon.notificationReceived(note(b"%d" % i, b"m%d" % i)), wire.STATUS_OK)

        back = App()
        self.daemon.register(TOPIC, back)
        self.clock.advance(0)

        def check(_):
            n = self.daemon.held.count(TOPIC)
            if n == self.limit // 2 + 1:
                self.assertEqual(self.filters(), [[TH], []], "still filtered out above half")
            if n == self.limit // 2:
                self.assertEqual(self.filters(), [[TH], [], [TH]], "enabled again at half")

        got = back.answer_all(check)
        self.assertEqual(got, [b"%d" % i for i in range(self.limit + 10)])

    def test_gateway_ignoring_the_filter_is_declined(self):
        for i in range(self.hard):
            self.daemon.notificationReceived(note(b"%d" % i, b"m%d" % i))
        self.assertEqual(self.daemon.notificationReceived(note(b"over", b"over")), wire.STATUS_ERROR)
        self.assertFalse(self.daemon.held.seen(b"over"), "a declined push is not a duplicate later")
