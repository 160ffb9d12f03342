#!/usr/bin/env python3
"""
Memory per idle TLS connection: pushd's courier against Mosquitto, with the same load
generator, on loopback, in one run. Each client completes the TLS handshake and its
protocol's hello (pushd: Connect with a device certificate and signature, answered by
ConnectAck; MQTT 3.1.1: CONNECT, answered by CONNACK), then idles. The server's RSS before
and after, divided by the number of connections, is the figure.

    python bench/idle.py --connections 10000            # both, one after the other
    python bench/idle.py --connections 2000 --only pushd

Bounded: loopback only, a fixed count, every process it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives import serialization  # noqa: E402

from pushd import tls, wire  # noqa: E402


def raise_fd_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def wait_for(path: Path, text: str, proc, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {path.read_text() if path.exists() else ''}")
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.1)
    raise RuntimeError(f"server not ready: {path.read_text() if path.exists() else ''}")


# --- servers ---------------------------------------------------------------------------


def start_pushd(tmp: Path, port: int):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log = tmp / "gateway.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
         "-l", str(log), "pushd-gateway", "-d", str(tmp / "gateway"), "--store", "memory",
         "--courier", f"tls:{port}:interface=127.0.0.1:backlog=4096",
         "--provider", f"tls:{free_port()}:interface=127.0.0.1"],
        cwd=tmp, env=env, preexec_fn=raise_fd_limit,
    )
    wait_for(log, "Site (TLS) starting", proc)
    return proc


def start_mosquitto(tmp: Path, port: int, cert: Path, key: Path):
    conf = tmp / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\ncertfile {cert}\nkeyfile {key}\nallow_anonymous true\n"
        f"max_connections -1\npersistence false\nlog_dest file {tmp / 'mosquitto.log'}\n"
        "log_type error\nlog_type warning\nlog_type notice\n"
        # Started as root here: stay root, or it cannot read its files in our private temp dir.
        + ("user root\n" if os.geteuid() == 0 else "")
    )
    proc = subprocess.Popen([shutil.which("mosquitto"), "-c", str(conf)], preexec_fn=raise_fd_limit)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("mosquitto did not start")


# --- the load generator --------------------------------------------------------------------


def mqtt_connect(client_id: bytes) -> bytes:
    variable = b"\x00\x04MQTT\x04\x02" + struct.pack(">H", 600)
    payload = struct.pack(">H", len(client_id)) + client_id
    body = variable + payload
    return b"\x10" + bytes([len(body)]) + body  # remaining length < 128


async def one(kind, port, item, ctx, sem, held):
    async with sem:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
        if kind == "pushd":
            der, key_pem = item
            key = serialization.load_pem_private_key(key_pem, password=None)
            nonce = tls.make_nonce(time.time())
            writer.write(wire.Connect(certificate=der, nonce=nonce, signature=tls.sign_nonce(key, nonce),
                                      state=1, flags=0x41, protocol_version=11).encode())
            header = await reader.readexactly(5)
            command, length = wire.HEADER.unpack(header)
            body = await reader.readexactly(length)
            (frame,) = wire.FrameDecoder().feed(header + body)
            if wire.parse(frame).status != 0:
                raise RuntimeError("ConnectAck refused")
        else:
            writer.write(mqtt_connect(item))
            if await reader.readexactly(4) != b"\x20\x02\x00\x00":
                raise RuntimeError("CONNACK refused")
        held.append(writer)


async def run_worker(kind, port, items, connected, release):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if kind == "pushd":
        ctx.set_alpn_protocols(["apns-security-v3"])
    sem = asyncio.Semaphore(64)
    held = []
    results = await asyncio.gather(*(one(kind, port, it, ctx, sem, held) for it in items), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    connected.put((len(held), repr(errors[0]) if errors else None))
    await asyncio.get_running_loop().run_in_executor(None, release.wait)
    for w in held:
        w.transport.abort()


def worker(kind, port, items, connected, release):
    raise_fd_limit()
    asyncio.run(run_worker(kind, port, items, connected, release))


def measure(kind, proc_pid, port, items, workers):
    time.sleep(1.0)
    before = rss_kib(proc_pid)
    connected = multiprocessing.Queue()
    release = multiprocessing.Event()
    slices = [items[i::workers] for i in range(workers)]
    start = time.monotonic()
    procs = [multiprocessing.Process(target=worker, args=(kind, port, s, connected, release)) for s in slices]
    for p in procs:
        p.start()
    got = [connected.get(timeout=600) for _ in procs]
    elapsed = time.monotonic() - start
    n = sum(c for c, _ in got)
    errors = [e for _, e in got if e]
    time.sleep(3.0)  # let the server settle
    after = rss_kib(proc_pid)
    release.set()
    for p in procs:
        p.join(30)
    return {
        "server": kind,
        "connections": n,
        "errors": errors[:3],
        "connect_seconds": round(elapsed, 2),
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_connection": round((after - before) / n, 2) if n else None,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--only", choices=["pushd", "mosquitto"])
    args = ap.parse_args()
    if args.connections > 19000:
        ap.error("one server process holds at most ~19,500 sockets here (fd limit 20,000)")
    raise_fd_limit()
    tmp = Path(tempfile.mkdtemp(prefix="pushd-bench-"))
    results = []
    try:
        pki = tls.load_or_create_pki(tmp / "gateway", ["localhost", "127.0.0.1"])
        cert, key = tmp / "server.pem", tmp / "server.key"
        cert.write_bytes(tls.cert_pem(pki.server_cert) + tls.cert_pem(pki.ca_cert))
        key.write_bytes(tls.key_pem(pki.server_key))
        if args.only in (None, "pushd"):
            items = []
            for _ in range(args.connections):
                k = tls.new_key("ec")
                c = tls.issue_device_cert(pki.ca_key, pki.ca_cert, k.public_key())
                items.append((c.public_bytes(serialization.Encoding.DER), tls.key_pem(k)))
            port = free_port()
            proc = start_pushd(tmp, port)
            try:
                results.append(measure("pushd", proc.pid, port, items, args.workers))
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
        if args.only in (None, "mosquitto"):
            port = free_port()
            proc = start_mosquitto(tmp, port, cert, key)
            try:
                ids = [b"bench-%06d" % i for i in range(args.connections)]
                results.append(measure("mosquitto", proc.pid, port, ids, args.workers))
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for r in results:
        print(json.dumps(r))
    if len(results) == 2 and results[1]["kib_per_connection"]:
        print(json.dumps({"ratio_pushd_over_mosquitto": round(
            results[0]["kib_per_connection"] / results[1]["kib_per_connection"], 2)}))


if __name__ == "__main__":
    main()
