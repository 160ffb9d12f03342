"""
A real redis-server for one test: its own port and directory, an append-only file synced on
every write (so a SIGKILL loses nothing acknowledged), and cleanup on the test case.

    redis = RedisServer(self)          # self: a trial TestCase
    yield redis.start()
    ... RedisStore(redis.url) ...
    yield redis.kill(); yield redis.restart()
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError

from .procs import Process, free_port

START_TIMEOUT = 10.0
POLL = 0.05


class _Ping(protocol.Protocol):
    """One PING; ``done`` fires with the reply once the connection is closed."""

    def __init__(self):
        self.reply = b""
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(b"PING\r\n")

    def dataReceived(self, data):
        self.reply += data
        if b"\r\n" in self.reply:
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.done.callback(self.reply)


class RedisServer:
    def __init__(self, case, executable="redis-server"):
        self.executable = shutil.which(executable)
        if self.executable is None:
            # Not a skip: a suite that silently skips its Redis tests proves nothing.
            raise case.failureException(f"{executable} is not on PATH; install Redis to run these tests")
        self.case = case
        self.dir = tempfile.mkdtemp(prefix="pushd-redis-", dir="/tmp")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None
        case.addCleanup(self._cleanup)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

    def argv(self):
        return [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", self.dir,
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--logfile", "",
        ]

    @defer.inlineCallbacks
    def start(self):
        """Fire with self once the server answers PING."""
        if self.running:
            raise RuntimeError("redis-server is running already")
        self.process = Process(f"redis:{self.port}")
        reactor.spawnProcess(self.process, self.executable, self.argv(), env=dict(os.environ), path=self.dir)
        deadline = reactor.seconds() + START_TIMEOUT
        while True:
            if not self.process.running:
                raise self.case.failureException(f"redis-server exited at start:\n{self.process.log()}")
            if (yield self._ping()):
                return self
            if reactor.seconds() > deadline:
                yield self.kill()
                raise self.case.failureException(
                    f"redis-server did not answer PING in {START_TIMEOUT:g}s:\n{self.process.log()}"
                )
            yield task.deferLater(reactor, POLL, lambda: None)

    @defer.inlineCallbacks
    def _ping(self):
        p = _Ping()
        try:
            yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, timeout=1), p)
        except ConnectError:
            return False
        timer = reactor.callLater(1, p.transport.abortConnection)
        reply = yield p.done
        if timer.active():
            timer.cancel()
        return reply.startswith(b"+PONG")

    def kill(self):
        """SIGKILL: a crash. Fires once it has exited."""
        if not self.running:
            return defer.succeed(None)
        return self.process.signal(signal.SIGKILL).addCallback(lambda _: None)

    def stop(self):
        """SIGTERM: a clean shutdown. Fires once it has exited."""
        if not self.running:
            return defer.succeed(None)
        return self.process.stop().addCallback(lambda _: None)

    def pause(self):
        """SIGSTOP: a server that accepts connections and never answers."""
        self.process.transport.signalProcess(signal.SIGSTOP)

    def resume(self):
        self.process.transport.signalProcess(signal.SIGCONT)

    @defer.inlineCallbacks
    def restart(self):
        """Stop if running, then start again on the same port with the same data."""
        yield self.stop()
        yield self.start()
        return self

    @defer.inlineCallbacks
    def _cleanup(self):
        if self.running:
            yield self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
