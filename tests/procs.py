"""Real processes for end-to-end tests: spawn, watch their output, wait for a line."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
from pathlib import Path

from twisted.internet import defer, protocol, reactor, utils

ROOT = Path(__file__).resolve().parent.parent


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["PYTHONUNBUFFERED"] = "1"
    return e


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "-l", "-"]
PUSHCTL = [sys.executable, "-m", "pushd.ctl"]


class Process(protocol.ProcessProtocol):
    def __init__(self, name):
        self.name = name
        self.lines: list = []
        self._partial = b""
        self._waiters: list = []
        self.ended = defer.Deferred()
        self.running = False

    def connectionMade(self):
        self.running = True

    def _data(self, data):
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            for w in list(self._waiters):
                m = w[0].search(line)
                if m:
                    self._waiters.remove(w)
                    w[2].cancel()
                    w[1].callback(m)

    outReceived = errReceived = _data

    def processEnded(self, reason):
        self.running = False
        for w in list(self._waiters):
            self._waiters.remove(w)
            w[2].cancel()
            w[1].errback(AssertionError(f"{self.name} exited while waiting for {w[0].pattern!r}:\n{self.log()}"))
        self.ended.callback(reason.value.exitCode)

    def log(self) -> str:
        return "\n".join(f"  {self.name}| {line}" for line in self.lines[-60:])

    def count(self, pattern) -> int:
        return sum(1 for line in self.lines if re.search(pattern, line))

    def wait_for(self, pattern, timeout=30.0, after=0):
        """Fire with the match of the first line (from line ``after`` on) matching pattern."""
        rx = re.compile(pattern)
        for line in self.lines[after:]:
            m = rx.search(line)
            if m:
                return defer.succeed(m)
        d = defer.Deferred()

        def expire():
            self._waiters.remove(entry)
            d.errback(AssertionError(f"{self.name}: no line matching {pattern!r} in {timeout}s:\n{self.log()}"))

        entry = (rx, d, reactor.callLater(timeout, expire))
        self._waiters.append(entry)
        return d

    def signal(self, sig=signal.SIGTERM):
        if self.running:
            self.transport.signalProcess({signal.SIGTERM: "TERM", signal.SIGKILL: "KILL", signal.SIGHUP: "HUP"}.get(sig, sig))
        return self.ended

    def stop(self):
        """Terminate, and fire when it has exited."""
        if not self.running:
            return defer.succeed(None)
        self.signal(signal.SIGTERM)
        killer = reactor.callLater(10, lambda: self.running and self.transport.signalProcess("KILL"))
        self.ended.addBoth(lambda r: killer.active() and killer.cancel())
        return self.ended


def spawn(name, argv, cwd) -> Process:
    p = Process(name)
    reactor.spawnProcess(p, argv[0], argv, env=env(), path=str(cwd))
    return p


def run(argv, cwd):
    """Fire with (stdout, stderr, exit code)."""
    return utils.getProcessOutputAndValue(argv[0], argv[1:], env=env(), path=str(cwd))
