"""
SQLite against Redis, side by side in one run: fan-out (deliveries per gateway CPU-second)
and provider ingest (accepted pushes per gateway CPU-second), with the ratios the cluster
issue asks for (Redis fan-out >= 0.7x SQLite, Redis ingest >= 0.8x SQLite).

    flock /tmp/pushd-heavy.lock .venv/bin/python -m bench.stores --devices 10000 --messages 5

Prints one JSON object per run and a summary.
"""

from __future__ import annotations

import argparse
import json

from bench import common, fanout, ingest


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--messages", type=int, default=5, help="notifications per device in the fan-out")
    ap.add_argument("--duration", type=float, default=12.0, help="seconds of ingest")
    ap.add_argument("--only", choices=["fanout", "ingest"])
    args = ap.parse_args()
    work, creds = common.setup()
    out = {}
    try:
        if args.only != "ingest":
            sqlite = fanout.run_pushd(creds, work, args.devices, args.messages, store=f"sqlite:{work}/fan.sqlite3")
            redis = common.Redis(work).start()
            try:
                red = fanout.run_pushd(creds, work, args.devices, args.messages, store=redis.url)
            finally:
                redis.stop()
            out["fanout"] = {"sqlite": sqlite["per_cpu_second"], "redis": red["per_cpu_second"],
                             "ratio": round(red["per_cpu_second"] / sqlite["per_cpu_second"], 2)}
        if args.only != "fanout":
            rows = {}
            for store in ("sqlite", "redis"):
                r = ingest.run(creds, work, store=store, duration=args.duration, devices=args.devices)
                print(json.dumps(r), flush=True)
                rows[store] = r["accepted_per_cpu_s"]
            out["ingest"] = {**rows, "ratio": round(rows["redis"] / rows["sqlite"], 2)}
    finally:
        common.stop_all()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
