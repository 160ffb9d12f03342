"""
Floods against a gateway on its default settings while an honest device gets a push every
second; what each flood costs the gateway and the honest device, against issue 10's targets.

    python -m bench.abuse                  # every flood, from one address and from many (~10 min)
    python -m bench.abuse --quick          # small counts and 5 s floods (~3 min), to /tmp
    python -m bench.abuse --only trickle,h2 --from many --connections trickle=2000

The gateway is a real `twistd pushd-gateway` with its own state dir, free loopback ports and
no option changed (SQLite store), restarted before every flood so that each starts from the
same place; `--gateway-arg` passes options to it (a hardened gateway's, for comparison).
The honest side is a real `twistd pushd-device` (enrolled through the gateway), an app
(`pushctl listen`) and a provider sending one push a second over HTTP/2 with the provider
key (bench/h2send.py); every push carries its send time, so the app's output gives its
latency. A TLS handshake to each port every second checks that new honest connections
still get in. Floods run in one process on the load generator's core (bench/floods.py).

Per flood: gateway RSS before / peak / after (after: `--settle` s after the flood closed
its connections), connections held, gateway fds and CPU, honest push p50/p99 during the
flood against the baseline measured first, EMFILE in the gateway log, gateway log lines.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import re
import shlex
import ssl
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench import common, floods, h2send

TOPIC = "com.example.abuse"
DEFAULT_OUT = common.ROOT / "docs" / "security-abuse.md"
QUICK_OUT = Path("/tmp/pushd-abuse-quick.md")
#: The run against the gateway before issue 10's limits: the "before" column of later runs.
BEFORE = common.ROOT / "docs" / "security-abuse-before.json"
#: The gateway's soft fd limit. The shipped unit says 20,000, as does this machine; the
#: floods' default counts stay far below the load generator's own 20,000, so the gateway
#: gets fewer, for a flood to be able to reach its limit (no cap: EMFILE).
GATEWAY_NOFILE = 4096
#: Targets from issue 10.
MAX_KIB_PER_CONNECTION = 64
MAX_P99_FACTOR = 5

ORDER = ["h2", "hpack", "trickle", "slowloris", "rapid-reset", "connections", "enrol"]
FULL = {"baseline": 30.0, "duration": 22.0, "pre": 3.0, "settle": 8.0,
        # HTTP/2 lasts past the gateway's 60 s --idle-timeout: do PINGs keep it open?
        "durations": {"h2": 70.0},
        "connections": {"h2": 16, "hpack": 200, "trickle": 5000, "slowloris": 5000, "rapid-reset": 4,
                        "connections": 5000, "enrol": 8},
        "replays": 200}
QUICK = {"baseline": 10.0, "duration": 5.0, "pre": 1.5, "settle": 2.0, "durations": {},
         "connections": {"h2": 6, "hpack": 40, "trickle": 1500, "slowloris": 1500, "rapid-reset": 2,
                         "connections": 1500, "enrol": 4},
         "replays": 50}

WHAT = {
    "h2": "HTTP/2, no authorization: up to 1,000 streams per connection, each a 32 KiB body "
          "without END_STREAM; a PING every 5 s",
    "hpack": "one ~1 MiB Huffman-coded header block per connection (HEADERS + 61 CONTINUATIONs), "
             "a different one each time; the gateway decodes it, then refuses it",
    "trickle": "courier: a frame header declaring 32,768 bytes, 32,000 of them at once, then "
               "1 byte every 5 s",
    "slowloris": "provider port, HTTP/1.1: request line and headers, then 1 header byte every 5 s",
    "rapid-reset": "HTTP/2 HEADERS (a whole request, no authorization) + RST_STREAM, in a loop, "
                   "on all its connections at once (opened first, up to 3 s), re-dialled as they are closed",
    "connections": "half TCP connects that send nothing, half a TLS ClientHello and nothing more; "
                   "both ports",
    "enrol": "keep-alive connections POSTing enrolments with a wrong MAC as fast as answered, "
             "plus one captured valid request replayed",
}


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(math.ceil(p / 100 * len(xs))) - 1)] if xs else None


# --- the gateway under test ---------------------------------------------------------------------


class Gateway:
    """`twistd pushd-gateway` with nothing but its state dir and loopback ports given."""

    def __init__(self, work: Path, nofile: int, args=()):
        self.work = work
        self.state = work / "gateway"
        self.courier_port = common.free_port()
        self.provider_port = common.free_port()
        self.nofile = nofile
        self.args = list(args)
        self.proc = None
        self.log = None
        self.runs = 0

    def start(self, name: str):
        self.runs += 1
        self.log = self.work / f"gw-{self.runs:02d}-{name}.log"
        boot = (f"import resource; resource.setrlimit(resource.RLIMIT_NOFILE, ({self.nofile}, "
                "resource.getrlimit(resource.RLIMIT_NOFILE)[1])); from twisted.scripts.twistd import run; run()")
        argv = [sys.executable, "-c", boot, "-n", "--pidfile=", "-l", str(self.log), "pushd-gateway",
                "-d", str(self.state),
                "--courier", f"tls:{self.courier_port}:interface=127.0.0.1",
                "--provider", f"tls:{self.provider_port}:interface=127.0.0.1", *self.args]
        self.proc = common.spawn(argv, cpus=common.SERVER_CPU, env=dict(os.environ, PYTHONPATH=str(common.ROOT)),
                                 cwd=self.work)
        common.wait_port(self.provider_port, self.proc, 60)
        common.wait_port(self.courier_port, self.proc, 60)
        return self

    def stop(self):
        if self.proc is not None:
            common.stop(self.proc, timeout=10)
            self.proc = None

    def log_text(self) -> str:
        """This run's log, with the parts twistd rotated away (every 1 MB: LOG.1, LOG.2, ...)."""
        parts = sorted(self.log.parent.glob(self.log.name + ".*"), key=lambda p: -int(p.suffix[1:]))
        return "".join(p.read_text(errors="replace") for p in [*parts, self.log] if p.exists())

    @property
    def pid(self):
        return self.proc.pid

    def command(self) -> str:
        return shlex.join(["twistd", "-n", "pushd-gateway", "-d", "STATE", "--courier", "tls:PORT:interface=127.0.0.1",
                           "--provider", "tls:PORT:interface=127.0.0.1", *self.args])


class Sampler(threading.Thread):
    """The gateway's RSS, open fds and CPU time, twice a second."""

    def __init__(self):
        super().__init__(daemon=True)
        self.pid = None
        self.samples: list = []  # (time, rss KiB, fds, cpu s)
        self.running = True

    def run(self):
        while self.running:
            pid = self.pid
            if pid is not None:
                try:
                    self.samples.append((time.time(), common.rss_kib([pid]), len(os.listdir(f"/proc/{pid}/fd")),
                                         common.cpu_seconds([pid])))
                except (OSError, ValueError):
                    pass
            time.sleep(0.5)

    def between(self, t0, t1):
        return [s for s in self.samples if t0 <= s[0] <= t1]


# --- the honest side ----------------------------------------------------------------------------


class Honest:
    """A real device daemon and app, a provider pushing once a second, and new-connection probes."""

    def __init__(self, work: Path, gw: Gateway):
        self.work, self.gw = work, gw
        self.state = work / "device"
        self.device_log = work / "device.log"
        self.device = self.app = None
        self.token = None
        self.received: list = []  # (arrival time, send time)
        self.probes: list = []  # (time, which, ok, seconds)
        self.probing = True

    def start(self):
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
                "-l", str(self.device_log), "pushd-device", "-d", str(self.state),
                "--transport", f"tls:127.0.0.1:{self.gw.courier_port}", "--tls-name", "localhost",
                "--enrol-url", f"https://127.0.0.1:{self.gw.provider_port}",
                "--enrol-secret-file", str(self.gw.state / "enrol.secret"), "--max-delay", "1"]
        self.device = common.spawn(argv, env=dict(os.environ, PYTHONPATH=str(common.ROOT)), cwd=self.work)
        self.wait_connected(0)
        sock = self.state / "pushd.sock"
        self.app = subprocess.Popen([sys.executable, "-m", "pushd.ctl", "listen", "--socket", str(sock), TOPIC],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                    env=dict(os.environ, PYTHONPATH=str(common.ROOT), PYTHONUNBUFFERED="1"),
                                    cwd=self.work)
        atexit.register(common.stop, self.app, timeout=5)
        line = self.app.stderr.readline().decode()
        m = re.match(r"token ([0-9a-f]{64})", line)
        if not m:
            raise RuntimeError(f"pushctl listen said {line!r}")
        self.token = m.group(1)
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._probe, daemon=True).start()

    def connections(self) -> int:
        try:
            return self.device_log.read_text(errors="replace").count("connected as device")
        except FileNotFoundError:
            return 0

    def wait_connected(self, before: int, timeout=60.0):
        deadline = time.monotonic() + timeout
        while self.connections() <= before:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the honest device did not connect; see {self.device_log}")
            if self.device.poll() is not None:
                raise RuntimeError(f"the honest device exited; see {self.device_log}")
            time.sleep(0.1)

    def _read(self):
        for raw in self.app.stdout:
            now = time.time()
            try:
                self.received.append((now, float(json.loads(raw)["t"])))
            except (ValueError, KeyError, TypeError):
                pass

    def _probe(self):
        ctxs = {"courier": floods.client_context(["apns-security-v3"]), "provider": floods.client_context(["h2"])}
        while self.probing:
            t0 = time.time()
            for which, port in (("courier", self.gw.courier_port), ("provider", self.gw.provider_port)):
                start = time.monotonic()
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                        with ctxs[which].wrap_socket(raw, server_hostname="localhost"):
                            ok = True
                except (OSError, ssl.SSLError):
                    ok = False
                self.probes.append((t0, which, ok, time.monotonic() - start))
            time.sleep(max(0.0, 1.0 - (time.time() - t0)))

    def pushes(self, seconds: float, rate: float) -> dict:
        """Push at `rate` for `seconds` over one HTTP/2 connection (runs in its own process)."""
        key = (self.gw.state / "provider.key").read_text().strip()
        return h2send.run_in_process(port=self.gw.provider_port, authorization=f"bearer {key}",
                                     tokens=[self.token], topic=TOPIC, rate=rate, duration=seconds, connections=1)

    def window(self, t0, t1) -> dict:
        lat = [(arr - sent) * 1000 for arr, sent in self.received if t0 <= sent < t1]
        probes = [p for p in self.probes if t0 <= p[0] < t1]
        return {"delivered": len(lat), "p50_ms": _r(pct(lat, 50)), "p99_ms": _r(pct(lat, 99)),
                "max_ms": _r(max(lat) if lat else None),
                "probes": len(probes), "probes_ok": sum(1 for p in probes if p[2]),
                "probe_p99_ms": _r(pct([p[3] * 1000 for p in probes if p[2]], 99))}

    def stop(self):
        self.probing = False
        if self.app is not None:
            common.stop(self.app, timeout=5)
        if self.device is not None:
            common.stop(self.device, timeout=10)


def _r(x, nd=1):
    return None if x is None else round(x, nd)


# --- one flood ----------------------------------------------------------------------------------


def capture_enrolment(gw: Gateway, work: Path) -> str:
    """A valid enrolment request, as pushd's own device code sends it (then replayed)."""
    import urllib.request

    from pushd.device import identity

    seen = []
    real = urllib.request.urlopen

    def spy(req, *a, **kw):
        seen.append(req.data)
        return real(req, *a, **kw)

    urllib.request.urlopen = spy
    try:
        identity.enrol(f"https://127.0.0.1:{gw.provider_port}", common.tls.secret_file(gw.state / "enrol.secret"),
                       work / "captured-device")
    finally:
        urllib.request.urlopen = real
    return seen[0].decode()


def run_one(name, flood, mode, params, gw, honest, sampler, rate, enrol_body) -> dict:
    """Restart the gateway, let the device reconnect, push through pre + flood + settle."""
    gw.stop()
    before_conns = honest.connections()
    gw.start(f"{flood or 'baseline'}-{mode or ''}")
    sampler.pid = gw.pid
    try:
        honest.wait_connected(before_conns)
    except RuntimeError as e:  # measured all the same: its pushes will show as lost
        log(f"{e}; going on")
    connections_before = honest.connections()
    duration = params["baseline"] if flood is None else params["durations"].get(flood, params["duration"])
    pre, settle = params["pre"], params["settle"]
    pushed = {}
    pusher = threading.Thread(target=lambda: pushed.update(honest.pushes(pre + duration + settle, rate)), daemon=True)
    pusher.start()
    run_t0 = time.time()
    time.sleep(pre + 1.0)  # h2send's own start-up is about a second
    t_start = time.time()
    result = {}
    if flood is not None:
        n = params["connections"][flood]
        spec = {"flood": flood, "mode": mode, "connections": n, "duration": duration,
                "courier_port": gw.courier_port, "provider_port": gw.provider_port,
                "enrol_body": enrol_body, "replays": params["replays"]}
        log(f"flood {flood} from {mode} address(es): {n} connections, {duration:g} s")
        result = floods.run_in_process(spec, cpus=common.LOAD_CPUS)
        if "error" in result:
            log(f"flood {flood} failed: {result['error']}")
    else:
        log(f"baseline: {duration:g} s of honest pushes, no flood")
        time.sleep(duration)
    t_end = time.time()
    if result.get("started"):  # the flood's own window, without its process start-up
        t_start, t_end = result["started"], result["ended"]
    time.sleep(settle)
    t_after = time.time()
    pusher.join(pre + duration + settle + 60)
    samples_before = sampler.between(t_start - pre, t_start)
    during = sampler.between(t_start, t_end)
    after = sampler.between(t_after - 1.5, t_after + 0.5) or sampler.samples[-1:]
    text = gw.log_text()
    cpu = None
    if during and samples_before:
        cpu = _r((during[-1][3] - samples_before[-1][3]) / max(1e-3, during[-1][0] - samples_before[-1][0]) * 100, 0)
    row = {
        "flood": flood or "baseline", "from": mode, "seconds": duration,
        "connections_asked": params["connections"].get(flood) if flood else None,
        "rss_before_kib": int(statistics.median(s[1] for s in samples_before)) if samples_before else None,
        "rss_peak_kib": max((s[1] for s in during), default=None),
        "rss_after_kib": after[-1][1] if after else None,
        "fds_before": samples_before[-1][2] if samples_before else None,
        "fds_peak": max((s[2] for s in during), default=None),
        "gateway_cpu_pct": cpu,
        "emfile_lines": sum(1 for line in text.splitlines() if "EMFILE" in line or "Too many open files" in line),
        "log_lines": text.count("\n"),
        "device_reconnects": honest.connections() - connections_before,
        "honest": honest.window(t_start, t_end),
        "pushes": {k: pushed.get(k) for k in ("sent", "answered", "statuses")},
        "flood_result": {k: v for k, v in result.items() if k != "timeline"},
    }
    # Over the whole run (before, during, after the flood): accepted by the gateway, and
    # of those, how many the app never printed.
    statuses = {str(k): v for k, v in (pushed.get("statuses") or {}).items()}
    accepted = statuses.get("200", 0)
    row["pushes_accepted"] = accepted
    row["pushes_refused"] = sum(v for k, v in statuses.items() if k != "200") + max(
        0, int((pre + duration + settle) * rate) - (pushed.get("sent") or 0))
    row["pushes_lost"] = max(0, accepted - sum(1 for _, sent in honest.received if run_t0 <= sent))
    if flood and flood != "enrol":  # enrolment holds no connection open to speak of
        peak = max(1, result.get("held_peak") or 0)
        divisor = max(1, result.get("opened") or 0) if flood == "hpack" else peak
        if row["rss_peak_kib"] and row["rss_before_kib"]:
            row["kib_per_connection"] = _r((row["rss_peak_kib"] - row["rss_before_kib"]) / divisor, 1)
    began = (result.get("counters") or {}).get("resets_began")
    held = (result.get("counters") or {}).get("held_before_resets")
    if began and held and row["rss_before_kib"]:
        # RSS with the connections open and not yet resetting: what they hold as such, apart
        # from what parsing the resets grows the heap by.
        at = [s for s in sampler.samples if t_start <= s[0] <= began]
        if at:
            row["rss_held_kib"] = at[-1][1]
            row["kib_per_connection_held"] = _r((at[-1][1] - row["rss_before_kib"]) / held, 1)
    log(json.dumps({k: row[k] for k in ("flood", "from", "rss_before_kib", "rss_peak_kib", "rss_after_kib",
                                         "fds_peak", "gateway_cpu_pct", "emfile_lines", "honest")}))
    if flood:
        log(json.dumps(row["flood_result"]))
    return row


# --- the report ---------------------------------------------------------------------------------


def mib(kib):
    return "–" if kib is None else f"{kib / 1024:.0f}"


def verdict(row, base) -> str:
    misses = []
    if row.get("kib_per_connection") is not None and row["kib_per_connection"] > MAX_KIB_PER_CONNECTION:
        misses.append("memory")
    h, b = row["honest"], base["honest"]
    if row["pushes_lost"] or row["pushes_refused"]:
        misses.append("pushes lost or refused")
    if h["p99_ms"] is None or (b["p99_ms"] and h["p99_ms"] > MAX_P99_FACTOR * b["p99_ms"]):
        misses.append("p99")
    if row["emfile_lines"]:
        misses.append("EMFILE")
    return "**misses: " + ", ".join(misses) + "**" if misses else "meets"


def note(row) -> str:
    r = row["flood_result"]
    if "error" in r:
        return f"flood failed: {r['error']}"
    c = r.get("counters", {})
    goaway = ", ".join(f"{k[7:]} ×{v}" for k, v in c.items() if k.startswith("goaway:"))
    parts = []
    f = row["flood"]
    if f == "h2":
        parts.append(f"{c.get('streams', 0)} streams, {c.get('body_bytes', 0) / 2**20:.0f} MiB of bodies taken, "
                     f"{c.get('pings', 0)} PINGs")
        parts.append(f"{r['held_end']} of {r['opened']} still open after {row['seconds']:g} s")
    elif f == "hpack":
        parts.append(f"{c.get('blocks', 0)} blocks of {c.get('block_bytes', 0) / 2**20:.2f} MiB; "
                     f"retained after: {_per(row, 'rss_after_kib', c.get('blocks'))} KiB per block")
    elif f in ("trickle", "slowloris"):
        parts.append(f"{c.get('trickled_bytes', 0)} bytes trickled; {r['closed_by_gateway']} closed by the gateway")
    elif f == "rapid-reset":
        secs = row["seconds"]
        held = c.get("held_before_resets", 0)
        if row.get("rss_held_kib") is not None:
            held = (f"{held} connections open when the resets began (gateway RSS then {mib(row['rss_held_kib'])} MiB, "
                    f"{row['kib_per_connection_held']} KiB per connection)")
        else:
            held = f"{held} connections open when the resets began"
        parts.append(f"{held}; "
                     f"{c.get('requests', 0)} requests sent ({c.get('requests', 0) / secs:.0f}/s), "
                     f"{c.get('answers', 0)} answered")
    elif f == "connections":
        parts.append(f"{c.get('client_hellos', 0)} ClientHellos; {r['closed_by_gateway']} closed by the gateway")
    elif f == "enrol":
        bad = ", ".join(f"{k[8:]} ×{v}" for k, v in sorted(c.items()) if k.startswith("bad_mac:"))
        rep = ", ".join(f"{k[7:]} ×{v}" for k, v in sorted(c.items()) if k.startswith("replay:"))
        parts.append(f"bad MAC: {bad or 'none answered'}; replayed valid request: {rep or 'none answered'}")
    parts.append(f"GOAWAY: {goaway}" if goaway else "no GOAWAY")
    if c.get("redials"):
        parts.append(f"{c['redials']} re-dials")
    if row.get("device_reconnects"):
        parts.append(f"the honest device reconnected {row['device_reconnects']}×")
    if r.get("failed"):
        parts.append(f"{r['failed']} connects failed ({', '.join(f'{k} ×{v}' for k, v in r['failures'].items())})")
    return "; ".join(parts)


def _per(row, key, n):
    if not n or row.get(key) is None or row.get("rss_before_kib") is None:
        return "–"
    return f"{(row[key] - row['rss_before_kib']) / n:.0f}"


def compare(results, before) -> list:
    """Key numbers of an earlier run (the gateway before hardening) beside this one's."""
    old = {(r["flood"], r["from"]): r for r in before["rows"]}

    def held(r):
        return r["flood_result"].get("held_peak", "–")

    def p99(r):
        return r["honest"]["p99_ms"]

    def kib(r):
        k = r.get("kib_per_connection")
        return "–" if k is None else f"{k:.0f}"

    ob, nb = before["baseline"]["honest"], results["baseline"]["honest"]
    lines = ["", f"Before → now: the {before['mode']}-mode run of {before['date']} (pushd at {before.get('commit', '?')}"
                 + (f", {before['label']}" if before.get("label") else "") + ") beside this one. Baseline honest "
                 f"p99: {ob['p99_ms']} → {nb['p99_ms']} ms.", "",
             "| flood | from | held peak | gateway RSS peak MiB | KiB per conn | honest p99 ms | new honest TLS ok "
             "| EMFILE lines | gateway log lines |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        o = old.get((r["flood"], r["from"]))
        if o is None:
            continue
        lines.append(
            f"| {r['flood']} | {r['from']} | {held(o)} → {held(r)} | {mib(o['rss_peak_kib'])} → {mib(r['rss_peak_kib'])} "
            f"| {kib(o)} → {kib(r)} | {p99(o)} → {p99(r)} | {o['honest']['probes_ok']}/{o['honest']['probes']} → "
            f"{r['honest']['probes_ok']}/{r['honest']['probes']} | {o['emfile_lines']} → {r['emfile_lines']} "
            f"| {o['log_lines']} → {r['log_lines']} |")
    return lines


def write_report(results, out: Path, before=None):
    base = results["baseline"]
    b = base["honest"]
    title = "## Floods against a gateway on its defaults (bench/abuse.py)"
    lines = [
        title + (f": {results['label']}" if results.get("label") else ""),
        "",
        f"`{results['command']}` on {results['date']}, pushd at {results.get('commit', '?')} "
        f"({results['mode']} mode, {results['total_seconds']} s; "
        f"{results['machine']}). Gateway: `{results['gateway_command']}` (SQLite store), restarted before "
        f"each flood, soft fd limit {results['gateway_nofile']}, on its own core; the floods run in one process "
        "on the other. Honest side: a real `pushd-device` and `pushctl listen`, one push a second over HTTP/2 "
        "(provider key) from 127.0.0.1, and a TLS handshake to each port every second; floods come from "
        f"{floods.ONE_ADDRESS} (\"one\") or a different 127.x.y.z per connection (\"many\").",
        "",
        f"Baseline (no flood, {base['seconds']:g} s): honest push p50 {b['p50_ms']} ms, p99 {b['p99_ms']} ms; "
        f"gateway RSS {mib(base['rss_before_kib'])} MiB (it moved {_noise(base)} KiB with no flood: the noise "
        f"under every RSS figure), {base['fds_before']} fds. Targets (issue 10): at most "
        f"{MAX_KIB_PER_CONNECTION} KiB of gateway memory per unauthenticated connection, total bounded by the caps, "
        f"honest p99 within {MAX_P99_FACTOR}× the baseline ({MAX_P99_FACTOR * (b['p99_ms'] or 0):.0f} ms), "
        "no EMFILE.",
        "",
        "| flood | from | s | conns opened / held peak / held at end | gateway RSS MiB before / peak / after "
        "| KiB per conn | gateway fds peak | gateway CPU % | honest p50 / p99 ms | honest pushes lost / refused | "
        "new honest TLS ok | EMFILE lines | gateway log lines | targets |",
        "|---|---|--:|---|---|--:|--:|--:|---|---|---|--:|--:|---|",
    ]
    for row in results["rows"]:
        r, h = row["flood_result"], row["honest"]
        kib = row.get("kib_per_connection")
        lines.append(
            f"| {row['flood']} | {row['from']} | {row['seconds']:g} | {r.get('opened', '–')} / {r.get('held_peak', '–')}"
            f" / {r.get('held_end', '–')} | {mib(row['rss_before_kib'])} / {mib(row['rss_peak_kib'])} / "
            f"{mib(row['rss_after_kib'])} | {'–' if kib is None else f'{kib:.0f}'} | {row['fds_peak']} | "
            f"{row['gateway_cpu_pct']} | {h['p50_ms']} / {h['p99_ms']} | {row['pushes_lost']} / {row['pushes_refused']} | "
            f"{h['probes_ok']}/{h['probes']} | {row['emfile_lines']} | {row['log_lines']} | {verdict(row, base)} |")
    if before:
        lines += compare(results, before)
    lines += ["", "What each flood sends, and what it saw (counts from the attacker's side):", ""]
    for flood in ORDER:
        rows = [r for r in results["rows"] if r["flood"] == flood]
        if not rows:
            continue
        lines.append(f"- **{flood}**: {WHAT[flood]}.")
        for row in rows:
            lines.append(f"  - from {row['from']}: {note(row)}.")
    lines += [
        "",
        "KiB per conn: (peak RSS − RSS before) ÷ connections held at the peak (for hpack: ÷ blocks sent, "
        "the connections being one after the other; rapid-reset opens all its connections before the resets "
        "begin, so the peak holds them together, each mid-flood); the baseline's RSS movement with no flood "
        "is the noise under it. Honest latency is send (provider) to print (app), "
        "over the pushes sent during the flood; lost: answered 200 but never printed, refused: not "
        "answered 200 (or never sent: the provider's connection was gone), both over the whole run "
        "(before, during and after the flood). \"new honest TLS ok\": handshakes "
        "from 127.0.0.1 to the courier and provider ports that completed within 5 s during the flood. "
        "Counts and durations are options (`python -m bench.abuse --help`); raw numbers are in "
        f"`{results['json_name']}` beside this file.",
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))


def _noise(base) -> str:
    """RSS peak − before in the baseline run: what the gateway's RSS moves by with no flood."""
    if base.get("rss_peak_kib") is None or base.get("rss_before_kib") is None:
        return "?"
    return f"{base['rss_peak_kib'] - base['rss_before_kib']:+d}"


def commit() -> str:
    """The gateway's code: the last commit that touched pushd/, '+' if it has uncommitted changes."""
    try:
        head = subprocess.run(["git", "-C", str(common.ROOT), "log", "-1", "--format=%h", "--", "pushd", "twisted"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(common.ROOT), "status", "--porcelain", "--untracked-files=no",
                                "pushd"], capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def parse_counts(text, ap):
    out = {}
    for item in filter(None, (text or "").split(",")):
        k, _, v = item.partition("=")
        if k not in ORDER or not v.isdigit() or int(v) < 1:
            ap.error(f"--connections wants FLOOD=N[,FLOOD=N] with FLOOD in {', '.join(ORDER)}; got {item!r}")
        out[k] = int(v)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small counts and short floods (~3 min)")
    ap.add_argument("--only", help=f"comma-separated floods out of {','.join(ORDER)}")
    ap.add_argument("--from", dest="modes", default="one,many", help="one, many or one,many [default: both]")
    ap.add_argument("--connections", help="per-flood counts, e.g. trickle=2000,h2=10 (hpack: blocks sent)")
    ap.add_argument("--duration", type=float, help="seconds per flood [default: 22, quick 5; h2 70 in full mode]")
    ap.add_argument("--baseline", type=float, help="seconds of honest pushes before any flood [default: 30, quick 10]")
    ap.add_argument("--settle", type=float, help="seconds after a flood before RSS 'after' [default: 8, quick 2]")
    ap.add_argument("--push-rate", type=float, default=1.0, help="honest pushes per second [default: 1]")
    ap.add_argument("--gateway-nofile", type=int, default=GATEWAY_NOFILE,
                    help=f"the gateway's soft fd limit [default: {GATEWAY_NOFILE}]")
    ap.add_argument("--gateway-arg", action="append", default=[], help="an option for the gateway (repeatable)")
    ap.add_argument("--label", help="a word on what was measured, for the report's title (e.g. 'before')")
    ap.add_argument("--before", type=Path, help="JSON of an earlier run, shown beside this one "
                                                f"[default: {BEFORE.relative_to(common.ROOT)} if it exists]")
    ap.add_argument("--report-only", type=Path, metavar="JSON", help="rebuild the report from a run's JSON")
    ap.add_argument("--out", type=Path, help=f"markdown report [default: {DEFAULT_OUT.relative_to(common.ROOT)}, "
                                             f"or {QUICK_OUT} with --quick]; JSON beside it")
    args = ap.parse_args(argv)
    only = args.only.split(",") if args.only else ORDER
    if set(only) - set(ORDER):
        ap.error(f"unknown flood(s) {', '.join(sorted(set(only) - set(ORDER)))}; choose from {', '.join(ORDER)}")
    modes = args.modes.split(",")
    if not modes or set(modes) - {"one", "many"}:
        ap.error("--from wants one, many or one,many")
    params = json.loads(json.dumps(QUICK if args.quick else FULL))
    params["connections"].update(parse_counts(args.connections, ap))
    if args.duration:
        params["duration"], params["durations"] = args.duration, {}
    if args.baseline:
        params["baseline"] = args.baseline
    if args.settle is not None:
        params["settle"] = args.settle
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    before_path = args.before or (BEFORE if BEFORE.exists() else None)
    before = json.loads(before_path.read_text()) if before_path else None
    if args.report_only:
        results = json.loads(args.report_only.read_text())
        if before is not None and before_path.resolve() == args.report_only.resolve():
            before = None
        results["json_name"] = args.report_only.name
        write_report(results, out, before)
        log(f"wrote {out}")
        return 0

    common.raise_fd_limit()
    work = common.tmpdir("pushd-abuse-")
    gw = Gateway(work, args.gateway_nofile, args.gateway_arg)
    sampler = Sampler()
    sampler.start()
    honest = Honest(work, gw)
    started = time.monotonic()
    rows = []
    try:
        gw.start("setup")
        honest.start()
        enrol_body = capture_enrolment(gw, work) if "enrol" in only else None
        base = run_one("baseline", None, None, params, gw, honest, sampler, args.push_rate, None)
        for flood in ORDER:
            if flood not in only:
                continue
            for mode in modes:
                rows.append(run_one(flood, flood, mode, params, gw, honest, sampler, args.push_rate, enrol_body))
    finally:
        honest.stop()
        gw.stop()
        sampler.running = False
        common.stop_all()
    machine = (f"{len(common.CPUS)} CPUs, "
               f"{next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name')), '?')}")
    results = {"command": " ".join(["python -m bench.abuse", shlex.join(sys.argv[1:] if argv is None else argv)]).strip(),
               "label": args.label, "commit": commit(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "mode": "quick" if args.quick else "full",
               "total_seconds": round(time.monotonic() - started), "machine": machine,
               "gateway_command": gw.command(), "gateway_nofile": args.gateway_nofile, "params": params,
               "baseline": base, "rows": rows, "json_name": out.with_suffix(".json").name}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    if before is not None and before_path.resolve() == out.with_suffix(".json").resolve():
        before = None
    write_report(results, out, before)
    log(f"wrote {out} ({results['total_seconds']} s)")
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
