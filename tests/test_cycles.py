"""An ended connection is freed by refcounting alone, not left to the cyclic collector: its
reference cycles (TLS producer membrane, a TLS error's traceback, h2's dispatch table) are
broken when it ends. Measured (bench/abuse.py): the cycles of closed connections made full
collections of 41-102 ms under floods, each an honest push's stall."""

import gc
import weakref
from pathlib import Path

from twisted.internet import protocol, task
from twisted.internet.error import ConnectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial import unittest

from pushd import tls
from pushd.endpoints import LeanTLSFactory


class Producing(protocol.Protocol):
    """Registers itself as its transport's producer, as twisted.web's channel and the
    courier do (the TLS protocol then holds it through a producer membrane)."""

    def connectionMade(self):
        self.transport.registerProducer(self, True)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


class NoCollector:
    """The cyclic collector off (after one collection of what came before)."""

    def __enter__(self):
        gc.collect()
        self.was = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc):
        if self.was:
            gc.enable()


class TLSConnectionTests(unittest.TestCase):
    def connect(self):
        pki = tls.load_or_create_pki(Path(self.mktemp()), ["localhost"])
        server_f = LeanTLSFactory(pki.server_options(tls.COURIER_ALPN), False,
                                  protocol.Factory.forProtocol(Producing), clock=task.Clock())
        client_f = LeanTLSFactory(  # so that the client's cycles do not hold iosim's pump
            tls.client_options("localhost", tls.cert_pem(pki.ca_cert), tls.COURIER_ALPN), True,
            protocol.Factory.forProtocol(protocol.Protocol), clock=task.Clock())
        server = server_f.buildProtocol(None)
        client = client_f.buildProtocol(None)
        _, _, pump = iosim.connectedServerAndClient(lambda: server, lambda: client, greet=True)
        pump.flush()
        self.assertTrue(server.handshake_done)
        return server, client, pump

    def assertFreed(self, end):
        with NoCollector():
            server, client, pump = self.connect()
            refs = [weakref.ref(server), weakref.ref(server.wrappedProtocol)]
            end(pump)
            pump.flush()
            self.assertFalse(server.connected)
            # What the reactor's TCP transport does once it reported the loss (iosim's does
            # not): forget its producer and its protocol.
            for io in (pump.serverIO, pump.clientIO):
                io.producer = io.protocol = None
            del server, client, pump
            self.assertEqual([r() for r in refs], [None, None], "freed by refcount alone")

    def test_closed_cleanly(self):
        self.assertFreed(lambda pump: pump.client.loseConnection())

    def test_closed_without_close_notify(self):
        """An EOF in the middle of TLS (what floods end with): a Failure with a traceback."""
        self.assertFreed(lambda pump: pump.clientIO.abortConnection())


class H2Tests(unittest.TestCase):
    def test_self_check(self):
        from pushd._lowlevel import h2

        self.assertEqual(h2.self_check(), [])

    def test_ended_h2_connection_freed(self):
        from pushd.gateway.provider.http2 import Logs, ProviderH2
        from twisted.internet.testing import StringTransport

        clock = task.Clock()
        with NoCollector():
            p = ProviderH2(None, clock, 60.0, logs=Logs(clock, Logger(observer=lambda e: None)), peer="t")
            p.makeConnection(StringTransport())
            ref = weakref.ref(p.conn)
            p.connectionLost(Failure(ConnectionDone()))
            p.conn = None
            self.assertIsNone(ref(), "h2's H2Connection freed by refcount alone")
