"""
What the shared Connect replay cache (pushd/store/redis_replay.py) costs, against a real
redis-server of its own (free loopback port, ``appendfsync always`` as a durable deployment
run it): one call's latency one at a time, calls a second 256 at a time with the gateway
CPU per call, and Redis memory per nonce (``INFO memory`` before and after).

    python -m bench.replay_cache [--nonces 20000] [--devices 2000]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import socket
import subprocess
import tempfile
import time

from twisted.internet import defer, reactor, task

from pushd.gateway.replay import nonce_key
from pushd.store.redis import RedisStore
from pushd.store.redis_replay import RedisReplayCache


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def used_memory(store):
    d = store._command(b"INFO", b"memory")
    return d.addCallback(lambda b: int(next(line for line in b.decode().split("\r\n")
                                            if line.startswith("used_memory:")).split(":")[1]))


@defer.inlineCallbacks
def measure(url, nonces, devices):
    store = RedisStore(url)
    for _ in range(100):  # until redis-server answers
        try:
            yield store._command(b"PING")
            break
        except Exception:
            yield task.deferLater(reactor, 0.05, lambda: None)
    now = time.time()
    cache = RedisReplayCache(store, "replay", 10 * nonces, 16)
    before = yield used_memory(store)
    ids = ["%032x" % i for i in range(devices)]
    one = []
    for i in range(2000):
        t = time.perf_counter()
        yield cache.seen(nonce_key(ids[i % devices], b"s%d" % i), now + 300, owner=ids[i % devices])
        one.append(time.perf_counter() - t)
    one.sort()
    c0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    for start in range(0, nonces, 256):
        yield defer.gatherResults([
            cache.seen(nonce_key(ids[i % devices], b"n%d" % i), now + 300, owner=ids[i % devices])
            for i in range(start, min(nonces, start + 256))])
    wall = time.perf_counter() - t0
    c1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = c1.ru_utime - c0.ru_utime + c1.ru_stime - c0.ru_stime
    after = yield used_memory(store)
    total = 2000 + nonces
    print(f"one at a time (2000 calls): p50 {one[1000] * 1e6:.0f} us, p99 {one[1980] * 1e6:.0f} us")
    print(f"{nonces} calls 256 at a time: {nonces / wall:.0f} a second, gateway CPU {cpu / nonces * 1e6:.0f} us a call")
    print(f"Redis memory: {after - before} bytes for {total} nonces of {devices} devices, "
          f"{(after - before) / total:.0f} bytes a nonce")
    yield store.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--nonces", type=int, default=20000)
    parser.add_argument("--devices", type=int, default=2000)
    args = parser.parse_args()
    port, work = free_port(), tempfile.mkdtemp(prefix="pushd-bench-redis-")
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--dir", work, "--appendonly", "yes", "--appendfsync", "always"],
                              stdout=subprocess.DEVNULL)
    try:
        failed = []
        d = measure(f"redis://127.0.0.1:{port}/0", args.nonces, args.devices)
        d.addErrback(failed.append)
        d.addBoth(lambda _: reactor.stop())
        reactor.run()
        if failed:
            failed[0].raiseException()
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
