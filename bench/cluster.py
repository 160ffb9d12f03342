"""
The cluster on Redis (docs/cluster.md), two measurements:

idle: gateway nodes on one Redis, devices connected and silent, and Redis's own count of the
commands it ran (INFO commandstats) over a window. Liveness is per node (a heartbeat and a
probe every --node-heartbeat seconds), so the figure should not grow with the devices.

latency: two nodes, every device connected to node B; the same paced load posted to B (the
device's node: a local wake) and then to A (a wake over PUB/SUB), provider to app.

all: in one run, what issue 11 asks: SQLite against Redis (fan-out and ingest per gateway
CPU-second, bench/stores.py's measurement), cross-node against same-node latency, 2 workers
against 1 (deliveries/s and accepted pushes/s, with the load generator's CPU), and idle Redis
commands with 20,000 devices on 2 nodes. Writes docs/benchmarks-cluster.json and the
"Cluster" section of docs/benchmarks.md (between its cluster markers; bench/report.py puts
the same section back when bench/run rewrites the file).

    python -m bench.cluster idle --devices 2000 --nodes 2 --window 30
    python -m bench.cluster latency --devices 300 --rate 500 --duration 5
    flock /tmp/pushd-heavy.lock .venv/bin/python -m bench.cluster all
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import sys
import time
from pathlib import Path

from bench import common, fanout, fleet, ingest
from bench.latency import _percentiles, timed_round


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


def run(devices: int, nodes: int, window: float, settle: float = 5.0, log=print, setup=None):
    work, creds = setup or common.setup()
    redis = common.Redis(work).start()
    gateways = [common.Gateway(creds, work, store=redis.url, name=f"node{k}").start() for k in range(nodes)]
    # One fleet process per 10,000 devices: each holds one fd per device, and the hard limit
    # here is about 20,000 per process.
    nfleet = max(2, -(-devices // 10_000))
    workers = fleet.Workers(nfleet)
    try:
        spec = {"kind": "pushd", "ports": [g.courier_port for g in gateways], "ca_key": creds.ca_key_pem,
                "registry": creds.registry, "ca_cert": creds.ca_cert_pem}
        part = fleet.slices(list(range(devices)), nfleet)
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
        total = round(sum(per_second.values()), 2)
        row = {"devices": live, "connect_errors": errors, "nodes": nodes, "window_s": round(t1 - t0, 1),
               "redis_commands_per_second": per_second, "total_per_second": total,
               "per_device_per_second": round(total / live, 7) if live else None}
        log(json.dumps(row))
        return row
    finally:
        workers.close()
        for g in gateways:
            g.stop()
        redis.stop()


def latency(devices: int, rate: int, duration: float, log=print, setup=None, rounds: int = 3):
    """Same node against cross node, in ``rounds`` alternating rounds (B, A, then A, B, ...):
    one 5 s round's p99 is 25 samples and swung from 0.3x to 9x between runs here, with
    whatever else the machine did; the rows pool every round's samples per path."""
    work, creds = setup or common.setup()
    redis = common.Redis(work).start()
    a, b = (common.Gateway(creds, work, store=redis.url, name=f"lat-{n}").start() for n in "AB")
    workers = fleet.Workers(2)
    paths = {"same node (B)": b, "cross node (A -> B)": a}
    pooled = {via: {"accepted": 0, "delivered": 0, "duplicates": 0, "latencies": []} for via in paths}
    per_round = []
    try:
        part = fleet.slices(list(range(devices)), 2)
        workers.call("prepare", lambda k: {"kind": "pushd", "indices": part[k], "ports": [b.courier_port],
                                           "ca_key": creds.ca_key_pem, "ca_cert": creds.ca_cert_pem,
                                           "registry": creds.registry})
        workers.call("connect", lambda k: {"concurrency": 64, "filter": True})
        time.sleep(2.0)
        tokens = [creds.device_token(common.device_id(i)).hex() for i in range(devices)]
        for r in range(rounds):
            order = list(paths) if r % 2 == 0 else list(reversed(list(paths)))
            this = {}
            for via in order:
                gw = paths[via]
                _, _, ok, st, lat = timed_round(creds, gw, workers, tokens, rate, duration)
                acc = pooled[via]
                acc["accepted"] += ok
                acc["delivered"] += st["received"]
                acc["duplicates"] += st.get("duplicates") or 0
                acc["latencies"] += lat
                this[via] = _percentiles(lat)
                log(json.dumps({"round": r + 1, "posted_to": via, "accepted": ok, "delivered": st["received"],
                                **this[via]}))
            same, cross = this["same node (B)"], this["cross node (A -> B)"]
            per_round.append({"p50": round(cross["p50_ms"] / same["p50_ms"], 2) if same["p50_ms"] else None,
                              "p99": round(cross["p99_ms"] / same["p99_ms"], 2) if same["p99_ms"] else None})
        rows = []
        for via, acc in pooled.items():
            row = {"posted_to": via, "rate": rate, "rounds": rounds, "accepted": acc["accepted"],
                   "delivered": acc["delivered"], "duplicates": acc["duplicates"], **_percentiles(acc["latencies"])}
            log(json.dumps(row))
            rows.append(row)
        if rows[0]["p50_ms"] and rows[0]["p99_ms"]:
            log(json.dumps({"cross_over_same_p50": round(rows[1]["p50_ms"] / rows[0]["p50_ms"], 2),
                            "cross_over_same_p99": round(rows[1]["p99_ms"] / rows[0]["p99_ms"], 2),
                            "per_round": per_round}))
        rows[0]["per_round_ratios"] = per_round
        return rows
    finally:
        workers.close()
        a.stop()
        b.stop()
        redis.stop()

def stores(devices: int, messages: int, duration: float, log=print, setup=None):
    """bench/stores.py's comparison: SQLite against Redis, one gateway process each."""
    work, creds = setup or common.setup()
    sqlite = fanout.run_pushd(creds, work, devices, messages, store=f"sqlite:{work}/fan.sqlite3", log=log)
    redis = common.Redis(work).start()
    try:
        red = fanout.run_pushd(creds, work, devices, messages, store=redis.url, log=log)
    finally:
        redis.stop()
    ing = {}
    for store in ("sqlite", "redis"):
        r = ingest.run(creds, work, store=store, duration=duration, devices=devices)
        log(json.dumps(r))
        ing[store] = r
    out = {"params": {"devices": devices, "messages": messages, "ingest_duration_s": duration},
           "fanout": {"sqlite": sqlite, "redis": red,
                      "ratio": round(red["per_cpu_second"] / sqlite["per_cpu_second"], 2)},
           "ingest": {"sqlite": ing["sqlite"], "redis": ing["redis"],
                      "ratio": round(ing["redis"]["accepted_per_cpu_s"] / ing["sqlite"]["accepted_per_cpu_s"], 2)}}
    log(json.dumps({"fanout_ratio": out["fanout"]["ratio"], "ingest_ratio": out["ingest"]["ratio"]}))
    return out


def workers_compare(devices: int, messages: int, duration: float, log=print, setup=None):
    """--workers 1 against --workers 2 on the Redis store, the gateway allowed on every core.

    The load generator (the device fleet, h2load) runs on its usual CPUs, which on this
    2-core machine are one of the gateway's two: its CPU time is reported beside the figures.
    """
    work, creds = setup or common.setup()
    cpus = set(common.CPUS)
    rows = []
    for n in (1, 2):
        args = ["--workers", str(n)]
        redis = common.Redis(work).start()
        try:
            fan = fanout.run_pushd(creds, work, devices, messages, store=redis.url, log=log, cpus=cpus,
                                   gateway_args=args)
        finally:
            redis.stop()
        ing = ingest.run(creds, work, store="redis", duration=duration, devices=devices, cpus=cpus,
                         gateway_args=args, name=f"ingest-workers{n}")
        row = {"workers": n, "deliveries_per_s": fan["per_second"], "fanout_gateway_cpu_s": fan["server_cpu_seconds"],
               "fanout_seconds": fan["seconds"], "fanout_load_cpu_share": fan["load_cpu_share"],
               "accepted_per_s": ing["accepted_per_s"], "ingest_gateway_cpu_s": ing["gateway_cpu_s"],
               "ingest_h2load_cpu_s": ing["h2load_cpu_s"], "ingest_redis_cpu_s": ing.get("redis_cpu_s"),
               "ingest_wall_s": ing["h2load"].get("elapsed_s") or duration, "non_200": ing["non_200"]}
        log(json.dumps(row))
        rows.append(row)
    return {"params": {"devices": devices, "messages": messages, "ingest_duration_s": duration,
                       "cpus": len(common.CPUS)}, "rows": rows}


SECTION_BEGIN = "<!-- cluster section: written by bench/cluster.py all; do not edit -->"
SECTION_END = "<!-- end of cluster section -->"
DOCS = Path(__file__).resolve().parent.parent / "docs"


def _n(x, digits=0):
    if x is None:
        return "–"
    return f"{x:,.{digits}f}"


def _met(ok):
    return "met" if ok else "**not met**"


def render(res: dict) -> str:
    """The "Cluster" section of docs/benchmarks.md from docs/benchmarks-cluster.json."""
    out = ["## Cluster (Redis store, several nodes)", "",
           f"One run of `{res.get('command', 'python -m bench.cluster all')}`, {res.get('machine', '')}, "
           f"{res.get('seconds', '–')} s. Every gateway is a twistd process on loopback; Redis "
           "(`appendfsync everysec`) shares the gateway's core.", ""]
    targets = []
    st = res.get("stores")
    if st and "error" not in st:
        f, i = st["fanout"], st["ingest"]
        out += ["### Redis against SQLite, per gateway CPU-second", "",
                "| measure | SQLite | Redis | Redis / SQLite | target |", "|---|---|---|---|---|",
                f"| fan-out, deliveries per gateway CPU-second | {_n(f['sqlite']['per_cpu_second'])} | "
                f"{_n(f['redis']['per_cpu_second'])} | {f['ratio']} | ≥ 0.7, {_met(f['ratio'] >= 0.7)} |",
                f"| ingest, accepted pushes per gateway CPU-second | {_n(i['sqlite']['accepted_per_cpu_s'])} | "
                f"{_n(i['redis']['accepted_per_cpu_s'])} | {i['ratio']} | ≥ 0.8, {_met(i['ratio'] >= 0.8)} |",
                "",
                f"Fan-out: {_n(st['params']['devices'])} connected devices, {st['params']['messages']} "
                "notifications each queued first, then drained and acked (as in \"Fan-out\" above, "
                "with fewer per device, so a device's per-pass costs weigh more). "
                f"Ingest: HTTP/2, JWT, 8 × 64 streams for {st['params']['ingest_duration_s']} s (as in "
                "\"Provider ingest\"). Redis's own CPU is not in the gateway's figure: "
                f"{i['redis'].get('redis_cpu_s', '–')} s of Redis CPU during the "
                f"{i['redis'].get('gateway_cpu_s', '–')} gateway CPU-seconds of the ingest run.", ""]
        targets += [("Redis fan-out / SQLite", f["ratio"], f["ratio"] >= 0.7),
                    ("Redis ingest / SQLite", i["ratio"], i["ratio"] >= 0.8)]
    elif st:
        out += [f"_stores: {st['error']}_", ""]
    lat = res.get("latency")
    if lat and "error" not in lat:
        rows = lat["rows"]
        out += ["### Cross-node against same-node delivery", "",
                "| posted to | accepted | delivered | p50 | p99 | p99.9 |", "|---|---|---|---|---|---|"]
        for r in rows:
            out.append(f"| {r['posted_to']} | {_n(r['accepted'])} | {_n(r['delivered'])} | {r['p50_ms']} ms | "
                       f"{r['p99_ms']} ms | {r['p999_ms']} ms |")
        r50, r99 = lat.get("ratio_p50"), lat.get("ratio_p99")
        out += ["", f"Cross over same: **{r50}x at p50, {r99}x at p99** (target ≤ 1.5x: "
                f"p50 {_met(r50 is not None and r50 <= 1.5)}, p99 {_met(r99 is not None and r99 <= 1.5)}). "
                f"{lat['params']['devices']} devices all on node B, {lat['params']['rate']} pushes/s for "
                f"{lat['params']['duration']} s posted to B, then the same to A, provider to app, in "
                f"{lat['params'].get('rounds', 1)} alternating rounds (B A, A B, ...) whose samples are pooled "
                f"per row; each round's own cross/same ratios (p50, p99): "
                + ", ".join(f"{x['p50']}/{x['p99']}" for x in lat.get("per_round") or []) + " "
                "(`bench/h2send.py`, 4 HTTP/2 connections). A cross-node delivery adds A's PUBLISH, "
                "Redis, and B's subscriber before B's session reads the queue.", ""]
        targets += [("cross / same node latency, p50", r50, r50 is not None and r50 <= 1.5),
                    ("cross / same node latency, p99", r99, r99 is not None and r99 <= 1.5)]
    elif lat:
        out += [f"_latency: {lat['error']}_", ""]
    wk = res.get("workers")
    if wk and "error" not in wk:
        out += ["### 2 workers against 1 (`--workers N`, SO_REUSEPORT)", "",
                "| workers | deliveries/s | gateway CPU-s (fan-out) | load CPU share (fan-out) | "
                "accepted pushes/s | gateway CPU-s (ingest) | h2load CPU-s | Redis CPU-s | not 200 |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in wk["rows"]:
            out.append(f"| {r['workers']} | {_n(r['deliveries_per_s'])} | {r['fanout_gateway_cpu_s']} | "
                       f"{r['fanout_load_cpu_share']} | {_n(r['accepted_per_s'])} | {r['ingest_gateway_cpu_s']} | "
                       f"{r['ingest_h2load_cpu_s']} | {r['ingest_redis_cpu_s']} | {r['non_200']} |")
        a, b = wk["rows"][0], wk["rows"][1]
        out += ["", f"2 workers / 1: deliveries {round(b['deliveries_per_s'] / a['deliveries_per_s'], 2)}x, "
                f"accepted pushes {round(b['accepted_per_s'] / a['accepted_per_s'], 2)}x. "
                f"This machine has {wk['params']['cpus']} cores and the load generator shares them: "
                "the device fleet (fan-out; \"load CPU share\" is its CPU-seconds per second) and "
                "h2load (ingest) are pinned to one core and Redis to the other, and the gateway "
                "(1 worker, or the supervisor and its 2 workers) may run on both in either row. So 2 "
                "workers here compete with the load and with Redis for the same two cores; on a host "
                "where the load comes from elsewhere a second worker gets a core of its own. Gateway "
                "CPU-s counts every gateway process (supervisor included). "
                f"{_n(wk['params']['devices'])} devices, "
                f"{wk['params']['messages']} notifications each (fan-out), "
                f"{wk['params']['ingest_duration_s']} s of HTTP/2 ingest, Redis store.", ""]
    elif wk:
        out += [f"_workers: {wk['error']}_", ""]
    idle = res.get("idle")
    if idle and "error" not in idle:
        cmds = ", ".join(f"{k} {v}" for k, v in sorted(idle["redis_commands_per_second"].items()))
        per = idle["per_device_per_second"]
        out += ["### Idle Redis traffic", "",
                f"{_n(idle['devices'])} connected idle devices on {idle['nodes']} nodes "
                f"({idle['connect_errors']} connect errors), Redis's INFO commandstats before and after "
                f"a quiet window of {idle['window_s']} s: **{idle['total_per_second']} commands per second "
                f"in all** ({cmds}), {per} per device (target ≈ 0: {_met(per is not None and per < 0.001)}). "
                "Liveness is per node: every 3 s each node runs one heartbeat script (EVALSHA, with "
                "the SET and EXISTS inside it counted too) and publishes one probe, and every 60 s runs the "
                "expiry sweep (one script: ZRANGEBYSCORE inside; SCRIPT LOAD the first time); nothing "
                "per device. Two nodes because one process here holds at most about 20,000 fds.", ""]
        targets.append(("idle Redis commands/s per device (20,000 devices)", per, per is not None and per < 0.001))
    elif idle:
        out += [f"_idle: {idle['error']}_", ""]
    if targets:
        out += ["### Targets (issue 11)", "", "| target | measured | |", "|---|---|---|"]
        out += [f"| {t} | {m} | {_met(ok)} |" for t, m, ok in targets]
        out.append("")
    return "\n".join(out)


def section(docs: Path = DOCS) -> str:
    """The section with its markers, for bench/report.py; empty if never run."""
    path = docs / "benchmarks-cluster.json"
    if not path.exists():
        return ""
    return f"{SECTION_BEGIN}\n{render(json.loads(path.read_text()))}\n{SECTION_END}\n"


def splice(docs: Path = DOCS):
    md = docs / "benchmarks.md"
    text = md.read_text() if md.exists() else ""
    pattern = re.compile(re.escape(SECTION_BEGIN) + r".*?" + re.escape(SECTION_END) + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda m: section(docs), text)
    else:
        text = text.rstrip("\n") + "\n\n" + section(docs)
    md.write_text(text)


def run_all(a, log=print):
    started = time.monotonic()
    setup = common.setup()
    res = {"command": "flock /tmp/pushd-heavy.lock .venv/bin/python -m bench.cluster " + " ".join(sys.argv[1:]),
           "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, Python {platform.python_version()}"}
    steps = [("stores", lambda: stores(a.store_devices, a.messages, a.ingest_duration, log, setup)),
             ("latency", lambda: _latency_block(a, log, setup)),
             ("workers", lambda: workers_compare(a.store_devices, a.messages, a.ingest_duration, log, setup)),
             ("idle", lambda: run(a.idle_devices, 2, a.idle_window, log=log, setup=setup))]
    for name, fn in steps:
        if a.skip and name in a.skip.split(","):
            continue
        try:
            res[name] = fn()
        except Exception as e:  # one part failing must not lose the others
            res[name] = {"error": repr(e)}
            log(json.dumps({name: repr(e)}))
        finally:
            common.stop_all()
    res["seconds"] = round(time.monotonic() - started)
    (DOCS / "benchmarks-cluster.json").write_text(json.dumps(res, indent=1) + "\n")
    splice()
    return res


def _latency_block(a, log, setup):
    rows = latency(a.lat_devices, a.lat_rate, a.lat_duration, log=log, setup=setup, rounds=a.lat_rounds)
    return {"params": {"devices": a.lat_devices, "rate": a.lat_rate, "duration": a.lat_duration,
                       "rounds": a.lat_rounds}, "rows": rows, "per_round": rows[0].get("per_round_ratios"),
            "ratio_p50": round(rows[1]["p50_ms"] / rows[0]["p50_ms"], 2),
            "ratio_p99": round(rows[1]["p99_ms"] / rows[0]["p99_ms"], 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["idle", "latency", "all", "render"])
    ap.add_argument("--devices", type=int, default=2000)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--window", type=float, default=30.0)
    ap.add_argument("--rate", type=int, default=500)
    ap.add_argument("--duration", type=float, default=5.0)
    # all:
    ap.add_argument("--store-devices", type=int, default=5000, help="all: devices in fan-out, ingest, workers")
    ap.add_argument("--messages", type=int, default=5, help="all: notifications per device in the fan-outs")
    ap.add_argument("--ingest-duration", type=float, default=8.0, help="all: seconds of each ingest run")
    ap.add_argument("--lat-devices", type=int, default=300)
    ap.add_argument("--lat-rate", type=int, default=500)
    ap.add_argument("--lat-duration", type=float, default=5.0)
    ap.add_argument("--lat-rounds", type=int, default=3, help="alternating rounds of same and cross node")
    ap.add_argument("--idle-devices", type=int, default=20_000)
    ap.add_argument("--idle-window", type=float, default=20.0)
    ap.add_argument("--skip", default="", help="all: parts to leave out (stores,latency,workers,idle)")
    a = ap.parse_args()
    if a.what == "idle":
        run(a.devices, a.nodes, a.window)
    elif a.what == "latency":
        latency(a.devices, a.rate, a.duration, rounds=a.lat_rounds)
    elif a.what == "render":
        splice()
    else:
        run_all(a)


if __name__ == "__main__":
    main()
