"""
End to end with real processes and real TLS on loopback: twistd pushd-gateway,
twistd pushd-device, pushctl listen as the app, pushctl send as the app server.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import tempfile
from pathlib import Path

from cryptography import x509
from twisted.internet import defer, protocol, reactor, ssl
from twisted.trial import unittest

from pushd import tls, wire

from . import procs
from .helpers import OTHER_CA_CERT, OTHER_CA_KEY, Device

TOPIC = "com.example.e2e"


class Stack:
    """A gateway and a device daemon as processes, in a test's temp dir."""

    def __init__(self, case: unittest.TestCase):
        self.case = case
        # Short: AF_UNIX paths are limited to 107 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="pushd-e2e-"))
        case.addCleanup(shutil.rmtree, self.dir, True)
        self.gw_state = self.dir / "gateway"
        self.dev_state = self.dir / "device"
        self.courier_port = procs.free_port()
        self.provider_port = procs.free_port()
        self.gateway = self.device = None

    def start_gateway(self):
        self.gateway = procs.spawn(
            "gateway",
            procs.TWISTD + [
                "pushd-gateway",
                "--state-dir", str(self.gw_state),
                "--courier", f"tls:{self.courier_port}:interface=127.0.0.1",
                "--provider", f"tls:{self.provider_port}:interface=127.0.0.1",
                "--keepalive", "5",
            ],
            self.dir,
        )
        self.case.addCleanup(self.gateway.stop)
        return self.gateway.wait_for(r"Site \(TLS\) starting on")

    def start_device(self):
        self.device = procs.spawn(
            "device",
            procs.TWISTD + [
                "pushd-device",
                "--state-dir", str(self.dev_state),
                "--transport", f"tls:127.0.0.1:{self.courier_port}",
                "--tls-name", "localhost",
                "--enrol-url", f"https://127.0.0.1:{self.provider_port}",
                "--enrol-secret-file", str(self.gw_state / "enrol.secret"),
                "--max-delay", "2",
            ],
            self.dir,
        )
        self.case.addCleanup(self.device.stop)
        return self.device.wait_for(r"connected as device")

    def listen(self, count):
        app = procs.spawn(
            "app",
            procs.PUSHCTL + ["listen", "--socket", str(self.dev_state / "pushd.sock"), "-n", str(count), TOPIC],
            self.dir,
        )
        self.case.addCleanup(app.stop)
        return app

    def send(self, token, payload, topic=TOPIC):
        return procs.run(
            procs.PUSHCTL + [
                "send", "-g", f"127.0.0.1:{self.provider_port}", "-d", str(self.gw_state),
                token, topic, json.dumps(payload),
            ],
            self.dir,
        )

    def status(self):
        return procs.run(procs.PUSHCTL + ["status", "--socket", str(self.dev_state / "pushd.sock")], self.dir)


class EndToEndTests(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_notification_reaches_app_and_survives_gateway_restart(self):
        s = Stack(self)
        yield s.start_gateway()
        yield s.start_device()
        app = s.listen(2)
        m = yield app.wait_for(r"^token ([0-9a-f]{64})$")
        token = m.group(1)

        out, err, code = yield s.send(token, {"aps": {"alert": "first"}})
        self.assertEqual(code, 0, out + err)
        self.assertTrue(out.startswith(b"200 apns-id: "), out)
        yield app.wait_for(r'^\{"aps": \{"alert": "first"\}\}$')

        out, err, code = yield s.status()
        self.assertEqual(code, 0, err)
        self.assertRegex(out.decode(), r"courier status:\s+Connected")
        self.assertRegex(out.decode(), r"successful connections:\s+1\b")

        # Kill the gateway outright; the device keeps retrying until it is back.
        yield s.gateway.signal(signal.SIGKILL)
        yield s.device.wait_for(r"courier connection lost")
        # It retries (and fails) while nothing listens...
        yield s.device.wait_for(r"connecting to tls:127.0.0.1:\d+ failed: Connection was refused")
        out, err, code = yield s.status()
        self.assertRegex(out.decode(), r"courier status:\s+Will reattempt to reconnect")
        self.assertRegex(out.decode(), r"consecutive connection failures:\s+[1-9]")
        # ...and is back by itself once the gateway is.
        mark = len(s.device.lines)
        yield s.start_gateway()
        yield s.device.wait_for(r"connected as device", after=mark)

        out, err, code = yield s.send(token, {"aps": {"alert": "second"}})
        self.assertTrue(out.startswith(b"200 "), out + err)
        yield app.wait_for(r'"second"')
        code = yield app.ended
        self.assertEqual(code, 0)
        self.assertEqual([l for l in app.lines if l.startswith("{")],
                         ['{"aps": {"alert": "first"}}', '{"aps": {"alert": "second"}}'])

        out, err, code = yield s.status()
        self.assertRegex(out.decode(), r"successful connections:\s+2\b")

    @defer.inlineCallbacks
    def test_bad_clients_are_cut_off_and_others_served(self):
        s = Stack(self)
        yield s.start_gateway()
        yield s.start_device()
        app = s.listen(1)
        token = (yield app.wait_for(r"^token ([0-9a-f]{64})$")).group(1)

        ca_pem = (s.gw_state / "ca.pem").read_bytes()
        now = reactor.seconds()
        stranger = Device(ca=(OTHER_CA_KEY, OTHER_CA_CERT))
        forged = Device(ca=(OTHER_CA_KEY, OTHER_CA_CERT)).connect(now)
        # A genuine certificate of this gateway's CA, presented with a nonce signed by
        # a key that is not its own.
        gw_ca_key = tls.load_key((s.gw_state / "ca.key").read_bytes())
        victim = Device(ca=(gw_ca_key, x509.load_pem_x509_certificate(ca_pem)))
        forged.certificate = victim.der
        unsigned = wire.Frame(wire.CONNECT, tuple(
            (i, v) for i, v in victim.connect(now).to_frame().fields if i != 14))
        cases = {
            "random bytes": random.Random(7).randbytes(64),
            "unknown command": b"\x63\x00\x00\x00\x00",
            "truncated field": b"\x0c\x00\x00\x00\x03abc",
            "oversize length": b"\x07\xff\xff\xff\xff",
            "forged Connect": forged.encode(),
            "unsigned Connect": wire.encode_frame(unsigned),
            "certificate from another CA": stranger.connect(now).encode(),
        }
        results = yield defer.gatherResults(
            [raw_exchange(s.courier_port, ca_pem, data) for data in cases.values()]
        )
        for name, (closed, _) in zip(cases, results):
            self.assertTrue(closed, f"{name}: connection not closed\n{s.gateway.log()}")
        log = "\n".join(s.gateway.lines)
        for reason in ("unknown command 99", "claims 25187 bytes", "over the limit", "bad signature", "lacks field 14", "not issued by"):
            self.assertIn(reason, log)

        out, err, code = yield s.send(token, {"still": "serving"})
        self.assertTrue(out.startswith(b"200 "), out + err)
        yield app.wait_for(r'"still": "serving"')


class _Raw(protocol.Protocol):
    def __init__(self, data):
        self.data = data
        self.received = b""
        self.closed = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.data)

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.closed.callback((True, self.received))


def raw_exchange(port, ca_pem, data, timeout=10):
    """Send bytes over a verified TLS connection; fire with (closed by server, bytes back)."""
    p = _Raw(data)
    f = protocol.ClientFactory.forProtocol(lambda: p)
    opts = ssl.optionsForClientTLS("localhost", ssl.Certificate.loadPEM(ca_pem), acceptableProtocols=tls.COURIER_ALPN)
    connector = reactor.connectSSL("127.0.0.1", port, f, opts)

    def give_up():
        connector.disconnect()

    call = reactor.callLater(timeout, give_up)

    def done(result):
        if call.active():
            call.cancel()
            return result
        return (False, result[1])

    return p.closed.addCallback(done)
