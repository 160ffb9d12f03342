"""
High availability with real processes: three gateway nodes on one real redis-server, real
device daemons spread over them, a provider posting to random nodes. Every accepted push
reaches its app exactly once while one node is SIGKILLed and another drained by SIGTERM; and
two nodes on Redis behind Sentinel (--redis-wait 1) lose nothing accepted when the master is
SIGKILLed under load, and every node delivers again afterwards (cross-node wakes included).

How a device reaches "another node": each device daemon is given every node's courier port as
``--transport``, its own node first (the device rotates through its transports on a failed
attempt). That is what an operator deploys with nodes on several hosts and no load balancer:
the device's list of gateway addresses (or a DNS name with several records). Several workers on
one host share a port instead (--workers, SO_REUSEPORT: tests/test_workers_e2e.py).

A device moving between nodes closes its old session there: tests/test_cluster_e2e.py
(test_a_device_that_connects_to_b_closes_its_session_on_a), not repeated here.
"""

from __future__ import annotations

import json
import random
import re
import signal
import uuid
from io import BytesIO

from twisted.internet import defer, reactor, ssl, task
from twisted.trial import unittest
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from . import procs
from .redis_server import RedisSentinel, RedisServer
from .stack import TOPIC, Stack, spawn_node
from .test_store_sentinel import replicated

#: How soon a push must arrive, or a drained node's devices be connected elsewhere: a device's
#: keepalive (and so any reconnect that would hide a silent node) is 30 s or more away.
PROMPT = 5.0
CONCURRENCY = 6
TRIES = 60  # 12 s of retries: a Sentinel failover and the replica's resync take a few
NODE_ARGS = ("--token-burst", "100000", "--node-heartbeat", "0.5", "--node-ttl", "1.5",
             "--drain-window", "0.5", "--drain-timeout", "5")


class Provider:
    """An app server posting to a random live node; a failed or 503 request is sent again
    (with the same apns-id) to a random live node, as behind a health-checking balancer."""

    def __init__(self, cluster):
        self.cluster = cluster
        ca = ssl.Certificate.loadPEM((cluster.s.gw_state / "ca.pem").read_bytes())
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = CONCURRENCY
        self.agent = Agent(reactor, BrowserLikePolicyForHTTPS(trustRoot=ca), pool=self.pool)
        self.key = (cluster.s.gw_state / "provider.key").read_text().strip()
        self.accepted: dict = {}  # apns-id -> token
        self.gave_up: set = set()
        self.failures = 0
        self.on_accept: list = []

    @defer.inlineCallbacks
    def send(self, token, via=None):
        """Post one push (its payload's "id" is its apns-id); fire with the id once it got 200."""
        apns_id = str(uuid.uuid4())
        headers = {"authorization": [f"bearer {self.key}"], "apns-topic": [TOPIC], "apns-id": [apns_id]}
        body = json.dumps({"id": apns_id}).encode()
        for _ in range(TRIES):
            node = via or random.choice(self.cluster.live())
            url = f"https://localhost:{self.cluster.ports[node][1]}/3/device/{token}"
            try:
                resp = yield self.agent.request(b"POST", url.encode(), Headers(headers),
                                                FileBodyProducer(BytesIO(body)))
                yield readBody(resp)
                if resp.code == 200:
                    self.accepted[apns_id] = token
                    for f in list(self.on_accept):
                        f()
                    return apns_id
                if resp.code != 503:
                    raise AssertionError(f"unexpected {resp.code} from node {node}")
            except AssertionError:
                raise
            except Exception:
                pass
            self.failures += 1
            yield task.deferLater(reactor, 0.2, lambda: None)  # a provider's pause before a retry
        self.gave_up.add(apns_id)


class Cluster:
    """Gateway nodes sharing one state dir (CA, secrets, registry) and one Redis store."""

    def __init__(self, case, store_url, *extra):
        self.case = case
        self.s = Stack(case, "--store", store_url, *NODE_ARGS, *extra)
        self.ports: dict = {}
        self.gateways: dict = {}
        self.dead: set = set()
        self.apps: dict = {}
        self.tokens: dict = {}

    def live(self):
        return [n for n in self.gateways if n not in self.dead]

    def start_gateway(self, name):
        s = self.s
        courier, provider = self.ports.setdefault(name, (procs.free_port(), procs.free_port()))
        self.gateways[name], subscribed = spawn_node(s, name, courier, provider, self.case.addCleanup)
        return subscribed

    @defer.inlineCallbacks
    def start_device(self, name, nodes):
        """A device daemon whose transports are ``nodes``' courier ports, in that order; fire
        with its token once its app has registered."""
        s = self.s
        first = sorted(self.gateways)[0]
        transports = []
        for n in nodes:
            transports += ["--transport", f"tls:127.0.0.1:{self.ports[n][0]}"]
        p = procs.spawn(name, procs.TWISTD + [
            "pushd-device", "--state-dir", str(s.state(name)), *transports, "--tls-name", "localhost",
            "--enrol-url", f"https://127.0.0.1:{self.ports[first][1]}",
            "--enrol-secret-file", str(s.gw_state / "enrol.secret"), "--max-delay", "2",
        ], s.dir)
        s.devices[name] = p
        self.case.addCleanup(p.stop)
        yield p.wait_for(r"connected as device")
        app = self.apps[name] = s.listen(device=name)
        self.tokens[name] = (yield app.wait_for(r"^token ([0-9a-f]{64})$")).group(1)
        return self.tokens[name]

    def delivered(self, name):
        """The apns-ids the app of device ``name`` has printed, in order."""
        return [json.loads(line)["id"] for line in self.apps[name].lines if line.startswith("{")]

    @defer.inlineCallbacks
    def check_exactly_once(self, provider, what):
        """A marker per device last (delivery is in order per device), then: every accepted
        push reached its app, once."""
        markers = {}
        for name, token in self.tokens.items():
            markers[name] = yield provider.send(token)
        for name, marker in markers.items():
            yield self.apps[name].wait_for(marker, timeout=60)
        for name, token in self.tokens.items():
            got = self.delivered(name)
            want = {i for i, t in provider.accepted.items() if t == token}
            summary = (f"{what}: {name}: {len(want)} accepted, {len(got)} delivered, "
                       f"{provider.failures} retries")
            self.case.assertEqual(want - set(got), set(), "lost: " + summary)
            self.case.assertEqual(len(got), len(set(got)), "duplicates: " + summary)
            self.case.assertEqual(set(got) - want, set(), "never accepted: " + summary)
        self.case.assertEqual(provider.gave_up, set())


class ThreeNodesTests(unittest.TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_kill_and_drain_lose_nothing(self):
        redis = yield RedisServer(self).start()
        c = Cluster(self, redis.url)
        for n in "ABC":
            yield c.start_gateway(n)
        # A device per node, its own node first, then the others (devC falls back to B, which is drained later).
        order = {"A": "ABC", "B": "BAC", "C": "CBA"}
        for n in "ABC":
            yield c.start_device(f"dev{n}", order[n])
        for n in "ABC":
            self.assertEqual(c.gateways[n].count(r"device \S+ connected from"), 1, c.gateways[n].log())
        provider = Provider(c)
        self.addCleanup(provider.pool.closeCachedConnections)
        names = sorted(c.tokens)
        sem = defer.DeferredSemaphore(CONCURRENCY)

        def load(count):
            return defer.gatherResults([sem.run(provider.send, c.tokens[names[i % len(names)]])
                                        for i in range(count)])

        # 1. SIGKILL node C mid-stream: its device reconnects to another node.
        devC = c.s.devices["devC"]
        killed = []

        def maybe_kill():
            if len(provider.accepted) >= 40 and not killed:
                killed.append(c.gateways["C"].signal(signal.SIGKILL))
                killed.append(len(devC.lines))
                c.dead.add("C")

        provider.on_accept.append(maybe_kill)
        yield load(120)
        provider.on_accept.remove(maybe_kill)
        yield killed[0]
        yield devC.wait_for(r"connected as device", after=killed[1], timeout=30)
        yield c.check_exactly_once(provider, "after SIGKILL of node C")
        self.assertEqual(self.last_node(c, "devC"), "B")

        # 2. SIGTERM drains node B mid-stream: nothing lost, its devices elsewhere within PROMPT.
        devB = c.s.devices["devB"]
        moved = []
        on_b = [d for d in ("devB", "devC") if self.last_node(c, d) == "B"]
        self.assertEqual(on_b, ["devB", "devC"])
        termed = []

        def maybe_term():
            if len(provider.accepted) >= 170 and not termed:
                marks = {d: len(c.s.devices[d].lines) for d in on_b}
                started = reactor.seconds()
                termed.append(c.gateways["B"].signal(signal.SIGTERM))
                c.dead.add("B")
                for d in on_b:
                    c.s.devices[d].wait_for(r"connected as device", after=marks[d], timeout=30).addCallback(
                        lambda _, d=d: moved.append((d, reactor.seconds() - started)))

        provider.on_accept.append(maybe_term)
        yield load(120)
        provider.on_accept.remove(maybe_term)
        code = yield termed[0]
        self.assertTrue(any("drained in" in line for line in c.gateways["B"].lines), c.gateways["B"].log())
        yield c.check_exactly_once(provider, "after the drain of node B")
        self.assertEqual(sorted(d for d, _ in moved), sorted(on_b), devB.log())
        for d, took in moved:
            self.assertLess(took, PROMPT, f"{d} connected elsewhere {took:.2f} s after the SIGTERM")
            self.assertEqual(self.last_node(c, d), "A")
        print(f"\n{len(provider.accepted)} accepted, {provider.failures} retried; moved after SIGTERM: "
              + ", ".join(f"{d} {t:.2f} s" for d, t in moved) + f"; node B exit {code}")

    @staticmethod
    def last_node(c, device):
        """The live node holding the device's session: more connects of it logged than disconnects."""
        ident = re.search(r"connected as device (\S+)", "\n".join(c.s.devices[device].lines)).group(1)
        holding = [n for n in c.live()
                   if c.gateways[n].count(rf"device {ident} connected from")
                   > c.gateways[n].count(rf"device {ident} disconnected")]
        return holding[0] if len(holding) == 1 else holding


class SentinelFailoverTests(unittest.TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_failover_under_load_loses_nothing_and_every_node_delivers(self):
        # Two replicas: after the failover the new master still has one for WAIT 1.
        master = yield RedisServer(self).start()
        for _ in range(2):
            yield RedisServer(self, replica_of=master).start()
        yield replicated(master, 2)
        sentinel = yield RedisSentinel(self, master, "pushd-test").start()
        yield sentinel.knows_replicas(2)
        c = Cluster(self, sentinel.store_url(), "--redis-wait", "1")
        for n in "AB":
            yield c.start_gateway(n)
        # Each device knows only its own node: a delivery after the failover to a device of
        # the other node needs a cross-node wake (the bus subscribed again on the new master),
        # and a device reconnect (which drains its backlog) would hide a silent node.
        for n in "AB":
            yield c.start_device(f"dev{n}", n)
        provider = Provider(c)
        self.addCleanup(provider.pool.closeCachedConnections)
        names = sorted(c.tokens)
        sem = defer.DeferredSemaphore(CONCURRENCY)
        sends = []
        running = [True]

        @defer.inlineCallbacks
        def steady():
            while running[0]:
                sends.append(sem.run(provider.send, c.tokens[random.choice(names)]))
                yield task.deferLater(reactor, 0.03, lambda: None)

        load = steady()
        while len(provider.accepted) < 40:
            yield task.deferLater(reactor, 0.05, lambda: None)
        yield master.kill()
        killed_at, before = reactor.seconds(), len(provider.accepted)
        while (yield sentinel.master_port()) == master.port:
            self.assertLess(reactor.seconds() - killed_at, 30, "no failover")
            yield task.deferLater(reactor, 0.1, lambda: None)
        failed_over = reactor.seconds() - killed_at
        # Keep posting until pushes are accepted again (WAIT 1 on the new master), then stop.
        while len(provider.accepted) < before + 40:
            self.assertLess(reactor.seconds() - killed_at, 60, "no push accepted after the failover")
            yield task.deferLater(reactor, 0.05, lambda: None)
        running[0] = False
        yield load
        yield defer.gatherResults(sends)
        recovered = reactor.seconds() - killed_at

        # Every node delivers again, to its own devices and, by a wake, to the other node's.
        for via in "AB":
            for name in names:
                started = reactor.seconds()
                apns_id = yield provider.send(c.tokens[name], via=via)
                self.assertIsNotNone(apns_id, f"node {via} accepts nothing")
                yield c.apps[name].wait_for(apns_id, timeout=PROMPT)
                self.assertLess(reactor.seconds() - started, PROMPT)
        for name in names:
            self.assertEqual(c.s.devices[name].count(r"connected as device"), 1,
                             f"{name} reconnected: its backlog drain would hide a silent node")
        yield c.check_exactly_once(provider, "after the failover")
        print(f"\n{len(provider.accepted)} accepted ({before} before the SIGKILL), {provider.failures} "
              f"retried; failed over in {failed_over:.2f} s, accepting again after {recovered:.2f} s")
