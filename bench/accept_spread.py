"""
How a connection storm spreads over N worker processes sharing one port, two ways:

  reuseport  each worker opens its own socket with SO_REUSEPORT (what --workers does):
             the kernel picks a worker by a hash of the connection's addresses and ports;
  inherited  one socket opened by the parent, inherited by every worker (adoptStreamPort):
             all workers wait on the same accept queue, whoever wakes first takes what is there.

Each worker is a Twisted reactor with Twisted's own listening Port (its accept loop), and
spends ``--work`` ms of CPU per accepted connection (a TLS handshake's order of cost) and
keeps the connection open, as a device's. ``--busy`` makes worker 1 also burn that share of
its time (a worker delivering a fan-out while the storm arrives). The client opens
``--connections`` as fast as it can (``--concurrency`` in flight), from many loopback
source addresses, and each worker reports how many it accepted.

    python -m bench.accept_spread --mode reuseport --connections 4000
    python -m bench.accept_spread --mode inherited --connections 4000 --busy 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

WORKER = r"""
import json, os, socket, sys, time
from twisted.internet import reactor, protocol, task
mode, fd, port, work, busy = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
count = [0]
last = [0.0]
held = []
class P(protocol.Protocol):
    def connectionMade(self):
        count[0] += 1
        last[0] = time.time()
        end = time.perf_counter() + work / 1000
        while time.perf_counter() < end:
            pass
        held.append(self)
f = protocol.Factory.forProtocol(P)
if mode == "reuseport":
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", port)); s.listen(1024); s.setblocking(False)
    reactor.adoptStreamPort(s.fileno(), socket.AF_INET, f); s.close()
else:
    reactor.adoptStreamPort(fd, socket.AF_INET, f)
if busy:
    def spin():
        end = time.perf_counter() + 0.01 * busy
        while time.perf_counter() < end:
            pass
    task.LoopingCall(spin).start(0.01)
import signal
def report():
    t = os.times()
    print(json.dumps([count[0], last[0], t.user + t.system - cpu0]), flush=True)
signal.signal(signal.SIGUSR1, lambda *a: reactor.callFromThread(report))
t = os.times()
cpu0 = t.user + t.system
print("ready", flush=True)
reactor.run()
"""


async def storm(port, n, concurrency):
    sem = asyncio.Semaphore(concurrency)
    writers = []

    async def one(i):
        async with sem:
            _, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(f"127.0.{1 + i // 250 % 250}.{2 + i % 250}", 0))
            writers.append(w)

    await asyncio.gather(*(one(i) for i in range(n)))
    return writers


def run(mode, workers, n, concurrency, work, busy):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    shared = None
    fds = ()
    if mode == "inherited":
        shared = socket.socket()
        shared.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        shared.bind(("127.0.0.1", port))
        shared.listen(1024)
        shared.setblocking(False)
        fds = (shared.fileno(),)
    procs = []
    for i in range(workers):
        procs.append(subprocess.Popen(
            [sys.executable, "-c", WORKER, mode, str(fds[0] if fds else -1), str(port), str(work),
             str(busy if i == 0 else 0)], stdout=subprocess.PIPE, text=True, pass_fds=fds))
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    if shared is not None:
        shared.close()  # the workers hold it now
    t0 = time.time()
    writers = asyncio.run(storm(port, n, concurrency))
    reports = [[0, 0.0, 0.0]] * workers
    deadline = time.monotonic() + 30
    while sum(r[0] for r in reports) < n and time.monotonic() < deadline:
        time.sleep(0.2)
        for p in procs:
            p.send_signal(signal.SIGUSR1)
        reports = [json.loads(p.stdout.readline()) for p in procs]
    counts = [r[0] for r in reports]
    for p in procs:
        p.kill()
        p.wait()
    return {"mode": mode, "workers": workers, "connections": n, "work_ms": work, "busy": busy,
            "all_accepted_s": round(max(r[1] for r in reports) - t0, 2), "per_worker": counts,
            "worker_cpu_s": [round(r[2], 2) for r in reports]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--mode", choices=["reuseport", "inherited"], default="reuseport")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--connections", type=int, default=4000)
    ap.add_argument("--concurrency", type=int, default=200)
    ap.add_argument("--work", type=float, default=1.0, help="CPU ms per accepted connection")
    ap.add_argument("--busy", type=float, default=0.0, help="share of worker 1's time spent on other work")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, a.connections + 1000)), hard))
    for _ in range(a.runs):
        print(json.dumps(run(a.mode, a.workers, a.connections, a.concurrency, a.work, a.busy)), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
