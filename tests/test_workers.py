"""--workers N: the supervisor's restarts and stop (fake processes, a task.Clock), the
SO_REUSEPORT listener, the refusal on a store one process owns."""

from __future__ import annotations

import fcntl
import os
import socket

from twisted.internet import defer, protocol, reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.python import failure, usage
from twisted.trial import unittest
from twisted.internet.error import CannotListenError, ProcessDone, ProcessTerminated

from pushd import endpoints
from pushd.gateway import tap, worker, workers


class FakeTransport:
    def __init__(self, pid):
        self.pid = pid
        self.signals: list = []

    def signalProcess(self, sig):
        self.signals.append(sig)


class Spawner:
    def __init__(self):
        self.procs: list = []
        self.argvs: list = []

    def __call__(self, proto, argv):
        proto.makeConnection(FakeTransport(1000 + len(self.procs)))
        self.procs.append(proto)
        self.argvs.append(argv)

    def die(self, proto, signal_=9):
        proto.processEnded(failure.Failure(ProcessTerminated(signal=signal_)))


class FakeReactor(MemoryReactorClock):
    def __init__(self):
        super().__init__()
        self.stopped = 0

    def stop(self):
        self.stopped += 1


def supervisor(count=2, **kw):
    clock = FakeReactor()
    spawn = Spawner()
    sup = workers.Supervisor(["--store", "redis://h:1/0"], count, clock, spawn=spawn, **kw)
    sup.startService()
    return sup, clock, spawn


class StoreRefusal(unittest.TestCase):
    def test_one_process_stores_refused(self):
        for store in ("sqlite", "sqlite:/tmp/x.sqlite3", "memory"):
            why = workers.refuse_unshared_store(2, store)
            self.assertIn(f"--store {store}", why)
            self.assertIn("--store redis://HOST:PORT/DB", why)
            self.assertNotIn("\n", why)
        self.assertIsNone(workers.refuse_unshared_store(2, "redis://127.0.0.1:6379/0"))
        self.assertIsNone(workers.refuse_unshared_store(2, "redis-sentinel://10.0.0.1:26379/pushd/0"))
        self.assertIsNone(workers.refuse_unshared_store(1, "sqlite"))

    def test_refused_when_options_are_parsed(self):
        with self.assertRaisesRegex(usage.UsageError, r"--workers 3 needs a store .* use --store redis://"):
            tap.Options().parseOptions(["--workers", "3"])
        opts = tap.Options()
        opts.parseOptions(["--workers", "3", "--store", "redis://127.0.0.1:1/0"])
        self.assertEqual(opts.argv, ["--workers", "3", "--store", "redis://127.0.0.1:1/0"])

    def test_reuse_port_with_workers_refused(self):
        with self.assertRaisesRegex(usage.UsageError, r"--reuse-port runs this process as one of several"):
            tap.Options().parseOptions(["--workers", "2", "--reuse-port", "--store", "redis://127.0.0.1:1/0"])

    def test_state_created_under_a_lock(self):
        """Processes starting at once on a fresh state directory take turns making the CA."""
        state = self.mktemp()
        with workers.state_lock(state):
            fd = os.open(os.path.join(state, "state.lock"), os.O_RDWR)
            self.addCleanup(os.close, fd)
            self.assertRaises(BlockingIOError, fcntl.flock, fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once the first is done

    def test_unshareable_listener_refused(self):
        opts = tap.Options()
        opts.parseOptions(["--workers", "2", "--store", "redis://127.0.0.1:1/0", "--courier", "tls:unix:/tmp/c.sock",
                           "--state-dir", self.mktemp()])
        with self.assertRaisesRegex(usage.UsageError, r"--workers 2: bad listener 'tls:unix:/tmp/c.sock'"):
            tap.makeService(opts, FakeReactor())


class WorkerOptions(unittest.TestCase):
    def test_node_ids_derived(self):
        opts = {"workers": 4, "reuse-port": 0, "node-id": "gw-a"}
        worker.make_worker(opts, 3)
        self.assertEqual(opts, {"workers": 1, "reuse-port": 1, "node-id": "gw-a-3"})

    def test_no_node_id_left_to_each_process(self):
        opts = {"workers": 4, "reuse-port": 0}
        worker.make_worker(opts, 2)
        self.assertNotIn("node-id", opts)
        self.assertEqual(workers.worker_node_id("", 2), None)

    def test_argv(self):
        argv = workers.worker_argv(["--workers", "2", "--config", "/etc/pushd/gateway.conf"], 2, 2)
        self.assertEqual(argv[1:], ["-m", "pushd.gateway.worker", "2", "2", "--workers", "2", "--config",
                                    "/etc/pushd/gateway.conf"])

    def test_worker_mode_wins_over_config(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("[gateway]\nworkers = 4\nstore = redis://127.0.0.1:1/0\n")
        opts = tap.Options()
        opts.parseOptions(["--config", path])
        self.assertEqual(opts["workers"], 4)
        worker.make_worker(opts, 1)
        self.assertEqual((opts["workers"], opts["reuse-port"]), (1, 1))


    def test_second_sigterm_ignored(self):
        """The supervisor's SIGTERM and systemd's/a terminal's: the handler runs once."""
        import signal

        saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        self.addCleanup(lambda: [signal.signal(sig, h) for sig, h in saved.items()])
        calls = []
        signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
        worker._stop_once_on_signals(FakeReactor())
        handler = signal.getsignal(signal.SIGTERM)
        handler(signal.SIGTERM, None)
        handler(signal.SIGTERM, None)
        self.assertEqual(calls, [signal.SIGTERM])


class SupervisorRestarts(unittest.TestCase):
    def test_starts_count_workers_with_their_index(self):
        sup, clock, spawn = supervisor(3)
        self.assertEqual([a[3:5] for a in spawn.argvs], [["1", "3"], ["2", "3"], ["3", "3"]])
        self.assertEqual(sorted(sup.workers), [1, 2, 3])

    def test_dead_worker_restarted_with_doubling_delay(self):
        sup, clock, spawn = supervisor(2, backoff=5.0)
        delays = []
        for _ in range(4):
            spawn.die(sup.workers[1])
            self.assertNotIn(1, sup.workers)
            call = sup.pending[1]
            delays.append(call.getTime() - clock.seconds())
            clock.advance(delays[-1])
            self.assertIn(1, sup.workers)
        self.assertEqual(delays, [1.0, 2.0, 4.0, 5.0])
        self.assertEqual(len(spawn.procs), 2 + 4)
        self.assertEqual(spawn.argvs[-1][3], "1")

    def test_delay_resets_after_a_long_life(self):
        sup, clock, spawn = supervisor(1, backoff=5.0)
        spawn.die(sup.workers[1])
        clock.advance(1.0)
        spawn.die(sup.workers[1])
        clock.advance(2.0)
        clock.advance(6.0)  # lived longer than backoff
        spawn.die(sup.workers[1])
        self.assertEqual(sup.pending[1].getTime() - clock.seconds(), 1.0)

    def test_restart_rate_bounded(self):
        sup, clock, spawn = supervisor(2, max_restarts=3, backoff=1.0)
        for i in range(3):
            spawn.die(sup.workers[1 + i % 2])
            clock.advance(1.0)
        self.assertEqual(clock.stopped, 0)
        spawn.die(sup.workers[1])
        self.assertEqual(clock.stopped, 1)
        self.assertTrue(sup.failed)
        # Exits with status 1 once the reactor has stopped (systemd's Restart=on-failure).
        self.assertEqual([t[0] for t in clock.triggers["after"]["shutdown"]], [workers._exit_failed])
        # No restart is scheduled once it gives up.
        self.assertNotIn(1, sup.pending)

    def test_restarts_outside_the_window_forgotten(self):
        sup, clock, spawn = supervisor(1, max_restarts=2, backoff=1.0)
        for _ in range(5):
            spawn.die(sup.workers[1])
            clock.advance(40.0)
        self.assertEqual(clock.stopped, 0)

    def test_stop_terms_all_and_waits_then_kills(self):
        sup, clock, spawn = supervisor(2, stop_timeout=10.0)
        d = sup.stopService()
        self.assertEqual([p.transport.signals for p in spawn.procs], [["TERM"], ["TERM"]])
        spawn.procs[0].processEnded(failure.Failure(ProcessDone(0)))
        self.assertNoResult(d)
        clock.advance(10.0)
        self.assertEqual(spawn.procs[1].transport.signals, ["TERM", "KILL"])
        spawn.die(spawn.procs[1])
        self.successResultOf(d)
        self.assertEqual(len(spawn.procs), 2)  # nothing restarted while stopping

    def test_stop_cancels_pending_restart(self):
        sup, clock, spawn = supervisor(1)
        spawn.die(sup.workers[1])
        self.successResultOf(defer.maybeDeferred(sup.stopService))
        clock.advance(60)
        self.assertEqual(len(spawn.procs), 1)

    def test_hup_forwarded(self):
        sup, clock, spawn = supervisor(2)
        sup._forward_hup()
        self.assertEqual([p.transport.signals for p in spawn.procs], [["HUP"], ["HUP"]])

    def test_output_relayed_bounded(self):
        sup, clock, spawn = supervisor(1)
        proto = sup.workers[1]
        proto.outReceived(b"x" * (proto.MAX_LINE + 10))
        self.assertEqual(proto._partial, b"")


class ReusePort(unittest.TestCase):
    def listen(self, desc):
        ep = endpoints.reuse_port_endpoint(reactor, desc)
        d = ep.listen(protocol.Factory.forProtocol(protocol.Protocol))

        def listening(port):
            self.addCleanup(port.stopListening)
            return port

        return d.addCallback(listening)

    def test_two_listeners_share_a_port(self):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        first = self.successResultOf(self.listen(f"tcp:{port}:interface=127.0.0.1"))
        second = self.successResultOf(self.listen(f"tcp:port={port}:interface=127.0.0.1"))
        self.assertEqual(first.getHost().port, second.getHost().port)

    def test_without_reuseport_the_port_is_refused(self):
        """The test above fails without SO_REUSEPORT: a plain listener makes the port taken."""
        plain = reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1")
        self.addCleanup(plain.stopListening)
        self.failureResultOf(self.listen(f"tcp:{plain.getHost().port}:interface=127.0.0.1"), CannotListenError)

    def test_descriptions(self):
        ep = endpoints.reuse_port_endpoint(reactor, r"tcp6:5223:interface=\:\:1:backlog=9")
        self.assertEqual((ep.port, ep.interface, ep.backlog, ep.family), (5223, "::1", 9, socket.AF_INET6))
        proxied = endpoints.reuse_port_endpoint(reactor, "haproxy:tcp:443")
        self.assertIsInstance(proxied._wrappedEndpoint, endpoints.ReusePortEndpoint)
        for bad in ("unix:/tmp/x", "systemd:domain=INET:index=0", "tcp:0", "tcp:443:bogus=1", "ssl:443"):
            self.assertRaises(ValueError, endpoints.reuse_port_endpoint, reactor, bad)


class SystemdUnits(unittest.TestCase):
    def test_units_verify(self):
        """systemd-analyze verify on the template (instance 1) and the single unit, their
        twistd path pointed at this Python's (no /usr/bin/twistd here)."""
        import shutil
        import subprocess
        import sys
        from pathlib import Path

        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise unittest.SkipTest("systemd-analyze is not installed (Debian: systemd)")
        root = Path(__file__).resolve().parent.parent / "systemd"
        twistd = Path(sys.executable).with_name("twistd")
        tmp = Path(self.mktemp())
        tmp.mkdir()
        for name in ("pushd-gateway@.service", "pushd-gateway.service"):
            (tmp / name).write_text((root / name).read_text().replace("/usr/bin/twistd", str(twistd)))
        template = (root / "pushd-gateway@.service").read_text()
        self.assertIn("--reuse-port", template)
        self.assertIn("KillMode=mixed", (root / "pushd-gateway.service").read_text())
        for unit in ("pushd-gateway@1.service", "pushd-gateway.service"):
            out = subprocess.run([analyze, "verify", f"./{unit}"], cwd=tmp, capture_output=True, text=True)
            self.assertEqual((out.returncode, out.stderr.strip()), (0, ""), unit)
