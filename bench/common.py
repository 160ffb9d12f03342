"""
What every benchmark scenario shares: the servers it starts (pushd gateways, Mosquitto,
Redis), the PKI and tokens they use, CPU pinning, RSS readings, and the guarantee that
every process started is stopped when the run ends, however it ends.

The gateway runs on CPU 1 and the load generator on CPU 0 (`SERVER_CPU`, `LOAD_CPUS`), so a
rate measured is a rate per core of the server.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


from pushd import tls  # noqa: E402
from pushd.gateway.tokens import TokenMinter  # noqa: E402

CPUS = sorted(os.sched_getaffinity(0))
SERVER_CPU = {CPUS[-1]}
LOAD_CPUS = set(CPUS[:-1]) or set(CPUS)
TOPIC = "com.example.bench"

_started: list[subprocess.Popen] = []


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def fd_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


def pin(cpus):
    def pre():
        raise_fd_limit()
        os.sched_setaffinity(0, cpus)

    return pre


def spawn(argv, *, cpus=None, log=None, env=None, cwd=None) -> subprocess.Popen:
    """Start a process in its own session, remembered so that `stop_all` ends it."""
    out = open(log, "ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen(
        argv,
        stdout=out,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=cwd,
        start_new_session=True,
        preexec_fn=pin(cpus or set(CPUS)),
    )
    _started.append(proc)
    return proc


def stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout=30.0):
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc in _started:
        _started.remove(proc)


def stop_together(procs, sig=signal.SIGTERM, timeout=30.0):
    """Signal them all first, then wait: a restart of several servers is one event."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
    for proc in procs:
        stop(proc, sig, timeout)


def stop_all():
    for proc in list(_started):
        stop(proc, timeout=10)


atexit.register(stop_all)


def _on_signal(signum, frame):
    stop_all()
    raise SystemExit(128 + signum)


signal.signal(signal.SIGTERM, _on_signal)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port: int, proc=None, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def rss_kib(pids) -> int:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def cpu_seconds(pids) -> float:
    """User + system CPU time of the processes so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / tick


def tree_pids(pid) -> list:
    """A process and all its descendants (a --workers supervisor and its workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def tmpdir(prefix="pushd-bench-") -> Path:
    # Short: AF_UNIX paths and long temp dirs do not mix.
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    atexit.register(shutil.rmtree, path, True)
    return path


def setup():
    """For a scenario's command line: the fd limit raised, a work dir, credentials in it."""
    raise_fd_limit()
    work = tmpdir()
    return work, Credentials(work / "state")


# --- PKI, tokens, provider credentials -----------------------------------------------------


class Credentials:
    """One gateway state dir (CA, token secret, provider key) shared by every gateway process."""

    def __init__(self, state: Path):
        self.state = state
        self.pki = tls.load_or_create_pki(state, ["localhost", "127.0.0.1"])
        self.minter = TokenMinter(tls.secret_file(state / "token.secret"))
        self.provider_key = (state / "provider.key").read_text().strip()
        self.server_pem = state.parent / "server-chain.pem"
        self.server_key = state.parent / "server.key"
        self.server_pem.write_bytes(tls.cert_pem(self.pki.server_cert) + tls.cert_pem(self.pki.ca_cert))
        self.server_key.write_bytes(tls.key_pem(self.pki.server_key))
        self.ca_key_pem = tls.key_pem(self.pki.ca_key)
        self.ca_cert_pem = tls.cert_pem(self.pki.ca_cert)
        #: The gateways' device registry: the fleet records the certificates it makes there
        #: (the gateway refuses certificates it did not record).
        self.registry = str(state / "devices.sqlite3")

    def device_token(self, device_id: str, topic: str = TOPIC) -> bytes:
        """The scoped token a device with this id would be given for the topic."""
        return self.minter.scoped_token(device_id, topic_hash(topic))


def topic_hash(topic: str = TOPIC) -> bytes:
    return hashlib.sha1(topic.encode()).digest()


def device_id(i: int) -> str:
    return f"b0{i:030x}"  # 32 hex digits, as the gateway requires


def device_cert(ca_key, ca_cert, public_key, i: int):
    """Device number i's certificate, issued by the bench CA with a known device id."""
    return tls.issue_device_cert(ca_key, ca_cert, public_key, device_id(i))


def register_devices(registry: str, certs, timeout: float = 120.0) -> None:
    """Record the fleet's certificates in the gateways' registry, as enrolment would; workers
    do this at once, so a locked database is waited for."""
    import sqlite3

    from pushd.gateway.registry import DeviceRegistry

    deadline = time.monotonic() + timeout
    while True:
        try:
            reg = DeviceRegistry(Path(registry))
            try:
                reg.record_certs(certs, "bench")
            finally:
                reg.close()
            return
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# --- servers -------------------------------------------------------------------------------


class _Server:
    proc: subprocess.Popen | None = None

    def stop(self, sig=signal.SIGTERM):
        if self.proc is not None:
            stop(self.proc, sig)

    @property
    def pid(self):
        return self.proc.pid


class Gateway(_Server):
    """One pushd gateway process (twistd), its courier and provider ports."""

    def __init__(self, creds: Credentials, work: Path, *, store="memory", name="gw", cpus=None, args=()):
        self.courier_port = free_port()
        self.provider_port = free_port()
        self.log = work / f"{name}.log"
        self.creds, self.work, self.store, self.name = creds, work, store, name
        self.cpus = cpus or SERVER_CPU
        self.args = list(args)
        self.proc = None

    def start(self, timeout=60.0, wait=True):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        argv = [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
            "-l", str(self.log), "pushd-gateway", "-d", str(self.creds.state), "--store", self.store,
            "--courier", f"tls:{self.courier_port}:interface=127.0.0.1:backlog=4096",
            "--provider", f"tls:{self.provider_port}:interface=127.0.0.1:backlog=1024",
            "--token-rate", "100000", "--token-burst", "100000",
            "--team-rate", "10000000", "--team-burst", "10000000",
            # The load comes from a few loopback addresses at rates no one address would
            # reach on the internet: the admission and HTTP/2 limits are not what is measured
            # here (bench/abuse.py measures them, on the defaults).
            "--max-connections", "250000", "--max-per-address", "250000",
            "--provider-max-connections", "10000", "--provider-max-per-address", "10000",
            "--connect-rate", "1000000", "--connect-burst", "1000000",
            "--replay-cache-size", "2000000",
            "--h2-requests-per-second", "10000000", "--h2-control-frames-per-second", "10000000",
            *self.args,
        ]
        self.proc = spawn(argv, cpus=self.cpus, env=env, cwd=self.work)
        if wait:
            self.ready(timeout)
        return self

    def ready(self, timeout=60.0):
        wait_port(self.provider_port, self.proc, timeout)
        wait_port(self.courier_port, self.proc, timeout)
        workers = int(self.args[self.args.index("--workers") + 1]) if "--workers" in self.args else 1
        if workers > 1:
            # One worker listening is enough for wait_port; wait for all N (each opens the
            # ports itself with SO_REUSEPORT), then for them to finish starting.
            deadline = time.monotonic() + timeout
            while len(self.pids) < workers + 1 and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(2.0)
        return self

    @property
    def pids(self):
        """The gateway's processes: itself, or a supervisor and its workers."""
        return tree_pids(self.proc.pid)


class Mosquitto(_Server):
    def __init__(self, creds: Credentials, work: Path, *, name="mq", cpus=None, persistence=False):
        self.port = free_port()
        self.creds, self.work, self.name = creds, work, name
        self.cpus = cpus or SERVER_CPU
        self.persistence = persistence
        self.proc = None

    def start(self, wait=True):
        conf = self.work / f"{self.name}.conf"
        store = self.work / f"{self.name}-db"
        store.mkdir(exist_ok=True)
        conf.write_text(
            f"listener {self.port} 127.0.0.1\ncertfile {self.creds.server_pem}\nkeyfile {self.creds.server_key}\n"
            f"allow_anonymous true\nmax_connections -1\nmax_queued_messages 100000\n"
            f"persistence {'true' if self.persistence else 'false'}\npersistence_location {store}/\n"
            f"log_dest file {self.work / (self.name + '.log')}\nlog_type error\nlog_type warning\n"
            # Started as root here: stay root, or it cannot read its files in our private temp dir.
            + ("user root\n" if os.geteuid() == 0 else "")
        )
        self.proc = spawn([shutil.which("mosquitto"), "-c", str(conf)], cpus=self.cpus)
        if wait:
            self.ready()
        return self

    def ready(self, timeout=30.0):
        wait_port(self.port, self.proc, timeout)


class Redis:
    def __init__(self, work: Path, cpus=None):
        self.port = free_port()
        # A directory of its own: a Redis started later must not load this one's AOF.
        self.work = work / f"redis-{self.port}"
        self.work.mkdir()
        self.cpus = cpus or SERVER_CPU
        self.proc = None

    def start(self):
        self.proc = spawn(
            [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(self.work)],
            cpus=self.cpus,
        )
        wait_port(self.port, self.proc)
        return self

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self):
        if self.proc is not None:
            stop(self.proc)
