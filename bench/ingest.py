#!/usr/bin/env python3
"""
Provider ingest: notifications accepted per second, and per second of the gateway's CPU
(= per core: the gateway is pinned to one CPU), durable before each 200.

h2load (nghttp2, pinned to the load CPUs) posts ``POST /3/device/<token>`` to one gateway
over HTTP/2 (ALPN h2, ``-c`` connections x ``-m`` streams) or HTTP/1.1 (``--h1``; h2load
sends one request at a time per connection when it posts a body), spread over ``devices``
device tokens so that neither the per-device queue (1000) nor the rate limits are the limit.
Auth is an ES256 provider JWT (a key registered for a team the way ``pushctl keys new``
does) or the operator's static key. The figures: h2load's succeeded/failed and req/s, the
status of every request (from h2load's per-request log), the gateway's CPU seconds during
the run, and afterwards what the store holds (SQLite rows or Redis's pending count),
which must equal the 200s.

    python bench/ingest.py                                   # h2, JWT, SQLite (synchronous=full)
    python bench/ingest.py --protocol h1 --auth static --duration 10
    python bench/ingest.py --store redis                     # starts its own redis-server
    python bench/ingest.py --store memory --clients 4 --streams 32

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import resource
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402

TEAM = "BENCHTEAM1"
KEY_ID = "BENCHKEY01"
PAYLOAD = b'{"aps":{"alert":"ingest benchmark"},"k":"0123456789abcdef"}'


def register_jwt_key(creds: common.Credentials, work: Path, key_id=KEY_ID, team=TEAM, topic=common.TOPIC) -> str:
    """As ``pushctl keys new``: an ES256 key, its public half registered in providers.json
    for a team allowed ``topic``; return a fresh JWT signed with it."""
    from cryptography.hazmat.primitives import serialization

    from pushd import tls
    from pushd.gateway.auth import ProviderKeys, make_jwt

    key = tls.new_key("ec")
    tls.write_private(work / f"AuthKey_{key_id}.p8", tls.key_pem(key))
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    path = creds.state / "providers.json"
    registry = ProviderKeys.load(path)
    registry.add_key(key_id, team, public, [topic])
    registry.save(path)
    return make_jwt(key, key_id, team)


def _h2load_summary(text: str) -> dict:
    out = {}
    m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", text)
    if m:
        out["elapsed_s"] = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
        out["req_per_s"] = float(m.group(3))
    m = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout",
        text,
    )
    if m:
        keys = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")
        out.update(zip(keys, map(int, m.groups())))
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if m:
        out["status_classes"] = dict(zip(("2xx", "3xx", "4xx", "5xx"), map(int, m.groups())))
    m = re.search(r"traffic: .*", text)
    if m:
        out["traffic"] = m.group(0)
    return out


def _log_stats(path: Path) -> tuple[dict, dict]:
    """Status counts and response-time percentiles (ms) from h2load's --log-file."""
    statuses: collections.Counter = collections.Counter()
    times = []
    if path.exists():
        with open(path) as f:
            for line in f:
                parts = line.split("\t")
                if len(parts) >= 3:
                    statuses[parts[1]] += 1
                    times.append(int(parts[2]))
    times.sort()

    def pct(p):
        return round(times[min(len(times) - 1, int(p / 100 * len(times)))] / 1000, 2) if times else None

    return dict(sorted(statuses.items())), {"p50": pct(50), "p99": pct(99), "p999": pct(99.9), "max": pct(100)}


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (all CPUs, /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _stored(store: str, db_path: Path | None, redis_url: str | None):
    """What the store holds after the gateway stopped (no device connected, nothing acked)."""
    if db_path is not None:
        db = sqlite3.connect(str(db_path))
        try:
            return db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        finally:
            db.close()
    if redis_url is not None:
        m = re.match(r"redis://([^:/]+):(\d+)/(\d+)", redis_url)
        out = subprocess.run(
            ["redis-cli", "-h", m.group(1), "-p", m.group(2), "-n", m.group(3), "GET", "pushd:pending"],
            capture_output=True, text=True, timeout=10,
        )
        return int(out.stdout.strip() or 0)
    return None  # memory: gone with the process


def run(creds, work, *, store="sqlite", protocol="h2", auth="jwt", duration=15.0, devices=10000, clients=8,
        streams=64, warmup=0.0, sqlite_synchronous="full", name=None, gateway_args=(), profile=None, cpus=None) -> dict:
    """One ingest run against a gateway of its own; returns the figures as a dict.

    store: "sqlite" (a fresh file under ``work``), "sqlite:PATH", "redis" (starts a
    redis-server of its own, appendfsync everysec), "redis://HOST:PORT/DB", or "memory".
    profile: a path: sample the gateway with py-spy during the run (collapsed stacks there;
    py-spy runs on the load CPUs and perturbs the figures a little).
    """
    work = Path(work)
    name = name or f"ingest-{protocol}-{auth}-{store.split(':')[0]}-{int(time.time() * 1000) % 10**8}"
    db_path = redis_url = None
    redis = None
    pids_extra = []
    if store == "sqlite":
        db_path = work / f"{name}.sqlite3"
        spec = f"sqlite:{db_path}"
    elif store.startswith("sqlite:"):
        db_path, spec = Path(store[len("sqlite:"):]), store
    elif store == "redis":
        redis = common.Redis(work).start()
        redis_url = spec = redis.url
        pids_extra.append(redis.proc.pid)
    elif store.startswith("redis://"):
        redis_url = spec = store
    elif store == "memory":
        spec = "memory"
    else:
        raise ValueError(f"unknown store {store!r}")
    stored_before = _stored(store, db_path, redis_url) if (db_path and db_path.exists()) or redis_url else 0

    if auth == "jwt":
        bearer = register_jwt_key(creds, work)
    elif auth == "static":
        bearer = creds.provider_key
    else:
        raise ValueError("auth is jwt or static")

    args = list(gateway_args)
    if spec.startswith("sqlite"):
        args += ["--sqlite-synchronous", sqlite_synchronous]
    gw = common.Gateway(creds, work, store=spec, name=name, args=args, cpus=cpus).start()
    try:
        base = f"https://127.0.0.1:{gw.provider_port}"
        uris = work / f"{name}.uris"
        with open(uris, "w") as f:
            for i in range(devices):
                f.write(f"{base}/3/device/{creds.device_token(common.device_id(i)).hex()}\n")
        body = work / f"{name}.json"
        body.write_bytes(PAYLOAD)
        log = work / f"{name}.h2load.tsv"
        argv = [
            "h2load", "-i", str(uris), "-d", str(body), "-c", str(clients), "-t", "1",
            "-D", f"{duration:g}",
            "-H", f"authorization: bearer {bearer}",
            "-H", f"apns-topic: {common.TOPIC}",
            "-H", "apns-push-type: alert",
            "-H", "content-type: application/json",
            "--log-file", str(log),
        ]
        if warmup:
            argv += ["--warm-up-time", f"{warmup:g}"]
        if protocol == "h1":
            argv += ["--h1", "-m", "1"]  # h2load pipelines nothing when it posts a body
        elif protocol == "h2":
            argv += ["-m", str(streams), "--npn-list", "h2"]
        else:
            raise ValueError("protocol is h2 or h1")

        spy = None
        if profile:
            spy_bin = Path(sys.executable).with_name("py-spy")
            spy = subprocess.Popen(
                [str(spy_bin) if spy_bin.exists() else "py-spy", "record", "-p", str(gw.pid), "-d",
                 str(max(1, int(duration - 1))), "-r", "200", "-f", "raw", "-o", str(profile), "--threads"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=common.pin(common.LOAD_CPUS))
        pids = gw.pids
        cpu0, extra0, t0 = common.cpu_seconds(pids), common.cpu_seconds(pids_extra), time.monotonic()
        busy0, kids0 = _busy_cpu_s(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(argv, capture_output=True, text=True, preexec_fn=common.pin(common.LOAD_CPUS),
                              timeout=duration + warmup + 60)
        wall = time.monotonic() - t0
        cpu = common.cpu_seconds(pids) - cpu0
        extra_cpu = common.cpu_seconds(pids_extra) - extra0
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        h2load_cpu = (kids.ru_utime + kids.ru_stime) - (kids0.ru_utime + kids0.ru_stime)
        # Anything else busy on the machine meanwhile (other jobs) makes the figures suspect.
        other_cpu = _busy_cpu_s() - busy0 - cpu - extra_cpu - h2load_cpu
        if spy is not None:
            spy.wait(timeout=30)
        summary = _h2load_summary(proc.stdout)
        if proc.returncode != 0 or "succeeded" not in summary:
            raise RuntimeError(f"h2load failed ({proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
        statuses, latency = _log_stats(log)
    finally:
        gw.stop()
        if redis is not None:
            # Let the AOF catch up (appendfsync everysec), then stop Redis cleanly.
            time.sleep(1.2)
    stored = _stored(store, db_path, redis_url)
    if redis is not None:
        redis.stop()

    ok = statuses.get("200", 0)
    # h2load's -D counts only what ended within the window; its log has every response.
    elapsed = summary.get("elapsed_s") or wall
    result = {
        "scenario": "ingest",
        "protocol": protocol,
        "auth": auth,
        "store": store if store != "sqlite" else f"sqlite (synchronous={sqlite_synchronous})",
        "duration_s": duration,
        "devices": devices,
        "clients": clients,
        "streams": streams if protocol == "h2" else 1,
        "h2load": {k: summary.get(k) for k in ("req_per_s", "elapsed_s", "total", "succeeded", "failed",
                                               "errored", "timeout", "status_classes")},
        "statuses": statuses,
        "non_200": sum(v for k, v in statuses.items() if k != "200"),
        "response_ms": latency,
        "accepted": ok,
        "accepted_per_s": round(ok / elapsed, 1),
        "gateway_cpu_s": round(cpu, 2),
        "gateway_cpu_util": round(cpu / wall, 3),
        "accepted_per_cpu_s": round(ok / cpu, 1) if cpu else None,
        "h2load_cpu_s": round(h2load_cpu, 2),
        "other_cpu_s": round(other_cpu, 2),
    }
    if pids_extra:
        result["redis_cpu_s"] = round(extra_cpu, 2)
        result["accepted_per_cpu_s_incl_redis"] = round(ok / (cpu + extra_cpu), 1) if cpu + extra_cpu else None
    answered_200 = max(ok, (summary.get("status_classes") or {}).get("2xx", 0))
    result["answered_2xx_incl_after_window"] = answered_200
    if stored is not None:
        # Every 200 must be in the store. A few more may be: requests in flight when h2load
        # stopped at the deadline, which the gateway still accepted (at most clients x streams).
        in_flight = clients * (streams if protocol == "h2" else 1)
        result["stored_after"] = stored - (stored_before or 0)
        result["durable_check"] = (
            "ok" if answered_200 <= result["stored_after"] <= answered_200 + in_flight else "MISMATCH"
        )
    else:
        result["durable_check"] = "n/a (memory store)"
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--protocol", choices=("h2", "h1"), default="h2")
    p.add_argument("--auth", choices=("jwt", "static"), default="jwt")
    p.add_argument("--store", default="sqlite", help="sqlite | sqlite:PATH | redis | redis://HOST:PORT/DB | memory")
    p.add_argument("--sqlite-synchronous", default="full", choices=("full", "normal"))
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--warmup", type=float, default=0.0, help="h2load --warm-up-time (not counted by h2load)")
    p.add_argument("--devices", type=int, default=10000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--profile", help="write py-spy collapsed stacks of the gateway here")
    p.add_argument("--state", help="gateway state dir to (re)use [default: a fresh temp dir]")
    o = p.parse_args(argv)
    common.raise_fd_limit()
    work = common.tmpdir("pushd-ingest-")
    state = Path(o.state) if o.state else work / "state"
    state.mkdir(parents=True, exist_ok=True)
    creds = common.Credentials(state)
    try:
        result = run(creds, work, store=o.store, protocol=o.protocol, auth=o.auth, duration=o.duration,
                     devices=o.devices, clients=o.clients, streams=o.streams, warmup=o.warmup,
                     sqlite_synchronous=o.sqlite_synchronous, profile=o.profile)
    finally:
        common.stop_all()
    print(json.dumps(result, indent=1))
    return 0 if result["non_200"] == 0 and result["durable_check"] != "MISMATCH" else 1


if __name__ == "__main__":
    sys.exit(main())
