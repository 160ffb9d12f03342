"""
Reconnect storm: 50,000 connected devices lose their server at once (a restart), and all
of them come back by themselves. The figure is the time from the restarted server
listening again to the last device connected, and nothing queued before the restart may
be lost.

pushd: three gateway processes with the SQLite store (a process holds at most ~19,500
sockets here). Before the restart, `queued` devices have one notification waiting
(topic filtered out, so it stays stored); after it, every device sends its Filter on
reconnecting, and each of those notifications must arrive exactly once.
Mosquitto: three brokers; the subscribers reconnect and subscribe again.

Each device retries as the pushd device daemon does: a first attempt after a random delay
within `jitter` seconds, then exponential backoff (capped at 2 s here) while refused.

    python -m bench.storm --devices 5000
"""

from __future__ import annotations

import argparse
import json
import math
import time

from bench import common, fleet
from bench.fanout import fill

PER_PROCESS = 17_000


def _wait(workers, pred, timeout):
    deadline = time.monotonic() + timeout
    s = workers.stats()
    while time.monotonic() < deadline and not pred(s):
        time.sleep(0.25)
        s = workers.stats()
    return s


def run(creds, work, kind, devices=50_000, queued=10_000, jitter=1.0, log=print):
    n = max(1, math.ceil(devices / PER_PROCESS))
    if kind == "pushd":
        servers = [common.Gateway(creds, work, store=f"sqlite:{work}/storm-gw{k}.sqlite3", name=f"storm-gw{k}",
                                  args=["--sqlite-synchronous", "normal"]).start() for k in range(n)]
        ports = [s.courier_port for s in servers]
    else:
        servers = [common.Mosquitto(creds, work, name=f"storm-mq{k}").start() for k in range(n)]
        ports = [s.port for s in servers]
    nworkers = max(2, math.ceil(devices / 14_000))
    workers = fleet.Workers(nworkers)
    try:
        part = fleet.slices(list(range(devices)), nworkers)
        workers.call("prepare", lambda k: {"kind": kind, "indices": part[k], "ports": ports, "qos": 1,
                                           "ca_key": creds.ca_key_pem, "ca_cert": creds.ca_cert_pem,
                                           "registry": creds.registry})
        t0 = time.monotonic()
        workers.call("connect", lambda k: {"concurrency": 64, "reconnect": True, "jitter": jitter})
        first_connect = time.monotonic() - t0
        if kind == "pushd" and queued:
            # Device i talks to gateway i % n: fill each gateway with its own devices' messages.
            for k, gw in enumerate(servers):
                mine = [i for i in range(min(queued, devices)) if i % n == k]
                fill(creds, gw, work, 0, 1, indices=mine)
            workers.call("options", lambda k: {"filter_on_connect": True, "check_duplicates": True})
        workers.call("reset", lambda k: None)
        t_down = time.time()
        common.stop_together([s.proc for s in servers])
        for s in servers:
            s.start(wait=False)
        for s in servers:
            s.ready()
        t_up = time.time()
        s = _wait(workers, lambda s: s["connects"] >= devices and
                  (kind != "pushd" or s["received"] >= min(queued, devices)), 300)
        back = s["last_connect"] - t_up if s["connects"] >= devices else None
        row = {"server": kind, "processes": n, "devices": devices,
               "first_connect_seconds": round(first_connect, 1),
               "restart_seconds": round(t_up - t_down, 2),
               "reconnected": s["connects"], "back_after_seconds": round(back, 2) if back else None,
               "back_after_restart_began": round(s["last_connect"] - t_down, 2) if back else None}
        if kind == "pushd":
            row.update({"queued_before": min(queued, devices), "delivered_after": s["received"],
                        "duplicates": s["duplicates"]})
        log(json.dumps(row))
        return row
    finally:
        workers.close()
        for s in servers:
            s.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=5000)
    ap.add_argument("--queued", type=int, default=1000)
    ap.add_argument("--only", choices=["pushd", "mosquitto"])
    args = ap.parse_args()
    work, creds = common.setup()
    for kind in ([args.only] if args.only else ["pushd", "mosquitto"]):
        run(creds, work, kind, args.devices, args.queued)


if __name__ == "__main__":
    main()
