"""Admission control against a real gateway process: connections over the per-address cap
are closed at accept, with no TLS handshake, while an honest device from another address
still connects and receives a push."""

import re
import ssl as stdlib_ssl

from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from .stack import Stack

ATTACKER = "127.0.0.2"  # any 127/8 address is loopback on Linux: another source address


def client_hello() -> bytes:
    """The first flight of a real TLS client."""
    ctx = stdlib_ssl.SSLContext(stdlib_ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = stdlib_ssl.CERT_NONE
    ctx.set_alpn_protocols(["apns-security-v3"])
    incoming, outgoing = stdlib_ssl.MemoryBIO(), stdlib_ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        obj.do_handshake()
    except stdlib_ssl.SSLWantReadError:
        pass
    return outgoing.read()


class Hello(protocol.Protocol):
    """Sends a ClientHello; ``first`` fires with ("data", bytes) or ("closed", received)."""

    def __init__(self, hello):
        self.hello = hello
        self.received = b""
        self.first = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.hello)

    def dataReceived(self, data):
        self.received += data
        if not self.first.called:
            self.first.callback(("data", self.received))

    def connectionLost(self, reason):
        if not self.first.called:
            self.first.callback(("closed", self.received))


class PerAddressCapTests(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_over_the_cap_closed_before_tls_honest_device_served(self):
        cap, extra = 3, 5
        s = Stack(self, "--max-per-address", str(cap), "--connect-deadline", "60")
        yield s.start_gateway()

        hello = client_hello()
        conns = []
        for _ in range(cap + extra):
            p = Hello(hello)
            c = protocol.ClientCreator(reactor, lambda p=p: p)
            yield c.connectTCP("127.0.0.1", s.courier_port, bindAddress=(ATTACKER, 0))
            conns.append(p)
        self.addCleanup(lambda: [p.transport.abortConnection() for p in conns if p.transport.connected])
        results = yield defer.gatherResults([p.first for p in conns])

        answered = [r for kind, r in results if kind == "data"]
        refused = [r for kind, r in results if kind == "closed"]
        self.assertEqual(len(answered), cap, results)
        for r in answered:
            self.assertEqual(r[:1], b"\x16", "a TLS handshake record (ServerHello)")
        self.assertEqual(len(refused), extra)
        self.assertEqual(refused, [b""] * extra, "closed without a byte of TLS")

        # An honest device from another address connects and receives a push meanwhile.
        yield s.start_device()
        app = s.listen(1)
        token = (yield app.wait_for(r"^token ([0-9a-f]{64})$")).group(1)
        out, err, code = yield s.send(token, {"aps": {"alert": "through"}})
        self.assertTrue(out.startswith(b"200 "), out + err)
        yield app.wait_for(r'"alert": "through"')
        self.assertTrue(all(p.transport.connected for p in conns if p.received), "admitted ones still held")

        # Refusals are counted in the log, a line a second at most (the first at once).
        def counted():
            return sum(int(m.group(1)) for m in (
                re.search(r"refused (\d+) courier connections since the last line: \{'per-address'", line)
                for line in s.gateway.lines) if m)

        deadline = reactor.seconds() + 5
        while counted() < extra and reactor.seconds() < deadline:
            yield deferLater(0.2)
        self.assertEqual(counted(), extra, s.gateway.log())


def deferLater(seconds):
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


class UnauthenticatedCapTests(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_pre_connect_connections_capped_connected_device_served(self):
        """--max-unauthenticated over real TLS: beyond it a pre-Connect connection is closed
        without a byte, and a connected device keeps its place and gets its pushes."""
        cap, extra = 3, 2
        s = Stack(self, "--max-unauthenticated", str(cap), "--connect-deadline", "60")
        yield s.start_gateway()
        yield s.start_device()
        app = s.listen(1)
        token = (yield app.wait_for(r"^token ([0-9a-f]{64})$")).group(1)

        hello = client_hello()
        conns = []
        for _ in range(cap + extra):
            p = Hello(hello)
            c = protocol.ClientCreator(reactor, lambda p=p: p)
            yield c.connectTCP("127.0.0.1", s.courier_port, bindAddress=(ATTACKER, 0))
            conns.append(p)
        self.addCleanup(lambda: [p.transport.abortConnection() for p in conns if p.transport.connected])
        results = yield defer.gatherResults([p.first for p in conns])
        self.assertEqual(sorted(kind for kind, _ in results), ["closed"] * extra + ["data"] * cap, results)
        self.assertEqual([r for kind, r in results if kind == "closed"], [b""] * extra)

        out, err, code = yield s.send(token, {"aps": {"alert": "still here"}})
        self.assertTrue(out.startswith(b"200 "), out + err)
        yield app.wait_for(r'"alert": "still here"')
