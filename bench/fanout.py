"""
Fan-out: how fast one server core delivers queued notifications to 10,000 connected TLS
devices that acknowledge each one.

pushd: the devices are connected with their topic filtered out, the provider API queues M
notifications for each (not timed), then every device sends its Filter and the gateway
drains its store into the connections, each Notification acked by NotificationAck and
deleted from the store on the ack. The clock runs from the Filters to the last delivery.

Mosquitto: the same devices subscribe to one topic each (QoS 1 with PUBACKs, or QoS 0), a
publisher sends M messages per topic as fast as the broker takes them, and the clock runs
from the first publish to the last delivery. Mosquitto's figure so includes taking the
messages in, which pushd's does not (its ingest is measured on its own).

    python -m bench.fanout --devices 2000 --messages 5
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import time

from bench import common, fleet

PAYLOAD = b'{"aps":{"alert":"fan-out"},"t":0,"pad":"xxxxxxxxxxxxxxxx"}'


def _wait_received(workers, total, timeout, log=print):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = workers.stats()
        if s["received"] >= total:
            return s
        time.sleep(0.2)
    s = workers.stats()
    log(f"  fan-out timed out: {s['received']} of {total} received")
    return s


def fill(creds, gateway, work, devices, messages, indices=None):
    """Queue `messages` notifications for each device through the provider API (h2load)."""
    indices = list(range(devices)) if indices is None else list(indices)
    devices = len(indices)
    if not devices:
        return
    uris = work / "fill-uris.txt"
    base = f"https://127.0.0.1:{gateway.provider_port}"
    uris.write_text("\n".join(f"{base}/3/device/{creds.device_token(common.device_id(i)).hex()}"
                              for i in indices) + "\n")
    body = work / "fill-payload.json"
    body.write_bytes(PAYLOAD)
    # Each client walks the URI list from the start: `messages` clients of `devices` requests
    # each give every device exactly `messages` notifications.
    argv = [shutil.which("h2load"), "-i", str(uris), "-n", str(devices * messages), "-c", str(messages),
            "-m", "32", "-d", str(body), "-H", f"authorization: bearer {creds.provider_key}",
            "-H", f"apns-topic: {common.TOPIC}", "-H", "apns-push-type: alert"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                         preexec_fn=common.pin(common.LOAD_CPUS)).stdout
    line = next((l for l in out.splitlines() if l.startswith("status codes:")), "")
    if f"{devices * messages} 2xx" not in line:
        raise RuntimeError(f"filling the store failed: {line or out[-500:]}")


def run_pushd(creds, work, devices=10_000, messages=5, store="memory", log=print, cpus=None, gateway_args=()):
    gw = common.Gateway(creds, work, store=store, name=f"fan-gw-{store.split(':')[0]}", cpus=cpus,
                        args=gateway_args).start()
    nworkers = max(2, math.ceil(devices / 10_000))
    workers = fleet.Workers(nworkers)
    try:
        part = fleet.slices(list(range(devices)), nworkers)
        workers.call("prepare", lambda k: {"kind": "pushd", "indices": part[k], "ports": [gw.courier_port],
                                           "ca_key": creds.ca_key_pem, "ca_cert": creds.ca_cert_pem,
                                           "registry": creds.registry})
        workers.call("connect", lambda k: {"concurrency": 64})
        fill(creds, gw, work, devices, messages)
        total = devices * messages
        load_pids = [p.pid for p in workers.procs]
        gw_pids = gw.pids
        cpu0, load0 = common.cpu_seconds(gw_pids), common.cpu_seconds(load_pids)
        t0 = time.time()
        workers.call("filter", lambda k: None)
        s = _wait_received(workers, total, 300, log)
        elapsed = s["last_receive"] - t0
        cpu = common.cpu_seconds(gw_pids) - cpu0
        load = common.cpu_seconds(load_pids) - load0
        kind = "Redis" if store.startswith("redis") else store.split(":")[0]
        row = {"server": f"pushd ({kind} store), acked", "devices": devices, "delivered": s["received"],
               "expected": total, "seconds": round(elapsed, 2),
               "per_second": round(s["received"] / elapsed), "server_cpu_seconds": round(cpu, 2),
               "per_cpu_second": round(s["received"] / cpu) if cpu else None,
               "load_cpu_share": round(load / elapsed, 2)}
        log(json.dumps(row))
        return row
    finally:
        workers.close()
        gw.stop()


def run_mosquitto(creds, work, devices=10_000, messages=5, qos=1, log=print):
    mq = common.Mosquitto(creds, work, name=f"fan-mq{qos}").start()
    nworkers = max(2, math.ceil(devices / 10_000))
    workers = fleet.Workers(nworkers)
    publisher = fleet.Workers(1)
    try:
        part = fleet.slices(list(range(devices)), nworkers)
        workers.call("prepare", lambda k: {"kind": "mqtt", "indices": part[k], "ports": [mq.port], "qos": qos})
        workers.call("connect", lambda k: {"concurrency": 64})
        total = devices * messages
        load_pids = [p.pid for p in workers.procs + publisher.procs]
        cpu0, load0 = common.cpu_seconds([mq.pid]), common.cpu_seconds(load_pids)
        t0 = time.time()
        pub = publisher.one(0, "publish", {"port": mq.port, "indices": list(range(devices)), "count": messages,
                                           "qos": qos, "payload_size": len(PAYLOAD)})
        s = _wait_received(workers, total, 300, log)
        elapsed = s["last_receive"] - t0
        cpu = common.cpu_seconds([mq.pid]) - cpu0
        load = common.cpu_seconds(load_pids) - load0
        row = {"server": f"Mosquitto QoS {qos}" + (", acked" if qos else ""), "devices": devices,
               "delivered": s["received"], "expected": total, "seconds": round(elapsed, 2),
               "per_second": round(s["received"] / elapsed), "server_cpu_seconds": round(cpu, 2),
               "per_cpu_second": round(s["received"] / cpu) if cpu else None,
               "load_cpu_share": round(load / elapsed, 2), "publish_seconds": round(pub["seconds"], 2)}
        log(json.dumps(row))
        return row
    finally:
        publisher.close()
        workers.close()
        mq.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=2000)
    ap.add_argument("--messages", type=int, default=5)
    ap.add_argument("--only", choices=["pushd", "mosquitto"])
    args = ap.parse_args()
    work, creds = common.setup()
    if args.only != "mosquitto":
        run_pushd(creds, work, args.devices, args.messages)
    if args.only != "pushd":
        run_mosquitto(creds, work, args.devices, args.messages, qos=1)
        run_mosquitto(creds, work, args.devices, args.messages, qos=0)


if __name__ == "__main__":
    main()
