"""
End to end with real processes and real TLS on loopback: twistd pushd-gateway,
twistd pushd-device, pushctl listen as the app, pushctl send as the app server.
"""

from __future__ import annotations

import json
import random
import re
import signal

from cryptography import x509
from twisted.internet import defer, protocol, reactor, ssl, task
from twisted.trial import unittest

from pushd import tls, wire

from . import procs
from .stack import TOPIC, Stack
from .helpers import OTHER_CA_CERT, OTHER_CA_KEY, Device

class EndToEndTests(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def report(self, s):
        out, err, code = yield procs.run(
            procs.PUSHCTL + ["status", "--json", "--socket", str(s.dev_state / "pushd.sock")], s.dir)
        self.assertEqual(code, 0, err)
        return json.loads(out)

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
        created = (yield self.report(s))["apps"][0]["persistent connection created"]

        # Kill the gateway outright; the device keeps retrying until it is back.
        yield s.gateway.signal(signal.SIGKILL)
        yield s.device.wait_for(r"courier connection lost")
        # It retries (and fails) while nothing listens...
        yield s.device.wait_for(r"connecting to tls:127.0.0.1:\d+ failed: Connection was refused")
        out, err, code = yield s.status()
        self.assertRegex(out.decode(), r"courier status:\s+Will reattempt to reconnect")
        self.assertRegex(out.decode(), r"consecutive connection failures:\s+[1-9]")
        first = yield self.report(s)
        mark = len(s.device.lines)
        yield s.device.wait_for(r"connecting to tls:.* failed", after=mark)
        second = yield self.report(s)
        self.assertGreater(second["courier"]["consecutive connection failures"],
                           first["courier"]["consecutive connection failures"])
        self.assertGreater(second["courier"]["last connection attempt"], first["courier"]["last connection attempt"])
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
        after = yield self.report(s)
        self.assertEqual(after["apps"][0]["persistent connection created"], created,
                         "the app's persistent connection outlives the TCP connection")

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
        # Unauthenticated closes are logged at most once a second, their reasons counted.
        for reason in ("unknown command 99", "claims 25187 bytes", "over the limit", "bad signature", "lacks field 14", "not issued by"):
            yield s.gateway.wait_for(re.escape(reason), timeout=5)

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


class NetworkChangeTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_reconnect_on_pushctl_and_sighup(self):
        s = Stack(self)
        yield s.start_gateway()
        yield s.start_device()
        mark = len(s.device.lines)
        out, err, code = yield procs.run(procs.PUSHCTL + ["reconnect", "--socket", str(s.dev_state / "pushd.sock")], s.dir)
        self.assertEqual(code, 0, err)
        yield s.device.wait_for(r"reconnecting now: pushctl reconnect", after=mark)
        yield s.device.wait_for(r"connected as device", after=mark)
        mark = len(s.device.lines)
        s.device.signal(signal.SIGHUP)
        yield s.device.wait_for(r"reconnecting now: SIGHUP", after=mark)
        yield s.device.wait_for(r"connected as device", after=mark)
        out, err, code = yield s.status()
        self.assertRegex(out.decode(), r"successful connections:\s+3\b")
        self.assertRegex(out.decode(), r"courier status:\s+Connected")


class DeviceRestartTests(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_identity_tokens_apps_kept_and_absent_app_gets_its_pushes_in_order_once(self):
        s = Stack(self)
        yield s.start_gateway()
        yield s.start_device()
        app = s.listen(1)
        token = (yield app.wait_for(r"^token ([0-9a-f]{64})$")).group(1)
        out, err, code = yield s.send(token, {"n": 0})
        yield app.ended
        before = yield EndToEndTests.report(self, s)

        yield s.device.stop()
        yield s.start_device()
        after = yield EndToEndTests.report(self, s)
        self.assertEqual(after["device id"], before["device id"])
        self.assertEqual(after["base token"], before["base token"])
        self.assertEqual(after["certificate status"], "Provisioned, using existing certificate")
        self.assertEqual([(a["application port name"], a["token"], a["persistent connection created"])
                          for a in after["apps"]],
                         [(a["application port name"], a["token"], a["persistent connection created"])
                          for a in before["apps"]])

        # The app is not running: pushes wait on the device, then arrive in order, once.
        for n in range(1, 6):
            out, err, code = yield s.send(token, {"n": n})
            self.assertTrue(out.startswith(b"200 "), out + err)
        for _ in range(50):
            r = yield EndToEndTests.report(self, s)
            if r["apps"][0]["pushes held for the app"] == 5:
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(r["apps"][0]["pushes held for the app"], 5)
        yield s.device.stop()
        yield s.start_device()  # held on disk across a daemon restart, too
        app = s.listen(6)
        self.assertEqual((yield app.wait_for(r"^token ([0-9a-f]{64})$")).group(1), token)
        yield s.send(token, {"n": 6})  # a marker: in order, so a duplicate would come before it
        self.assertEqual((yield app.ended), 0)
        self.assertEqual([json.loads(line)["n"] for line in app.lines if line.startswith("{")], [1, 2, 3, 4, 5, 6])


class UnregisterTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_unregistered_app_token_answers_410(self):
        s = Stack(self)
        yield s.start_gateway()
        yield s.start_device()
        app = s.listen(1)
        token = (yield app.wait_for(r"^token ([0-9a-f]{64})$")).group(1)
        out, err, code = yield s.send(token, {"n": 1})
        self.assertTrue(out.startswith(b"200 "), out + err)
        yield app.ended
        out, err, code = yield procs.run(
            procs.PUSHCTL + ["unregister", "--socket", str(s.dev_state / "pushd.sock"), TOPIC], s.dir)
        self.assertEqual(code, 0, err)
        yield s.gateway.wait_for(r"unregistered a topic")
        out, err, code = yield s.send(token, {"n": 2})
        self.assertRegex(out.decode(), r'^410 apns-id: \S+ \{"reason": "Unregistered", "timestamp": \d{13}\}')


class PushctlLoadTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_count_and_concurrency_report(self):
        from pushd.gateway.tokens import TokenMinter

        s = Stack(self)
        yield s.start_gateway()
        minter = TokenMinter((s.gw_state / "token.secret").read_bytes().strip())
        token = minter.scoped_token("00112233445566778899aabbccddeeff", wire.topic_hash(TOPIC)).hex()
        out, err, code = yield procs.run(procs.PUSHCTL + [
            "send", "-g", f"127.0.0.1:{s.provider_port}", "-d", str(s.gw_state), "-n", "30", "-c", "3",
            token, TOPIC, '{"aps":{"alert":"load"}}'], s.dir)
        text = out.decode()
        self.assertEqual(code, 0, text + err.decode())
        self.assertRegex(text, r"^30 requests in [0-9.]+ s: \d+/s over 3 connections")
        self.assertRegex(text, r"latency ms: p50 [0-9.]+  p90 [0-9.]+  p99 [0-9.]+  max [0-9.]+")
        self.assertIn("statuses: 200: 30", text)
