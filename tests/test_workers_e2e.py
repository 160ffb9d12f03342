"""
``twistd pushd-gateway --workers 2`` as real processes on a real redis-server: both workers
take courier connections on the one port, a SIGKILLed worker is restarted while the other
keeps the port served, SIGTERM to the supervisor stops them all; on SQLite it is refused.

What shows which worker took a connection, without a debug hook: a courier connection that
never sends Connect is closed at --connect-deadline and its worker logs "closed N
unauthenticated courier connections", relayed by the supervisor as "[worker I pid P] ...".
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
from pathlib import Path

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from . import procs
from .redis_server import RedisServer

CLOSED = re.compile(r"\[worker (\d+) pid (\d+)\] .*closed (\d+) unauthenticated courier connections")


def closed_by_pid(gateway) -> dict:
    """pid -> courier connections its worker closed for want of a Connect."""
    counts: dict = {}
    for line in gateway.lines:
        m = CLOSED.search(line)
        if m:
            counts[int(m.group(2))] = counts.get(int(m.group(2)), 0) + int(m.group(3))
    return counts


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class TwoWorkers(unittest.TestCase):
    timeout = 90

    def setUp(self):
        self.dir = Path(tempfile.mkdtemp(prefix="pushd-workers-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.courier = procs.free_port()
        self.provider = procs.free_port()

    @defer.inlineCallbacks
    def connect_many(self, n):
        """Open ``n`` courier connections (from several loopback sources), sending nothing."""
        conns = []
        for i in range(n):
            ep = TCP4ClientEndpoint(reactor, "127.0.0.1", self.courier, timeout=5,
                                    bindAddress=(f"127.0.0.{2 + i % 8}", 0))
            conns.append((yield connectProtocol(ep, protocol.Protocol())))
        return conns

    @defer.inlineCallbacks
    def until(self, check, what, timeout=20.0):
        deadline = reactor.seconds() + timeout
        while not check():
            if reactor.seconds() > deadline:
                self.fail(f"no {what} within {timeout} s:\n{self.gateway.log()}")
            yield task.deferLater(reactor, 0.1, lambda: None)

    @defer.inlineCallbacks
    def test_share_restart_stop(self):
        redis = RedisServer(self)
        yield redis.start()
        self.gateway = gw = procs.spawn("gateway", procs.TWISTD + [
            "pushd-gateway", "--workers", "2", "--store", redis.url,
            "--state-dir", str(self.dir / "gateway"),
            "--courier", f"tls:{self.courier}:interface=127.0.0.1",
            "--provider", f"tls:{self.provider}:interface=127.0.0.1",
            "--connect-deadline", "0.5", "--worker-stop-timeout", "20",
        ], self.dir)
        self.addCleanup(gw.stop)
        pids = {}
        for i in (1, 2):
            m = yield gw.wait_for(rf"worker {i} started \(pid (\d+)\)")
            pids[i] = int(m.group(1))
            yield gw.wait_for(rf"\[worker {i} pid {pids[i]}\] .*CourierFactory \(TLS\) starting on {self.courier}")
            yield gw.wait_for(rf"\[worker {i} pid {pids[i]}\] .*ProviderSite \(TLS\) starting on {self.provider}")

        # Both workers accept on the one port: 40 connections spread over them.
        yield self.connect_many(40)
        yield self.until(lambda: sum(closed_by_pid(gw).values()) == 40, "40 connections closed")
        spread = closed_by_pid(gw)
        self.assertEqual(set(spread), set(pids.values()), spread)
        self.assertTrue(all(n >= 5 for n in spread.values()), spread)

        # SIGKILL worker 1: the port stays served (worker 2), and worker 1 comes back.
        after = len(gw.lines)
        os.kill(pids[1], signal.SIGKILL)
        yield gw.wait_for(rf"worker 1 \(pid {pids[1]}\) exited \(signal 9\).*restarting it in 1 s", after=after)
        yield self.connect_many(10)
        yield self.until(lambda: sum(closed_by_pid(gw).values()) == 50, "10 connections closed by worker 2")
        self.assertEqual(closed_by_pid(gw)[pids[2]], spread[pids[2]] + 10)
        m = yield gw.wait_for(r"worker 1 started \(pid (\d+)\)", after=after)
        new = int(m.group(1))
        self.assertNotEqual(new, pids[1])
        yield gw.wait_for(rf"\[worker 1 pid {new}\] .*CourierFactory \(TLS\) starting on {self.courier}", after=after)
        yield self.connect_many(40)
        yield self.until(lambda: sum(closed_by_pid(gw).values()) == 90, "40 more connections closed")
        self.assertGreaterEqual(closed_by_pid(gw).get(new, 0), 5, closed_by_pid(gw))

        # SIGTERM to the supervisor: every worker exits (status 0), then the supervisor
        # (twistd ends by re-raising the signal: no exit code).
        yield gw.signal(signal.SIGTERM)
        self.assertEqual(gw.count(r"all workers have exited"), 1, gw.log())
        self.assertEqual(gw.count(r"Server Shut Down"), 1, gw.log())
        self.assertFalse(alive(pids[2]) or alive(new), gw.log())
        self.assertEqual(gw.count(r"worker \d \(pid \d+\) exited \(status 0\)"), 2, gw.log())

    @defer.inlineCallbacks
    def test_sqlite_refused_with_one_line(self):
        out, err, code = yield procs.run(procs.TWISTD + [
            "pushd-gateway", "--workers", "2", "--state-dir", str(self.dir / "gateway"),
        ], self.dir)
        self.assertNotEqual(code, 0)
        last = (out + err).decode().strip().splitlines()[-1]
        self.assertIn("--workers 2 needs a store the workers share, and --store sqlite belongs to one process", last)
        self.assertIn("use --store redis://HOST:PORT/DB", last)
        self.assertFalse((self.dir / "gateway").exists())  # refused before anything was created
