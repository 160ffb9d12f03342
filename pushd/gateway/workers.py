"""
``twistd pushd-gateway --workers N``: a small supervisor that runs N gateway processes
(``python -m pushd.gateway.worker``) sharing the courier and provider ports, restarts one
that dies (with backoff, at a bounded rate), and forwards SIGTERM/SIGHUP to them. It holds
no store and no connection: it only spawns, relays the workers' log lines and waits.

Why SO_REUSEPORT (each worker opens its own socket on the port) and not one socket opened
here and inherited by every worker, measured with ``bench/accept_spread.py`` (2 workers on
this 2-core machine, a storm of 4,000 connections, 1 ms of CPU per accept): both ways split
the storm within 4% of 1:1 and cost the workers the same CPU (2.0 s each), but with
SO_REUSEPORT the last connection was accepted after 2.3-2.6 s, on the shared socket after
3.55-3.87 s (every worker wakes for every connection and all but one find nothing). And it
needs no parent holding the ports: systemd template instances run the same way.
docs/workers.md has the table and what happens when a worker dies.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import signal
import sys

from twisted.application import service
from twisted.internet import defer, protocol
from twisted.logger import Logger

log = Logger()

#: Stores several processes can share; anything else is one process's (sqlite, memory).
SHARED_STORES = ("redis://", "rediss://", "redis-sentinel://")
#: The first restart of a worker that died waits this long (s); doubles while it keeps dying.
FIRST_DELAY = 1.0
#: Restarts counted over this window (s) for --worker-restarts.
RESTART_WINDOW = 60.0


def refuse_unshared_store(workers: int, store: str):
    """The one-line reason N workers cannot run on ``store``, or None."""
    if workers > 1 and not store.startswith(SHARED_STORES):
        return (f"--workers {workers} needs a store the workers share, and --store {store} belongs to one"
                " process (a notification one worker accepts would not reach a device connected to another):"
                " use --store redis://HOST:PORT/DB (or --workers 1)")
    return None


def refuse_reuse_port_supervisor(workers: int, reuse_port: bool):
    """--reuse-port is one process of several (a pushd-gateway@.service instance); with
    --workers N (from a config file, say) it would start N more."""
    if workers > 1 and reuse_port:
        return (f"--reuse-port runs this process as one of several sharing the ports, and --workers {workers}"
                " would start more: use one or the other (pushd-gateway@.service instances need workers = 1)")
    return None


@contextlib.contextmanager
def state_lock(state_dir):
    """
    Held while a gateway process creates or loads its state (CA, keys, secrets): workers
    and pushd-gateway@ instances started at once on a fresh state directory would
    otherwise each make a CA and overwrite each other's.
    """
    from pushd import private

    private.ensure_dir(state_dir)
    fd = os.open(os.path.join(state_dir, "state.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def worker_node_id(node_id, index: int):
    """Worker ``index``'s node id: ID-1..ID-N when one was given; else None (each process
    derives its own from host name, pid and start time, distinct already)."""
    return f"{node_id}-{index}" if node_id else None


def worker_argv(args: list, index: int, count: int) -> list:
    """The command line of worker ``index`` (1-based): the gateway's own options, as given."""
    return [sys.executable, "-m", "pushd.gateway.worker", str(index), str(count), *args]


class WorkerProcess(protocol.ProcessProtocol):
    """One worker: its output relayed into the supervisor's log, a line at a time (bounded)."""

    MAX_LINE = 16 * 1024

    def __init__(self, supervisor, index: int):
        self.supervisor = supervisor
        self.index = index
        self.pid = None
        self.started = None
        self._partial = b""
        self.ended = defer.Deferred()

    def connectionMade(self):
        self.pid = self.transport.pid
        self.started = self.supervisor.clock.seconds()

    def _data(self, data: bytes):
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        if len(self._partial) > self.MAX_LINE:
            lines.append(self._partial)
            self._partial = b""
        for raw in lines:
            log.info("{line}", line=raw.decode("utf-8", "replace").rstrip("\r"),
                     log_system=f"worker {self.index} pid {self.pid}")

    outReceived = errReceived = _data

    def processEnded(self, reason):
        if self._partial:
            self._data(b"\n")
        self.supervisor.exited(self, reason.value)
        self.ended.callback(None)


def _spawn(reactor):
    def spawn(proto, argv):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # stdin a pipe the worker only reads: it sees EOF when the supervisor is gone,
        # however that happened (SIGKILL included), and stops instead of running orphaned.
        return reactor.spawnProcess(proto, argv[0], argv, env=env, childFDs={0: "w", 1: "r", 2: "r"})

    return spawn


class Supervisor(service.Service):
    """
    Keeps ``count`` workers running. A worker that exits while the supervisor runs is
    started again after a delay: 1 s, doubling while it keeps dying within ``backoff``
    seconds of its start, never more than ``backoff``. More than ``max_restarts`` restarts
    (all workers together) within 60 s means something is wrong that restarting will not
    fix: the supervisor stops every worker and exits with status 1, and the service manager
    (systemd's Restart=, with its own start limit) decides what next.
    """

    def __init__(self, args: list, count: int, reactor, backoff: float = 30.0, max_restarts: int = 10,
                 stop_timeout: float = 30.0, spawn=None, argv_for=worker_argv):
        self.args = list(args)
        self.count = count
        self.clock = reactor
        self.reactor = reactor
        self.backoff = backoff
        self.max_restarts = max_restarts
        self.stop_timeout = stop_timeout
        self.spawn = spawn or _spawn(reactor)
        self.argv_for = argv_for
        self.workers: dict = {}  # index -> WorkerProcess (live)
        self.delays: dict = {}  # index -> the next restart's delay
        self.pending: dict = {}  # index -> the IDelayedCall of its restart
        self.restarts = collections.deque(maxlen=max_restarts + 1)
        self.failed = False
        self._old_hup = None

    def startService(self):
        super().startService()
        log.info("supervising {n} gateway workers (pid {pid})", n=self.count, pid=os.getpid())
        for i in range(1, self.count + 1):
            self.start_worker(i)
        self._install_hup()

    def start_worker(self, index: int):
        self.pending.pop(index, None)
        proto = WorkerProcess(self, index)
        self.workers[index] = proto
        self.spawn(proto, self.argv_for(self.args, index, self.count))
        log.info("worker {index} started (pid {pid})", index=index, pid=proto.pid)

    def exited(self, proto: WorkerProcess, why):
        index = proto.index
        if self.workers.get(index) is proto:
            del self.workers[index]
        status = getattr(why, "exitCode", None)
        sig = getattr(why, "signal", None)
        how = f"signal {sig}" if sig is not None else f"status {status}"
        if not self.running:
            log.info("worker {index} (pid {pid}) exited ({how})", index=index, pid=proto.pid, how=how)
            return
        now = self.clock.seconds()
        self.restarts.append(now)
        if len(self.restarts) > self.max_restarts and now - self.restarts[0] <= RESTART_WINDOW:
            log.critical(
                "worker {index} (pid {pid}) exited ({how}): {n} restarts within {window:g} s is more than"
                " --worker-restarts {max}; stopping all workers and exiting with status 1",
                index=index, pid=proto.pid, how=how, n=len(self.restarts), window=RESTART_WINDOW,
                max=self.max_restarts,
            )
            self.give_up()
            return
        lived = now - (proto.started if proto.started is not None else now)
        delay = self.delays.get(index, FIRST_DELAY)
        if lived >= self.backoff:
            delay = FIRST_DELAY
        self.delays[index] = min(self.backoff, delay * 2)
        log.warn(
            "worker {index} (pid {pid}) exited ({how}) after {lived:.1f} s; restarting it in {delay:g} s",
            index=index, pid=proto.pid, how=how, lived=lived, delay=delay,
        )
        self.pending[index] = self.clock.callLater(delay, self.start_worker, index)

    def give_up(self):
        self.failed = True
        # After the reactor has stopped (every worker has exited by then): twistd has no
        # exit status of its own, and systemd's Restart=on-failure needs one that is not 0.
        self.reactor.addSystemEventTrigger("after", "shutdown", _exit_failed)
        self.reactor.stop()

    def signal_all(self, sig: str):
        for proto in list(self.workers.values()):
            try:
                proto.transport.signalProcess(sig)
            except Exception as e:  # it exited meanwhile
                log.debug("worker {index}: {e}", index=proto.index, e=e)

    def _install_hup(self):
        if not hasattr(signal, "SIGHUP"):
            return
        try:
            self._old_hup = signal.signal(signal.SIGHUP, self._on_hup)
        except ValueError:  # not the main thread (tests)
            self._old_hup = None

    def _on_hup(self, signum, frame):
        self.reactor.callFromThread(self._forward_hup)
        if callable(self._old_hup):
            self._old_hup(signum, frame)  # e.g. twistd's log rotation

    def _forward_hup(self):
        log.info("SIGHUP: forwarding it to {n} workers", n=len(self.workers))
        self.signal_all("HUP")

    def stopService(self):
        super().stopService()
        for call in self.pending.values():
            if call.active():
                call.cancel()
        self.pending.clear()
        if self._old_hup is not None:
            signal.signal(signal.SIGHUP, self._old_hup)
            self._old_hup = None
        live = list(self.workers.values())
        if not live:
            return None
        log.info("stopping {n} workers (SIGTERM; SIGKILL after {t:g} s)", n=len(live), t=self.stop_timeout)
        self.signal_all("TERM")
        killer = self.clock.callLater(self.stop_timeout, self._kill_remaining)
        done = defer.DeferredList([p.ended for p in live])

        def finished(result):
            if killer.active():
                killer.cancel()
            log.info("all workers have exited")
            return None

        return done.addCallback(finished)

    def _kill_remaining(self):
        log.warn("workers still running after {t:g} s: SIGKILL to {n}", t=self.stop_timeout, n=len(self.workers))
        self.signal_all("KILL")


def _exit_failed():
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
