"""
Two real gateway processes (nodes A and B) on one real redis-server, real device daemons and
apps: a push posted to A reaches a device connected to B at once (a wake over PUB/SUB, not its
next reconnect), and a device that connects to B while its session on A is still open has
that session closed (a kick).
"""

from __future__ import annotations

import shutil
import signal

from twisted.internet import defer, reactor
from twisted.trial import unittest

from pushd.gateway.courier import ABORT_AFTER

from . import procs
from .redis_server import RedisServer
from .stack import Stack, spawn_node

#: How soon a cross-node push must arrive: the device's keepalive (and so any reconnect) is
#: minutes away, a wake takes milliseconds; this leaves room for a loaded machine.
PROMPT = 5.0


class ClusterEndToEndTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.redis = RedisServer(self)
        yield self.redis.start()
        self.s = Stack(self, "--store", self.redis.url, "--node-heartbeat", "1", "--node-ttl", "3")
        self.ports = {}
        self.gateways = {}
        yield self.start_gateway("A")
        yield self.start_gateway("B")

    def start_gateway(self, name):
        """A node; they share the state dir (one CA, token secret and device registry)."""
        s = self.s
        courier, provider = (s.courier_port, s.provider_port) if name == "A" else (procs.free_port(), procs.free_port())
        self.ports[name] = courier, provider
        self.gateways[name], subscribed = spawn_node(s, name, courier, provider, self.addCleanup)
        return subscribed

    def start_device(self, name, gateway):
        s = self.s
        p = procs.spawn(name, procs.TWISTD + [
            "pushd-device", "--state-dir", str(s.state(name)),
            "--transport", f"tls:127.0.0.1:{self.ports[gateway][0]}", "--tls-name", "localhost",
            "--enrol-url", f"https://127.0.0.1:{self.ports['A'][1]}",
            "--enrol-secret-file", str(s.gw_state / "enrol.secret"), "--max-delay", "2",
        ], s.dir)
        s.devices[name] = p
        self.addCleanup(p.stop)
        return p

    def send_via(self, gateway, token, payload):
        return procs.run(procs.PUSHCTL + [
            "send", "-g", f"127.0.0.1:{self.ports[gateway][1]}", "-d", str(self.s.gw_state),
            token, "com.example.e2e", payload,
        ], self.s.dir)

    @defer.inlineCallbacks
    def test_a_push_to_node_a_reaches_a_device_on_node_b_at_once(self):
        device = self.start_device("dev", "B")
        yield device.wait_for(r"connected as device")
        app = self.s.listen(2, device="dev")
        token = (yield app.wait_for(r"^token ([0-9a-f]{64})$")).group(1)
        for n, via in enumerate(["A", "B"]):
            started = reactor.seconds()
            out, err, code = yield self.send_via(via, token, '{"n": %d}' % n)
            self.assertTrue(out.startswith(b"200 "), out + err)
            yield app.wait_for(r'^\{"n": %d\}$' % n, timeout=PROMPT)
            self.assertLess(reactor.seconds() - started, PROMPT)
        self.assertEqual(device.count(r"connected as device"), 1, "delivered without a reconnect")
        self.assertEqual(self.gateways["A"].count(r"device \S+ connected from"), 0, "the device never was on A")

    @defer.inlineCallbacks
    def test_a_device_that_connects_to_b_closes_its_session_on_a(self):
        old = self.start_device("dev", "A")
        yield old.wait_for(r"connected as device")
        yield self.gateways["A"].wait_for(r"device \S+ connected from")
        # The device's first daemon freezes with its connection to A open (a half-dead
        # network path); the same identity comes up on B.
        old.transport.signalProcess(signal.SIGSTOP)
        self.addCleanup(lambda: old.running and old.transport.signalProcess(signal.SIGCONT))
        ignore = shutil.ignore_patterns("pushd.sock*", "*.pid")
        shutil.copytree(self.s.state("dev"), self.s.state("dev2"), ignore=ignore)
        new = self.start_device("dev2", "B")
        yield new.wait_for(r"connected as device")
        yield self.gateways["B"].wait_for(r"moved here from node node-A", timeout=PROMPT)
        yield self.gateways["A"].wait_for(r"moved to another node: closing its session here", timeout=PROMPT)
        # Closed: with the device frozen, no close_notify comes back, so after ABORT_AFTER.
        yield self.gateways["A"].wait_for(r"device \S+ disconnected", timeout=ABORT_AFTER + PROMPT)
        self.assertEqual(new.count(r"courier connection lost"), 0, "the new session is left alone")
