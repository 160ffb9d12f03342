"""
The hostile-network fault suite: real device daemons reach a real gateway (SQLite store)
through a proxy that breaks their connections at random (seeded) points, the gateway is
SIGKILLed and restarted on the same state, one device's clock jumps by more than the Connect
nonce window; meanwhile an app server sends numbered notifications through the provider API
(HTTP/1.1, real TLS), some with a short ``apns-expiration``, and an app on each device
receives them. When the faults stop and the devices settle, it prints per fault: sent,
accepted (200), delivered to the app, duplicates dropped by the device, expired, lost
(accepted, not expired, never delivered). Lost must be 0.

    python -m bench.faults                 # the full run (<= 3 minutes)
    python -m bench.faults --seed 7 --devices 3 --duration 15    # a short one

Loopback only; every process it starts runs in a process group of its own and is stopped
when the run ends, however it ends (Ctrl-C included). The clock jump needs libfaketime
(Debian's ``faketime`` package).
"""

from __future__ import annotations

import argparse
import atexit
import glob
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from twisted.internet import defer, protocol, reactor, ssl, task
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from bench.faultproxy import FaultProxy

# twisted.web's client warns on every readBody over TLS: harmless, and not ours to change.
warnings.filterwarnings("ignore", "Using readBody with a transport that does not have an abortConnection")

ROOT = Path(__file__).resolve().parent.parent
TOPIC = "com.example.faults"
HOST = "127.0.0.1"
#: Faults the proxy applies to one device's connection.
LINK_FAULTS = ("drop", "delay", "truncate", "reset", "blackhole")
FAULTS = LINK_FAULTS + ("gateway-kill", "clock-jump")
#: More than tls.NONCE_WINDOW (300 s) each time, alternating direction; less than
#: tls.BACKDATE (3600 s), so that a clock behind still accepts a gateway made a second ago.
JUMP = (330, 600)

# Short intervals so that every fault is noticed and repaired within seconds: the device's
# keepalive (1.5-3 s, answered within 2 s) finds a black hole, its backoff is capped at 1 s,
# and the gateway closes a connection silent for 3 x 2 s.
GATEWAY_ARGS = ["--keepalive", "3", "--grace", "2"]
DEVICE_ARGS = ["--keepalive-min", "1.5", "--keepalive-max", "3", "--keepalive-timeout", "2", "--max-delay", "1"]

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "-l", "-"]
#: A process group of its own, so a stop reaches whatever the process started.
SETSID = [sys.executable, "-c", "import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])"]

_groups: set = set()


def _kill_groups():
    for pid in list(_groups):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    _groups.clear()


atexit.register(_kill_groups)


def libfaketime() -> str | None:
    for path in sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1")) + ["/usr/lib/faketime/libfaketime.so.1"]:
        if os.path.exists(path):
            return path
    return None


def free_port() -> int:
    s = socket.socket()
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


class Proc(protocol.ProcessProtocol):
    """A real process in its own group; its output goes to a log file and is watched for lines."""

    def __init__(self, name, argv, cwd, log_path, env=None):
        self.name, self.argv, self.cwd = name, argv, cwd
        self.log_path = log_path
        self.extra_env = env or {}
        self.lines: list = []
        self._partial = b""
        self._waiters: list = []
        self.ended = None
        self.pid = None

    def start(self):
        self.ended = defer.Deferred()
        self.lines, self._partial = [], b""
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        self._log = open(self.log_path, "ab")
        t = reactor.spawnProcess(self, SETSID[0], SETSID + self.argv, env=env, path=str(self.cwd))
        self.pid = t.pid
        _groups.add(self.pid)
        return self

    @property
    def running(self):
        return self.ended is not None and not self.ended.called

    def _data(self, data):
        self._log.write(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            del self.lines[:-200]
            for w in list(self._waiters):
                if w[0].search(line):
                    self._waiters.remove(w)
                    w[2].cancel()
                    w[1].callback(line)

    outReceived = errReceived = _data

    def processEnded(self, reason):
        _groups.discard(self.pid)
        self._log.close()
        for w in list(self._waiters):
            self._waiters.remove(w)
            w[2].cancel()
            w[1].errback(RuntimeError(f"{self.name} exited while waiting for {w[0].pattern!r}; see {self.log_path}"))
        self.ended.callback(None)

    def wait_for(self, pattern, timeout=60.0):
        rx = re.compile(pattern)
        d = defer.Deferred()

        def expire():
            self._waiters.remove(entry)
            d.errback(RuntimeError(f"{self.name}: no line matching {pattern!r} in {timeout} s; see {self.log_path}"))

        entry = (rx, d, reactor.callLater(timeout, expire))
        self._waiters.append(entry)
        return d

    def kill(self, sig=signal.SIGKILL):
        if self.running:
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                try:
                    os.kill(self.pid, sig)
                except ProcessLookupError:
                    pass
        return self.ended if self.ended is not None else defer.succeed(None)

    @defer.inlineCallbacks
    def stop(self, grace=3.0):
        if not self.running:
            return
        self.kill(signal.SIGTERM)
        timer = reactor.callLater(grace, self.kill, signal.SIGKILL)
        yield self.ended
        if timer.active():
            timer.cancel()


@dataclass
class Note:
    n: int
    device: int
    label: str
    expiry: int
    sent: float
    apns_id: str
    accepted: bool = False
    status: int | None = None
    delivered: int = 0


@dataclass
class Row:
    injected: int = 0
    sent: int = 0
    accepted: int = 0
    delivered: int = 0
    dup_device: int = 0
    dup_app: int = 0
    expired: int = 0
    lost: int = 0


@dataclass
class Config:
    devices: int = 6
    duration: float = 110.0  # seconds of faults
    rate: float = 20.0  # notifications a second, over all devices
    seed: int | None = None
    kills: int = 2  # gateway SIGKILLs during the run
    short_fraction: float = 0.25  # notifications with an apns-expiration a few seconds out
    settle: float = 30.0  # longest wait for the last deliveries after the faults stop
    gap: tuple = (1.0, 3.0)  # quiet time between two faults on one device
    keep: bool = False
    out: object = sys.stdout


class Device:
    def __init__(self, suite, i):
        self.suite = suite
        self.i = i
        self.name = f"dev{i}"
        self.state = suite.dir / self.name
        self.proxy = FaultProxy(reactor, HOST, suite.courier_port, random.Random(suite.rng.random()))
        self.proxy_port = None
        self.label = "none"
        self.last_fault = "none"
        self.app = None
        self.token = None
        self.status = {}
        self.dups = 0
        self.faketime = None  # the file libfaketime reads the clock offset from
        self.offset = 0

    def start(self):
        env = {}
        if self.i == 0 and self.suite.libfaketime:
            self.faketime = self.suite.dir / "dev0.faketime"
            env = self.suite.faketime_env(self.faketime, 0)
        self.proc = Proc(
            self.name,
            TWISTD + [
                "pushd-device",
                "--state-dir", str(self.state),
                "--transport", f"tls:{HOST}:{self.proxy_port}",
                "--tls-name", "localhost",
                "--enrol-url", f"https://{HOST}:{self.suite.provider_port}",
                "--enrol-secret-file", str(self.suite.gw_state / "enrol.secret"),
                *DEVICE_ARGS,
            ],
            self.suite.dir,
            self.suite.dir / f"{self.name}.log",
            env,
        ).start()
        return self.proc.wait_for(r"connected as device")


class Suite:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.seed = cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(1, 10**6)
        self.rng = random.Random(self.seed)
        self.dir = Path(tempfile.mkdtemp(prefix="pushd-faults-"))
        self.gw_state = self.dir / "gateway"
        self.courier_port = free_port()
        self.provider_port = free_port()
        self.libfaketime = libfaketime()
        self.devices = [Device(self, i) for i in range(cfg.devices)]
        self.notes: list = []
        self.by_id: dict = {}
        self.rows = {k: Row() for k in ("none",) + FAULTS}
        self.events: list = []
        self.global_label = None
        self.gateway_up = False
        self.inflight = 0
        self.t0 = time.time()
        self.stopping = False
        self._kinds = self._kind_cycle()
        self.ports: list = []
        self.app_dups = 0

    def say(self, text):
        print(f"[{time.time() - self.t0:6.1f}s] {text}", file=self.cfg.out, flush=True)

    # --- processes -----------------------------------------------------------------

    def faketime_env(self, path: Path, offset: int) -> dict:
        path.write_text(f"{offset:+d}\n")
        return {
            "LD_PRELOAD": self.libfaketime,
            "FAKETIME_TIMESTAMP_FILE": str(path),
            "FAKETIME_NO_CACHE": "1",  # the file is read on every call: a jump is seen at once
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }

    def start_gateway(self):
        self.gateway = Proc(
            "gateway",
            TWISTD + [
                "pushd-gateway",
                "--state-dir", str(self.gw_state),
                "--courier", f"tls:{self.courier_port}:interface={HOST}",
                "--provider", f"tls:{self.provider_port}:interface={HOST}",
                *GATEWAY_ARGS,
            ],
            self.dir,
            self.dir / "gateway.log",
        ).start()

        def up(_):
            self.gateway_up = True

        return self.gateway.wait_for(r"Site \(TLS\) starting on").addCallback(up)

    @defer.inlineCallbacks
    def setup(self):
        self.say(f"seed {self.seed} (again: python -m bench.faults --seed {self.seed}); work dir {self.dir}")
        if not self.libfaketime:
            self.say("libfaketime not found (Debian package faketime): no clock jump this run")
        yield self.start_gateway()
        for dev in self.devices:
            dev.proxy_port = free_port()
            self.ports.append(reactor.listenTCP(dev.proxy_port, dev.proxy, interface=HOST))
        # Enrolment is CPU-bound key work: a few at a time.
        for group in range(0, len(self.devices), 3):
            yield defer.gatherResults([d.start() for d in self.devices[group:group + 3]], consumeErrors=True)
        from pushd.device import client

        for dev in self.devices:
            dev.app = yield client.connect(reactor, str(dev.state / "pushd.sock"), self._on_push(dev))
            dev.token = (yield dev.app.register(TOPIC)).hex()
        ca = ssl.Certificate.loadPEM((self.gw_state / "ca.pem").read_bytes())
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 16
        self.agent = Agent(reactor, BrowserLikePolicyForHTTPS(trustRoot=ca), pool=self.pool, connectTimeout=3)
        self.key = (self.gw_state / "provider.key").read_text().strip()
        self.say(f"gateway and {len(self.devices)} devices up; proxy ports "
                 f"{', '.join(str(d.proxy_port) for d in self.devices)} -> courier {self.courier_port}")

    @defer.inlineCallbacks
    def teardown(self):
        self.stopping = True
        for dev in self.devices:
            if dev.app is not None and dev.app.transport is not None:
                dev.app.transport.loseConnection()
        for port in self.ports:
            yield port.stopListening()
        for dev in self.devices:
            for pipe in list(dev.proxy.pipes):
                pipe.abort()
        if getattr(self, "pool", None) is not None:
            yield self.pool.closeCachedConnections()
        procs = [d.proc for d in self.devices if getattr(d, "proc", None)] + [getattr(self, "gateway", None)]
        yield defer.gatherResults([p.stop() for p in procs if p is not None], consumeErrors=True)
        if not self.cfg.keep:
            shutil.rmtree(self.dir, True)

    # --- the app ------------------------------------------------------------------

    def _on_push(self, dev):
        def on_push(topic, payload, message_id):
            try:
                n = json.loads(payload)["n"]
            except (ValueError, KeyError, TypeError):
                return
            note = self.by_id.get(n)
            if note is None:
                return
            note.delivered += 1
            if note.delivered > 1:
                self.app_dups += 1
                self.rows[note.label].dup_app += 1

        return on_push

    # --- the app server -----------------------------------------------------------------

    def label(self, dev):
        return self.global_label or dev.label

    def send_tick(self):
        if self.inflight >= 64:
            return  # the gateway is down or slow: an app server would queue; we skip the tick
        dev = self.devices[self._rr % len(self.devices)]
        self._rr += 1
        now = time.time()
        short = self.rng.random() < self.cfg.short_fraction
        expiry = int(now + (self.rng.uniform(2, 5) if short else 3600))
        note = Note(next(self._counter), dev.i, self.label(dev), expiry, now, str(uuid.uuid4()))
        self.notes.append(note)
        self.by_id[note.n] = note
        self.rows[note.label].sent += 1
        self.inflight += 1
        self.send(dev, note).addBoth(self._sent)

    def _sent(self, _):
        self.inflight -= 1

    @defer.inlineCallbacks
    def send(self, dev, note):
        """POST it; on a failed connection or 503, again with the same apns-id (as an app
        server does), for up to 20 s."""
        headers = Headers({
            "authorization": [f"bearer {self.key}"],
            "apns-topic": [TOPIC],
            "apns-id": [note.apns_id],
            "apns-expiration": [str(note.expiry)],
        })
        body = json.dumps({"aps": {"alert": f"#{note.n}"}, "n": note.n}).encode()
        url = f"https://localhost:{self.provider_port}/3/device/{dev.token}".encode()
        deadline = note.sent + 20
        while True:
            try:
                d = self.agent.request(b"POST", url, headers, FileBodyProducer(BytesIO(body)))
                d.addTimeout(5, reactor)
                resp = yield d
                yield readBody(resp)
                note.status = resp.code
                if resp.code == 200:
                    note.accepted = True
                    self.rows[note.label].accepted += 1
                    return
                if resp.code != 503:
                    return
            except Exception:
                pass
            if time.time() > deadline or self.stopping:
                return
            yield sleep(0.3)

    # --- faults ---------------------------------------------------------------------------

    def _kind_cycle(self):
        """Link faults in shuffled rounds, so every kind comes up early and evenly."""
        while True:
            kinds = list(LINK_FAULTS)
            self.rng.shuffle(kinds)
            yield from kinds

    def kinds(self):
        """The faults this run injects (no clock jump without libfaketime)."""
        return [k for k in FAULTS if not (k == "clock-jump" and not self.libfaketime)
                and not (k == "gateway-kill" and not self.cfg.kills)]

    def all_happened(self):
        return all(self.rows[k].injected for k in self.kinds())

    def event(self, dev, kind, detail=""):
        self.rows[kind].injected += 1
        self.events.append((time.time() - self.t0, dev, kind, detail))
        self.say(f"{dev:8} {kind:12} {detail}")

    @defer.inlineCallbacks
    def wait_connected(self, dev, since_successes, timeout):
        """Until the device reports a connection newer than ``since_successes``, or timeout."""
        end = time.time() + timeout
        while time.time() < end:
            c = dev.status.get("courier", {})
            if c.get("stream connected") and c.get("successful connections", 0) > since_successes:
                return True
            yield sleep(0.25)
        return False

    @defer.inlineCallbacks
    def live_pipe(self, dev, timeout=5.0):
        end = time.time() + timeout
        while time.time() < end:
            pipe = dev.proxy.live()
            if pipe is not None and self.gateway_up:
                return pipe
            yield sleep(0.1)
        return None

    @defer.inlineCallbacks
    def device_faults(self, dev, until):
        rng = random.Random(self.rng.random())
        jump_next = dev.faketime is not None
        while True:
            yield sleep(rng.uniform(*self.cfg.gap))
            # Past the end only while some kind has not happened yet (a short run), and not long.
            if self.stopping or time.time() >= until and (self.all_happened() or time.time() >= until + 15):
                return
            pipe = yield self.live_pipe(dev)
            if pipe is None:
                continue
            kind = "clock-jump" if jump_next else next(self._kinds)
            if dev.faketime is not None:
                jump_next = not jump_next
            before = dev.status.get("courier", {}).get("successful connections", 0)
            dev.label = dev.last_fault = kind
            detail = ""
            if kind == "drop":
                pipe.close()
            elif kind == "reset":
                pipe.reset()
            elif kind == "blackhole":
                pipe.blackhole()
            elif kind == "delay":
                seconds = rng.uniform(0.5, 3.5)
                detail = f"{seconds:.1f} s"
                self.event(dev.name, kind, detail)
                yield pipe.delay(seconds)
            elif kind == "truncate":
                # From the device, it cuts an ack (or keepalive): the gateway sends the
                # notification again, and the device drops the duplicate.
                d = pipe.truncate(rng.choice(("device", "gateway")))
                d.addTimeout(5, reactor)
                try:
                    detail = yield d
                except defer.TimeoutError:
                    self.say(f"{dev.name:8} truncate     nothing flowed in 5 s; not counted")
                    dev.label = "none"
                    continue
            elif kind == "clock-jump":
                sign = -1 if dev.offset > 0 else 1
                new = sign * rng.randint(*JUMP)
                detail = f"device clock {dev.offset:+d} s -> {new:+d} s, then its connection dropped"
                dev.offset = new
                dev.faketime.write_text(f"{new:+d}\n")
                yield sleep(0.2)
                pipe.close()
            if kind != "delay":
                self.event(dev.name, kind, detail)
            if kind != "delay":
                ok = yield self.wait_connected(dev, before, 15)
                if not ok:
                    self.say(f"{dev.name:8} not connected again 15 s after {kind}")
            yield sleep(1.0)
            dev.label = "none"

    @defer.inlineCallbacks
    def gateway_kills(self, start, until):
        n = self.cfg.kills
        if not n:
            return
        span = (until - start) / n
        for k in range(n):
            at = start + span * k + self.rng.uniform(0.3, 0.7) * span
            yield sleep(max(0.0, at - time.time()))
            if self.stopping:
                return
            self.global_label = "gateway-kill"
            for dev in self.devices:
                dev.last_fault = "gateway-kill"
            before = {d.i: d.status.get("courier", {}).get("successful connections", 0) for d in self.devices}
            down = self.rng.uniform(1.0, 3.0)
            self.gateway_up = False
            self.event("gateway", "gateway-kill", f"SIGKILL, restarted on the same state after {down:.1f} s")
            yield self.gateway.kill(signal.SIGKILL)
            yield sleep(down)
            yield self.start_gateway()
            oks = yield defer.gatherResults([self.wait_connected(d, before[d.i], 20) for d in self.devices])
            if not all(oks):
                self.say("not every device connected again 20 s after the gateway restart")
            yield sleep(1.0)
            self.global_label = None

    @defer.inlineCallbacks
    def poll(self):
        """Each device's status report: connection state and duplicates dropped."""
        for dev in self.devices:
            if dev.app is None or dev.app.transport is None:
                continue
            try:
                report = yield dev.app.status().addTimeout(2, reactor)
            except Exception:
                continue
            dev.status = report
            dups = report["courier"]["duplicates dropped"]
            if dups > dev.dups:
                # Duplicates arrive when a connection comes back: the fault before is the cause.
                self.rows[self.global_label or dev.last_fault].dup_device += dups - dev.dups
                dev.dups = dups

    # --- the run -------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def run(self):
        cfg = self.cfg
        self._rr = 0
        self._counter = itertools.count(1)
        poller = task.LoopingCall(self.poll)
        poller.start(0.5)
        start = time.time()
        until = start + cfg.duration
        self.say(f"faults for {cfg.duration:.0f} s; {cfg.rate:g} notifications/s over {len(self.devices)} devices, "
                 f"{cfg.short_fraction:.0%} expiring within 2-5 s")
        sender = task.LoopingCall(self.send_tick)
        sender.start(1.0 / cfg.rate)
        work = [self.device_faults(d, until) for d in self.devices] + [self.gateway_kills(start, until)]
        yield defer.gatherResults(work, consumeErrors=True)
        sender.stop()
        self.say(f"faults over; settling (at most {cfg.settle:.0f} s)")
        end = time.time() + cfg.settle
        while time.time() < end:
            if self.inflight == 0 and not self.outstanding():
                break
            yield sleep(0.5)
        yield sleep(1.0)  # the last acks, and a last look at the duplicates counters
        yield poller.stop() if poller.running else None
        yield self.poll()
        return self.tally()

    def outstanding(self):
        now = time.time()
        return [n for n in self.notes if n.accepted and not n.delivered and n.expiry >= now]

    def tally(self):
        now = time.time()
        for note in self.notes:
            row = self.rows[note.label]
            if note.delivered:
                row.delivered += 1
            elif note.accepted:
                if note.expiry < now:
                    row.expired += 1
                else:
                    row.lost += 1
        return self.rows

    def table(self):
        cols = ("injected", "sent", "accepted", "delivered", "dup_device", "dup_app", "expired", "lost")
        head = ("fault", "injected", "sent", "accepted", "delivered", "dups dropped", "dups to app", "expired", "lost")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        total = Row()
        for name, row in self.rows.items():
            values = [getattr(row, c) for c in cols]
            for c, v in zip(cols, values):
                setattr(total, c, getattr(total, c) + v)
            shown = ["" if name == "none" and c == "injected" else str(v) for c, v in zip(cols, values)]
            lines.append(f"| {name} | " + " | ".join(shown) + " |")
        lines.append("| **total** | " + " | ".join(str(getattr(total, c)) for c in cols) + " |")
        return "\n".join(lines), total


@defer.inlineCallbacks
def run(cfg: Config, suite: Suite | None = None):
    """Run the suite; fire with (suite, total row). Everything started is stopped."""
    suite = suite or Suite(cfg)
    trigger = reactor.addSystemEventTrigger("before", "shutdown", _kill_groups)
    try:
        yield suite.setup()
        yield suite.run()
    finally:
        yield suite.teardown()
        reactor.removeSystemEventTrigger(trigger)
    text, total = suite.table()
    out = cfg.out
    print(f"\nseed {suite.seed}; {len(suite.devices)} devices; {cfg.duration:.0f} s of faults; "
          f"run took {time.time() - suite.t0:.0f} s\n", file=out)
    print(text, file=out)
    lost = [n for n in suite.notes if n.accepted and not n.delivered and n.expiry >= time.time()]
    if lost:
        print("\nlost: " + ", ".join(f"#{n.n} (dev{n.device}, {n.label})" for n in lost[:20]), file=out)
    out.flush()
    return suite, total


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=None, help="seed of every random choice (printed; random if not given)")
    p.add_argument("--devices", type=int, default=Config.devices, help="device daemons (the first one's clock jumps)")
    p.add_argument("--duration", type=float, default=Config.duration, help="seconds of faults")
    p.add_argument("--rate", type=float, default=Config.rate, help="notifications a second, over all devices")
    p.add_argument("--kills", type=int, default=Config.kills, help="gateway SIGKILLs")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs of every process)")
    a = p.parse_args(argv)
    if not 1 <= a.devices <= 20 or not 1 <= a.duration <= 600 or not 0 < a.rate <= 200:
        p.error("--devices 1..20, --duration 1..600 s, --rate up to 200")
    cfg = Config(devices=a.devices, duration=a.duration, rate=a.rate, seed=a.seed, kills=a.kills, keep=a.keep)
    suite = Suite(cfg)
    result = {}

    def go(_reactor):
        return run(cfg, suite).addCallback(lambda r: result.setdefault("r", r))

    try:
        task.react(go)
    except SystemExit as e:
        if e.code:
            _kill_groups()
            raise
    if "r" not in result:  # interrupted (Ctrl-C, SIGTERM): the processes are gone already
        _kill_groups()
        if not cfg.keep:
            shutil.rmtree(suite.dir, True)
        print("interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    suite, total = result["r"]
    missing = [k for k in suite.kinds() if suite.rows[k].injected == 0]
    if missing:
        print(f"faults that never happened: {', '.join(missing)}")
    return 1 if total.lost or missing else 0


if __name__ == "__main__":
    sys.exit(main())
