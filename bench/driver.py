"""
Run every benchmark scenario against pushd and Mosquitto in one go, then write
docs/benchmarks.md (tables from bench/benchmarks.md.in) and the plots beside it.

    bench/run              # the full run (about 15 minutes)
    bench/run --quick      # small counts, to check the machinery (about 2 minutes); its page
                           # goes to /tmp/pushd-bench-quick, not over the real one
    bench/run --only fanout,ingest   # some scenarios; the others keep their last results

Raw results go to docs/benchmarks.json, so the report can be rebuilt with --report-only.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import common

DOCS = common.ROOT / "docs"
QUICK_OUT = Path("/tmp/pushd-bench-quick")

FULL = {
    "memory": {"steps": [10_000, 50_000, 100_000, 200_000]},
    "storm": {"devices": 50_000, "queued": 10_000},
    "fanout": {"devices": 10_000, "messages": 20},
    "ingest": {"duration": 12.0, "devices": 10_000},
    "latency": {"devices": 1_000, "duration": 8.0, "fractions": [0.1, 0.5, 0.9]},
}
QUICK = {
    "memory": {"steps": [1_000, 3_000]},
    "storm": {"devices": 3_000, "queued": 500},
    "fanout": {"devices": 2_000, "messages": 5},
    "ingest": {"duration": 4.0, "devices": 2_000},
    "latency": {"devices": 300, "duration": 4.0, "fractions": [0.1, 0.5, 0.9]},
}
ORDER = ["memory", "storm", "fanout", "ingest", "latency"]


def log(*args):
    print(time.strftime("%H:%M:%S"), *args, flush=True)


def machine():
    def version(argv):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (out.stdout or out.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "not found"

    import OpenSSL
    import twisted

    mem = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
    return {
        "cpus": len(common.CPUS),
        "cpu_model": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
        "memory_gib": round(mem / 1024 / 1024, 1),
        "fd_limit": common.fd_limit(),
        "python": platform.python_version(),
        "twisted": twisted.__version__,
        "openssl": OpenSSL.SSL.SSLeay_version(OpenSSL.SSL.SSLEAY_VERSION).decode(),
        "mosquitto": version([shutil.which("mosquitto") or "mosquitto", "-h"]),
        "redis": version(["redis-server", "--version"]),
        "h2load": version(["h2load", "--version"]),
        "kernel": platform.release(),
    }


def _with_redis(work, fn):
    redis = common.Redis(work).start()
    try:
        return fn(redis.url)
    finally:
        redis.stop()


def run_scenario(name, params, creds, work):
    from bench import fanout, ingest, latency, memory, storm

    if name == "memory":
        return {k: memory.run(creds, work, k, params["steps"], log=log) for k in ("pushd", "mosquitto")}
    if name == "storm":
        return {k: storm.run(creds, work, k, params["devices"], params["queued"], log=log)
                for k in ("pushd", "mosquitto")}
    if name == "fanout":
        d, m = params["devices"], params["messages"]
        return {
            "pushd": fanout.run_pushd(creds, work, d, m, log=log),
            "pushd_sqlite": fanout.run_pushd(creds, work, d, m, store=f"sqlite:{work}/fan.sqlite3", log=log),
            "pushd_redis": _with_redis(work, lambda url: fanout.run_pushd(creds, work, d, m, store=url, log=log)),
            "mosquitto_qos1": fanout.run_mosquitto(creds, work, d, m, qos=1, log=log),
            "mosquitto_qos0": fanout.run_mosquitto(creds, work, d, m, qos=0, log=log),
        }
    if name == "ingest":
        rows = []
        # h2load keeps one request at a time on an HTTP/1.1 connection: more connections there.
        for protocol, auth, store, clients in (("h2", "jwt", "sqlite", 8), ("h2", "jwt", "redis", 8),
                                               ("h1", "jwt", "sqlite", 64), ("h2", "static", "memory", 8)):
            r = ingest.run(creds, work, store=store, protocol=protocol, auth=auth, clients=clients,
                           duration=params["duration"], devices=params["devices"])
            log(json.dumps(r))
            rows.append(r)
        return rows
    if name == "latency":
        return latency.run_all(creds, work, params, log=log)
    raise ValueError(name)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small counts, to check the machinery")
    ap.add_argument("--only", help=f"comma-separated scenarios out of {','.join(ORDER)}")
    ap.add_argument("--report-only", action="store_true", help="rebuild the page from its benchmarks.json")
    ap.add_argument("--out", type=Path, help=f"where the page, plots and JSON go [default: docs/, or {QUICK_OUT} "
                                              "with --quick, so a check never overwrites the real figures]")
    args = ap.parse_args()
    only = args.only.split(",") if args.only else ORDER
    unknown = set(only) - set(ORDER)
    if unknown:
        ap.error(f"unknown scenario(s): {', '.join(sorted(unknown))}; choose from {', '.join(ORDER)}")
    for tool in ("mosquitto", "h2load", "redis-server"):
        if not shutil.which(tool):
            ap.error(f"{tool} is not installed (bench/run installs it with apt-get)")

    from bench import report

    out = args.out or (QUICK_OUT if args.quick else DOCS)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "benchmarks.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if not args.report_only:
        common.raise_fd_limit()
        params = QUICK if args.quick else FULL
        results["machine"] = machine()
        results["mode"] = "quick" if args.quick else "full"
        work = common.tmpdir()
        creds = common.Credentials(work / "state")
        started = time.monotonic()
        try:
            for name in ORDER:
                if name not in only:
                    continue
                log(f"--- {name} {params[name]}")
                t0 = time.monotonic()
                results[name] = {"params": params[name], "results": run_scenario(name, params[name], creds, work),
                                 "seconds": round(time.monotonic() - t0)}
                log(f"--- {name} took {results[name]['seconds']} s")
                results_path.write_text(json.dumps(results, indent=1) + "\n")
        finally:
            common.stop_all()
        results["total_seconds"] = round(time.monotonic() - started)
        results["date"] = time.strftime("%Y-%m-%d")
        results_path.write_text(json.dumps(results, indent=1) + "\n")
        log(f"all scenarios took {results['total_seconds']} s")
    report.write(results, out)
    log(f"wrote {out / 'benchmarks.md'}")


if __name__ == "__main__":
    sys.exit(main())
