"""
Shutdown cost: one gateway (SQLite store) holding N connected devices gets SIGTERM; the
figure is the time from the signal to the process gone, and the gateway's own "drained in"
line. Issue 13's target: a gateway holding 17,000 devices restarts in at most 2 s (10.7 s
before the drain: a log line and a presence release per device).

``--root`` runs the gateway from another checkout (e.g. ``/work/main``) for the figure
before; the fleet's devices are APNs-style (no Connect field 32), so they are closed, not
told GoAway: the per-connection cost measured is the close itself.

    flock /tmp/pushd-heavy.lock python -m bench.drain --devices 17000
"""

from __future__ import annotations

import argparse
import json
import math
import re
import signal
import time
from pathlib import Path

from bench import common, fleet


def run(creds, work, devices=17_000, root=None, log=print):
    if root is not None:
        common.ROOT = Path(root)
    gw = common.Gateway(creds, work, store=f"sqlite:{work}/drain.sqlite3", name="drain-gw",
                        args=["--sqlite-synchronous", "normal"]).start()
    nworkers = max(2, math.ceil(devices / 14_000))
    workers = fleet.Workers(nworkers)
    try:
        part = fleet.slices(list(range(devices)), nworkers)
        workers.call("prepare", lambda k: {"kind": "pushd", "indices": part[k], "ports": [gw.courier_port],
                                           "qos": 1, "ca_key": creds.ca_key_pem, "ca_cert": creds.ca_cert_pem,
                                           "registry": creds.registry})
        workers.call("connect", lambda k: {"concurrency": 64, "reconnect": False, "jitter": 0})
        connected = workers.stats()["connects"]
        time.sleep(2)  # the connect burst's log lines and presence claims are written
        t0 = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        gw.proc.wait(120)
        took = time.monotonic() - t0
        text = gw.log.read_text(errors="replace")
        m = re.search(r"drained in ([0-9.]+) s", text)
        row = {"root": str(common.ROOT), "devices": devices, "connected": connected,
               "sigterm_to_exit_seconds": round(took, 2),
               "drain_line_seconds": float(m.group(1)) if m else None,
               "log_lines_after_sigterm": len(text.split("Received SIGTERM", 1)[-1].splitlines())}
        log(json.dumps(row))
        for line in text.splitlines():
            if "drained in" in line:
                log(line)
        return row
    finally:
        workers.close()
        gw.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=17_000)
    ap.add_argument("--root", help="run the gateway from this checkout (the figure before)")
    args = ap.parse_args()
    work, creds = common.setup()
    run(creds, work, args.devices, args.root)


if __name__ == "__main__":
    main()
