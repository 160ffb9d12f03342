"""
What idle devices cost a cluster's Redis: gateway nodes on one Redis, devices connected and
silent, and Redis's own count of the commands it ran (INFO commandstats) over a window. The
cluster's liveness is per node (a heartbeat and a probe every --node-heartbeat seconds), so
the figure should not grow with the devices.

    python -m bench.cluster_idle --devices 2000 --nodes 2 --window 30
"""

from __future__ import annotations

import argparse
import json
import socket
import time

from bench import common, fleet


def redis_commands(port: int) -> dict:
    """Calls per command since Redis started (INFO commandstats), over a raw socket."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"INFO commandstats\r\n")
        data = b""
        while True:
            data += s.recv(65536)
            if data.startswith(b"$"):
                size = int(data[1:data.index(b"\r\n")])
                if len(data) >= data.index(b"\r\n") + 2 + size:
                    break
    calls = {}
    for line in data.decode().splitlines():
        if line.startswith("cmdstat_"):
            name, _, rest = line[len("cmdstat_"):].partition(":")
            calls[name] = int(rest.split(",")[0].split("=")[1])
    return calls


def run(devices: int, nodes: int, window: float, settle: float = 5.0, log=print):
    work, creds = common.setup()
    redis = common.Redis(work).start()
    gateways = [common.Gateway(creds, work, store=redis.url, name=f"node{k}").start() for k in range(nodes)]
    workers = fleet.Workers(2)
    try:
        spec = {"kind": "pushd", "ports": [g.courier_port for g in gateways], "ca_key": creds.ca_key_pem,
                "registry": creds.registry, "ca_cert": creds.ca_cert_pem}
        part = fleet.slices(list(range(devices)), 2)
        workers.call("prepare", lambda k: dict(spec, indices=part[k]))
        res = workers.call("connect", lambda k: {"concurrency": 64})
        errors = sum(r["error_count"] for r in res)
        time.sleep(settle)
        live = workers.stats()["live"]
        before, t0 = redis_commands(redis.port), time.monotonic()
        time.sleep(window)
        after, t1 = redis_commands(redis.port), time.monotonic()
        per_second = {k: round((after[k] - before.get(k, 0)) / (t1 - t0), 2)
                      for k in after if after[k] != before.get(k, 0) and k != "info"}
        row = {"devices": live, "connect_errors": errors, "nodes": nodes, "window_s": round(t1 - t0, 1),
               "redis_commands_per_second": per_second,
               "total_per_second": round(sum(per_second.values()), 2)}
        log(json.dumps(row))
        return row
    finally:
        workers.close()
        for g in gateways:
            g.stop()
        redis.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=2000)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--window", type=float, default=30.0)
    a = ap.parse_args()
    run(a.devices, a.nodes, a.window)


if __name__ == "__main__":
    main()
