"""
A real redis-server for one test: its own port and directory, an append-only file synced on
every write (so a SIGKILL loses nothing acknowledged), and cleanup on the test case.

    redis = RedisServer(self)          # self: a trial TestCase
    yield redis.start()
    ... RedisStore(redis.url) ...
    yield redis.kill(); yield redis.restart()

A replica and sentinels, for failover tests (short Sentinel timers: a failover in about a second):

    master = yield RedisServer(self).start()
    replica = yield RedisServer(self, replica_of=master).start()
    sentinel = yield RedisSentinel(self, master, "pushd-test").start()
    yield sentinel.knows_replicas(1)
    ... RedisStore(sentinel.url(), wait=1) ...; yield master.kill()
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
    def __init__(self, case, executable="redis-server", replica_of=None):
        self.executable = shutil.which(executable)
        if self.executable is None:
            # Not a skip: a suite that silently skips its Redis tests proves nothing.
            raise case.failureException(f"{executable} is not on PATH; install Redis to run these tests")
        self.case = case
        self.dir = tempfile.mkdtemp(prefix="pushd-redis-", dir="/tmp")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None
        self.replica_of = replica_of
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
        ] + (["--replicaof", "127.0.0.1", str(self.replica_of.port)] if self.replica_of is not None else [])

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


@defer.inlineCallbacks
def command(port, *args, timeout=2.0):
    """One command to the server at ``port`` on a connection of its own; fire with the reply."""
    import txredisapi

    conn = yield txredisapi.Connection("127.0.0.1", port, reconnect=False, connectTimeout=timeout,
                                       replyTimeout=timeout)
    try:
        return (yield conn.execute_command(*args))
    finally:
        yield conn.disconnect()


class RedisSentinel(RedisServer):
    """A real redis-sentinel watching ``master`` under ``name``, deciding within about a second."""

    def __init__(self, case, master, name, down_after_ms=1500, failover_timeout_ms=3000):
        super().__init__(case, executable="redis-sentinel")
        self.master, self.name = master, name
        self.down_after_ms, self.failover_timeout_ms = down_after_ms, failover_timeout_ms

    def argv(self):
        conf = os.path.join(self.dir, "sentinel.conf")  # Sentinel rewrites it: its own file
        with open(conf, "w") as f:
            f.write(f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\nlogfile \"\"\n"
                    f"sentinel monitor {self.name} 127.0.0.1 {self.master.port} 1\n"
                    f"sentinel down-after-milliseconds {self.name} {self.down_after_ms}\n"
                    f"sentinel failover-timeout {self.name} {self.failover_timeout_ms}\n")
        return [self.executable, conf]

    def store_url(self, extra=(), db=0):
        """The store URL for this sentinel (``extra``: more HOST:PORT listed before it)."""
        return "redis-sentinel://" + ",".join([*extra, f"127.0.0.1:{self.port}"]) + f"/{self.name}/{db}"

    @defer.inlineCallbacks
    def knows_replicas(self, n, within=START_TIMEOUT):
        """Wait until the sentinel has found ``n`` replicas of the master (it asks the master's INFO)."""
        deadline = reactor.seconds() + within
        while True:
            replicas = yield command(self.port, "SENTINEL", "REPLICAS", self.name)
            if len([r for r in replicas if "s_down" not in dict(zip(r[::2], r[1::2])).get("flags", "")]) >= n:
                return
            if reactor.seconds() > deadline:
                raise self.case.failureException(f"sentinel found {len(replicas)} of {n} replicas in {within:g}s")
            yield task.deferLater(reactor, POLL, lambda: None)

    @defer.inlineCallbacks
    def master_port(self):
        host, port = yield command(self.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
        return int(port)
