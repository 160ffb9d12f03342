"""
The contract every INodeBus provider passes, on the real reactor. A test case mixes in
BusContract and defines ``makeBus() -> bus`` (handles on one medium; cleanups registered).
"""

from __future__ import annotations

from twisted.internet import defer, reactor, task
from zope.interface.verify import verifyObject

from pushd.store.interfaces import INodeBus


class Listener:
    def __init__(self):
        self.messages = []
        self.connects = 0

    def received(self, data):
        self.messages.append(data)

    def connected(self):
        self.connects += 1


@defer.inlineCallbacks
def until(condition, within=15.0, what="condition"):
    deadline = reactor.seconds() + within
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"{what}: not within {within}s")
        yield task.deferLater(reactor, 0.01, lambda: None)


class BusContract:
    @defer.inlineCallbacks
    def listening(self, node):
        bus, listener = self.makeBus(), Listener()
        bus.listen(node, listener.received, listener.connected)
        yield until(lambda: listener.connects == 1, what="connected")
        return bus, listener

    def test_interface(self):
        verifyObject(INodeBus, self.makeBus())

    @defer.inlineCallbacks
    def test_publish_reaches_the_node_s_listener_only(self):
        _, one = yield self.listening("node-1")
        _, two = yield self.listening("node-2")
        sender = self.makeBus()
        self.assertEqual((yield sender.publish("node-1", b"w dev\nk dev 7")), 1)
        self.assertEqual((yield sender.publish("node-1", b"a")), 1)
        self.assertEqual((yield sender.publish("nobody", b"a")), 0)
        yield until(lambda: len(one.messages) == 2, what="delivered")
        self.assertEqual(one.messages, [b"w dev\nk dev 7", b"a"], "in order, byte for byte")
        self.assertEqual(two.messages, [])

    @defer.inlineCallbacks
    def test_beat_says_whether_the_node_was_alive(self):
        bus = self.makeBus()
        self.assertFalse((yield bus.beat("node-1", 30)))
        self.assertTrue((yield bus.beat("node-1", 30)))
        self.assertFalse((yield bus.beat("node-2", 30)), "per node")

    @defer.inlineCallbacks
    def test_reconnect_says_connected_again_and_still_delivers(self):
        bus, one = yield self.listening("node-1")
        bus.reconnect()
        yield until(lambda: one.connects == 2, what="connected again")
        self.assertEqual((yield self.makeBus().publish("node-1", b"a")), 1)
        yield until(lambda: one.messages == [b"a"], what="delivered")

    @defer.inlineCallbacks
    def test_close_stops_listening(self):
        bus, one = yield self.listening("node-1")
        yield bus.close()
        sender, listeners = self.makeBus(), [1]

        @defer.inlineCallbacks
        def gone():
            listeners[0] = yield sender.publish("node-1", b"a")

        while listeners[0]:  # Redis may see the connection close a moment later
            yield gone()
            yield until(lambda: True)
        self.assertEqual(one.messages, [], "nothing delivered after close")
