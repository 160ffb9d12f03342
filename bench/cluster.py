"""
The cluster on Redis (docs/cluster.md), two measurements:

idle: gateway nodes on one Redis, devices connected and silent, and Redis's own count of the
commands it ran (INFO commandstats) over a window. Liveness is per node (a heartbeat and a
probe every --node-heartbeat seconds), so the figure should not grow with the devices.

latency: two nodes, every device connected to node B; the same paced load posted to B (the
device's node: a local wake) and then to A (a wake over PUB/SUB), provider to app.

    python -m bench.cluster idle --devices 2000 --nodes 2 --window 30
    python -m bench.cluster latency --devices 300 --rate 500 --duration 5
"""

from __future__ import annotations

import argparse
import json
import socket
import time

from bench import common, fleet, h2send
from bench.latency import _drain, _percentiles


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


def latency(devices: int, rate: int, duration: float, log=print):
    work, creds = common.setup()
    redis = common.Redis(work).start()
    a, b = (common.Gateway(creds, work, store=redis.url, name=f"lat-{n}").start() for n in "AB")
    workers = fleet.Workers(2)
    rows = []
    try:
        part = fleet.slices(list(range(devices)), 2)
        workers.call("prepare", lambda k: {"kind": "pushd", "indices": part[k], "ports": [b.courier_port],
                                           "ca_key": creds.ca_key_pem, "ca_cert": creds.ca_cert_pem,
                                           "registry": creds.registry})
        workers.call("connect", lambda k: {"concurrency": 64, "filter": True})
        time.sleep(2.0)
        tokens = [creds.device_token(common.device_id(i)).hex() for i in range(devices)]
        for via, gw in (("same node (B)", b), ("cross node (A -> B)", a)):
            workers.call("reset", lambda k: None)
            workers.call("options", lambda k: {"timestamps": True})
            sent = h2send.run_in_process(cpus=common.LOAD_CPUS, port=gw.provider_port,
                                         authorization=f"bearer {creds.provider_key}", tokens=tokens,
                                         topic=common.TOPIC, rate=rate, duration=duration, connections=4)
            if "error" in sent:
                raise RuntimeError(f"h2send failed: {sent['error']}")
            ok = {str(k): v for k, v in sent.get("statuses", {}).items()}.get("200", 0)
            s = _drain(workers, ok)
            workers.call("options", lambda k: {"timestamps": False})
            lat = workers.stats(latencies=True)["latencies"]
            row = {"posted_to": via, "rate": rate, "accepted": ok, "delivered": s["received"],
                   "duplicates": s.get("duplicates"), **_percentiles(lat)}
            log(json.dumps(row))
            rows.append(row)
        if rows[0]["p50_ms"] and rows[0]["p99_ms"]:
            log(json.dumps({"cross_over_same_p50": round(rows[1]["p50_ms"] / rows[0]["p50_ms"], 2),
                            "cross_over_same_p99": round(rows[1]["p99_ms"] / rows[0]["p99_ms"], 2)}))
        return rows
    finally:
        workers.close()
        a.stop()
        b.stop()
        redis.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["idle", "latency"])
    ap.add_argument("--devices", type=int, default=2000)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--window", type=float, default=30.0)
    ap.add_argument("--rate", type=int, default=500)
    ap.add_argument("--duration", type=float, default=5.0)
    a = ap.parse_args()
    if a.what == "idle":
        run(a.devices, a.nodes, a.window)
    else:
        latency(a.devices, a.rate, a.duration)


if __name__ == "__main__":
    main()
