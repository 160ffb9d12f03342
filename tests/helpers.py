"""Shared test fixtures: a CA, device identities, and frame helpers."""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from twisted.internet import task
from twisted.internet.testing import StringTransport

from pushd import tls, wire
from pushd.gateway.courier import CourierFactory
from pushd.gateway.router import Router
from pushd.gateway.tokens import TokenMinter
from pushd.store.memory import MemoryStore

CA_KEY, CA_CERT = tls.make_ca()
OTHER_CA_KEY, OTHER_CA_CERT = tls.make_ca("someone else's CA")
T0 = 1_800_000_000.0


class Device:
    def __init__(self, kind="ec", ca=(CA_KEY, CA_CERT)):
        self.key = tls.new_key(kind)
        self.cert = tls.issue_device_cert(ca[0], ca[1], self.key.public_key())
        self.id = tls.device_id_of(self.cert)
        self.der = self.cert.public_bytes(serialization.Encoding.DER)

    def connect(self, now, **kw):
        nonce = tls.make_nonce(now)
        fields = dict(certificate=self.der, nonce=nonce, signature=tls.sign_nonce(self.key, nonce))
        fields.update(kw)
        return wire.Connect(**fields)


def frames_of(data: bytes):
    return [wire.parse(f) for f in wire.FrameDecoder().feed(data)]


class Gateway:
    """A courier factory over a memory store, driven by a Clock."""

    def __init__(self, **kw):
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.store = MemoryStore(per_topic=kw.pop("per_topic", 1000))
        self.tokens = TokenMinter(b"secret")
        self.router = Router(self.store, self.tokens, self.clock)
        self.factory = CourierFactory(self.router, CA_CERT, clock=self.clock, **kw)

    def connection(self):
        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def connected(self, device):
        proto, transport = self.connection()
        proto.dataReceived(device.connect(self.clock.seconds()).encode())
        ack = frames_of(transport.value())
        transport.clear()
        return proto, transport, ack[0]
