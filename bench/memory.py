"""
Memory per idle TLS connection as the count grows: pushd gateways and Mosquitto brokers
holding the same number of devices, connected by the same fleet. A process holds at most
~19,500 sockets here (hard fd limit 20,000), so both servers run as several processes with
the devices spread evenly over them; the figure is the growth of their summed RSS over the
count.

    python -m bench.memory --steps 2000,5000
"""

from __future__ import annotations

import argparse
import json
import math
import time

from bench import common, fleet

PER_PROCESS = 17_000


def _servers(kind, creds, work, count, **kw):
    n = max(1, math.ceil(count / PER_PROCESS))
    if kind == "pushd":
        return [common.Gateway(creds, work, store="memory", name=f"mem-gw{k}", **kw).start() for k in range(n)]
    return [common.Mosquitto(creds, work, name=f"mem-mq{k}").start() for k in range(n)]


def _ports(kind, servers):
    return [s.courier_port if kind == "pushd" else s.port for s in servers]


def run(creds, work, kind, steps=(10_000, 50_000, 100_000), settle=3.0, log=print):
    top = max(steps)
    servers = _servers(kind, creds, work, top)
    pids = [s.pid for s in servers]
    nworkers = max(2, math.ceil(top / 14_000))
    workers = fleet.Workers(nworkers)
    rows = []
    try:
        indices = list(range(top))
        spec = {"kind": kind, "ports": _ports(kind, servers), "ca_key": creds.ca_key_pem, "registry": creds.registry,
                "ca_cert": creds.ca_cert_pem}
        time.sleep(1.0)
        before = common.rss_kib(pids)
        done = 0
        elapsed = 0.0
        for step in sorted(steps):
            part = fleet.slices(indices[done:step], nworkers)
            workers.call("prepare", lambda k: dict(spec, indices=part[k]))
            t0 = time.monotonic()
            res = workers.call("connect", lambda k: {"concurrency": 64})
            elapsed += time.monotonic() - t0
            errors = sum(r["error_count"] for r in res)
            done = step
            time.sleep(settle)
            live = workers.stats()["live"]
            after = common.rss_kib(pids)
            row = {"server": kind, "processes": len(servers), "connections": live, "errors": errors,
                   "rss_before_kib": before, "rss_after_kib": after,
                   "kib_per_connection": round((after - before) / live, 2) if live else None,
                   "connect_seconds": round(elapsed, 1),
                   "connects_per_second": round(step / elapsed, 0) if elapsed else None}
            log(json.dumps(row))
            rows.append(row)
            if errors:
                log(f"  first errors: {[e for r in res for e in r['errors']][:3]}")
    finally:
        workers.close()
        for s in servers:
            s.stop()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", default="2000,5000")
    ap.add_argument("--only", choices=["pushd", "mosquitto"])
    args = ap.parse_args()
    work, creds = common.setup()
    steps = [int(s) for s in args.steps.split(",")]
    for kind in ([args.only] if args.only else ["pushd", "mosquitto"]):
        run(creds, work, kind, steps)


if __name__ == "__main__":
    main()
