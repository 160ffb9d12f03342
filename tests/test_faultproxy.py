"""The fault proxy's faults, one by one, on in-memory transports and a Clock."""

from __future__ import annotations

import random
import socket
import struct

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial import unittest

from bench.faultproxy import FaultProxy


class Linger(StringTransport):
    """A StringTransport with a socket handle, to see the SO_LINGER a reset sets."""

    def __init__(self):
        super().__init__()
        self.options = []
        self.aborted = False

    def getHandle(self):
        return self

    def setsockopt(self, *args):
        self.options.append(args)

    def abortConnection(self):
        self.aborted = True
        super().abortConnection()


class PipeTests(unittest.TestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.proxy = FaultProxy(self.reactor, "127.0.0.1", 5223, random.Random(1))
        self.device = self.proxy.buildProtocol(None)
        self.dt = Linger()
        self.device.makeConnection(self.dt)
        (host, port, factory, timeout, bind) = self.reactor.tcpClients[0]
        self.assertEqual((host, port), ("127.0.0.1", 5223))
        self.pipe = self.device.pipe
        self.device.dataReceived(b"early")  # before the gateway side is up: held, in order
        self.gateway = factory.buildProtocol(None)
        self.gt = Linger()
        self.gateway.makeConnection(self.gt)

    def test_bytes_pass_both_ways_in_order(self):
        self.device.dataReceived(b"-hello")
        self.gateway.dataReceived(b"ack")
        self.assertEqual(self.gt.value(), b"early-hello")
        self.assertEqual(self.dt.value(), b"ack")
        self.assertIs(self.proxy.live(), self.pipe)

    def test_a_close_on_one_side_closes_the_other(self):
        self.device.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.gt.disconnecting)

    def test_drop_closes_both_sides(self):
        self.pipe.close()
        self.assertTrue(self.dt.disconnecting and self.gt.disconnecting)
        self.assertFalse(self.dt.aborted or self.gt.aborted)
        self.assertIsNone(self.proxy.live())

    def test_reset_sends_rst_on_both_sides(self):
        self.pipe.reset()
        for t in (self.dt, self.gt):
            self.assertTrue(t.aborted)
            # SO_LINGER on with 0 s: close() sends an RST, not a FIN.
            self.assertEqual(t.options, [(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))])

    def test_delay_holds_then_releases_in_order(self):
        done = self.pipe.delay(2.0)
        self.device.dataReceived(b"-a")
        self.gateway.dataReceived(b"b")
        self.device.dataReceived(b"-c")
        self.assertEqual((self.gt.value(), self.dt.value()), (b"early", b""))
        self.reactor.advance(2.0)
        self.assertTrue(done.called)
        self.assertEqual((self.gt.value(), self.dt.value()), (b"early-a-c", b"b"))

    def test_truncate_cuts_the_next_chunk_from_the_side_asked_then_closes(self):
        cut = []
        self.pipe.truncate("device").addCallback(cut.append)
        self.gateway.dataReceived(b"from the gateway")  # the other direction passes
        self.assertEqual(cut, [])
        self.device.dataReceived(b"0123456789")
        forwarded = self.gt.value()[len(b"early"):]
        self.assertTrue(0 < len(forwarded) < 10, forwarded)
        self.assertTrue(b"0123456789".startswith(forwarded))
        self.assertTrue(self.dt.disconnecting and self.gt.disconnecting)
        self.assertRegex(cut[0], r"^device->gateway \d of 10 bytes$")

    def test_blackhole_forwards_nothing_and_closes_nothing(self):
        self.pipe.blackhole()
        self.gt.clear()
        self.device.dataReceived(b"keepalive")
        self.gateway.dataReceived(b"notification")
        self.assertEqual((self.gt.value(), self.dt.value()), (b"", b""))
        # The device gives up on it: the gateway side hears nothing of that.
        self.device.connectionLost(Failure(ConnectionDone()))
        self.assertFalse(self.gt.disconnecting)
        self.assertIn(self.pipe, self.proxy.pipes)
        self.gateway.connectionLost(Failure(ConnectionDone()))
        self.assertNotIn(self.pipe, self.proxy.pipes)
