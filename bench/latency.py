"""
End-to-end latency, provider to app: an open-loop HTTP/2 sender (bench/h2send.py) posts
notifications carrying their send time at a fixed rate; 1,000 connected devices ack each
one and record its age on arrival. Percentiles at 10%, 50% and 90% of the maximum rate,
where the maximum is what the same gateway, store and devices sustain end to end under a
closed-loop h2load (many streams, no pacing). The gateway persists before it answers 200
(SQLite with synchronous=full, or Redis with appendfsync everysec).

    python -m bench.latency --devices 300 --duration 4
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import time

from bench import common, fleet, h2send
from bench.fanout import PAYLOAD


def _percentiles(samples):
    xs = sorted(samples)

    def pct(p):
        return round(xs[min(len(xs) - 1, int(math.ceil(p / 100 * len(xs))) - 1)] * 1000, 2) if xs else None

    return {"p50_ms": pct(50), "p99_ms": pct(99), "p999_ms": pct(99.9), "max_ms": pct(100)}


def timed_round(creds, gw, workers, tokens, rate, duration):
    """Post at ``rate`` for ``duration`` s through ``gw``'s provider API and wait for the
    deliveries: (h2send's report, statuses, accepted, drain stats, latency samples)."""
    workers.call("reset", lambda k: None)
    workers.call("options", lambda k: {"timestamps": True})
    sent = h2send.run_in_process(cpus=common.LOAD_CPUS, port=gw.provider_port,
                                 authorization=f"bearer {creds.provider_key}", tokens=tokens,
                                 topic=common.TOPIC, rate=rate, duration=duration, connections=4)
    if "error" in sent:
        raise RuntimeError(f"h2send failed: {sent['error']}")
    statuses = {str(k): v for k, v in sent.get("statuses", {}).items()}
    ok = statuses.get("200", 0)
    drained = _drain(workers, ok)
    workers.call("options", lambda k: {"timestamps": False})
    return sent, statuses, ok, drained, workers.stats(latencies=True)["latencies"]


def _drain(workers, target, timeout=30.0):
    """Wait for `target` deliveries, then for quiet: a request h2load gave up on may still land."""
    deadline = time.monotonic() + timeout
    s = workers.stats()
    while s["received"] < target and time.monotonic() < deadline:
        time.sleep(0.2)
        s = workers.stats()
    while time.monotonic() < deadline:
        time.sleep(1.0)
        later = workers.stats()
        if later["received"] == s["received"]:
            break
        s = later
    return s


def max_rate(creds, gw, workers, work, devices, duration):
    """Closed loop: what the gateway sustains end to end, provider in, devices' acks back."""
    uris = work / "lat-uris.txt"
    base = f"https://127.0.0.1:{gw.provider_port}"
    uris.write_text("\n".join(f"{base}/3/device/{creds.device_token(common.device_id(i)).hex()}"
                              for i in range(devices)) + "\n")
    body = work / "lat-payload.json"
    body.write_bytes(PAYLOAD)
    workers.call("reset", lambda k: None)
    argv = [shutil.which("h2load"), "-i", str(uris), "-D", str(int(duration)), "-c", "8", "-m", "32",
            "-d", str(body), "-H", f"authorization: bearer {creds.provider_key}",
            "-H", f"apns-topic: {common.TOPIC}", "-H", "apns-push-type: alert"]
    t0 = time.time()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60,
                         preexec_fn=common.pin(common.LOAD_CPUS)).stdout
    line = next((l for l in out.splitlines() if l.startswith("status codes:")), "")
    ok = int(line.split()[2]) if line else 0
    s = _drain(workers, ok)
    elapsed = max(s["last_receive"] - t0, 1e-3)
    return {"accepted": ok, "delivered": s["received"], "seconds": round(elapsed, 2),
            "per_second": round(s["received"] / elapsed)}


def run_store(creds, work, store, devices=1000, duration=10.0, fractions=(0.1, 0.5, 0.9), log=print,
              gateway_args=(), rates=None):
    redis = None
    if store == "redis":
        redis = common.Redis(work).start()
        url = redis.url
    elif store == "memory":
        url = "memory"
    else:
        url = f"sqlite:{work}/lat.sqlite3"
    gw = common.Gateway(creds, work, store=url, name=f"lat-gw-{store}", args=gateway_args).start()
    workers = fleet.Workers(2)
    try:
        part = fleet.slices(list(range(devices)), 2)
        workers.call("prepare", lambda k: {"kind": "pushd", "indices": part[k], "ports": [gw.courier_port],
                                           "ca_key": creds.ca_key_pem, "ca_cert": creds.ca_cert_pem,
                                           "registry": creds.registry})
        workers.call("connect", lambda k: {"concurrency": 64, "filter": True})
        if rates:  # fixed rates instead of fractions of a measured maximum
            top = {"per_second": max(rates)}
            fractions = [r / max(rates) for r in rates]
        else:
            top = max_rate(creds, gw, workers, work, devices, duration)
        log(json.dumps({"store": store, "max": top}))
        tokens = [creds.device_token(common.device_id(i)).hex() for i in range(devices)]
        rows = []
        for f in fractions:
            rate = max(1, round(top["per_second"] * f))
            sent, statuses, ok, s, lat = timed_round(creds, gw, workers, tokens, rate, duration)
            row = {"store": store, "fraction": f, "offered_per_second": rate,
                   "achieved_per_second": sent.get("achieved_rate"), "sent": sent.get("sent"), "accepted": ok,
                   "delivered": s["received"], "samples": len(lat), **_percentiles(lat),
                   "response_p99_ms": (sent.get("response_ms") or {}).get("p99"),
                   "not_200": sum(v for k, v in statuses.items() if k != "200")}
            log(json.dumps(row))
            rows.append(row)
        return {"max": top, "rows": rows}
    finally:
        workers.close()
        gw.stop()
        if redis:
            redis.stop()


def run_mosquitto(creds, work, rates, devices=1000, duration=10.0, log=print):
    """Mosquitto at the same offered rates: QoS 1 publish to subscriber, acked both ways
    (Mosquitto keeps them in memory: nothing is persisted before its PUBACK)."""
    mq = common.Mosquitto(creds, work, name="lat-mq").start()
    workers = fleet.Workers(2)
    publisher = fleet.Workers(1)
    try:
        part = fleet.slices(list(range(devices)), 2)
        workers.call("prepare", lambda k: {"kind": "mqtt", "indices": part[k], "ports": [mq.port], "qos": 1})
        workers.call("connect", lambda k: {"concurrency": 64})
        rows = []
        for rate in rates:
            workers.call("reset", lambda k: None)
            workers.call("options", lambda k: {"timestamps": True})
            sent = publisher.one(0, "publish_paced", {"port": mq.port, "indices": list(range(devices)),
                                                      "rate": rate, "duration": duration})
            s = _drain(workers, sent["published"])
            workers.call("options", lambda k: {"timestamps": False})
            lat = workers.stats(latencies=True)["latencies"]
            row = {"store": "Mosquitto QoS 1 (memory)", "offered_per_second": rate,
                   "achieved_per_second": round(sent["rate"] or 0, 1), "sent": sent["published"],
                   "accepted": sent["published"], "delivered": s["received"], "samples": len(lat),
                   **_percentiles(lat)}
            log(json.dumps(row))
            rows.append(row)
        return {"rows": rows}
    finally:
        publisher.close()
        workers.close()
        mq.stop()


def run_all(creds, work, params, log=print):
    out = {store: run_store(creds, work, store, params["devices"], params["duration"], params["fractions"], log=log)
           for store in ("sqlite", "redis")}
    # The same absolute rates as pushd with SQLite, so the rows compare line by line.
    rates = [x["offered_per_second"] for x in out["sqlite"]["rows"]]
    out["mosquitto"] = run_mosquitto(creds, work, rates, params["devices"], params["duration"], log=log)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=300)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--store", choices=["sqlite", "redis"])
    args = ap.parse_args()
    work, creds = common.setup()
    for store in ([args.store] if args.store else ["sqlite", "redis"]):
        run_store(creds, work, store, args.devices, args.duration)


if __name__ == "__main__":
    main()
