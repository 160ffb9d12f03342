"""
The load generator's device side: worker processes (asyncio, uvloop where installed) each
holding a slice of TLS connections, as pushd devices or as MQTT subscribers, driven by the
benchmark driver through a pipe. The same code holds both kinds, so a difference measured
is the server's.

A pushd device does what a real one does: TLS with ALPN, Connect with its certificate and a
fresh ECDSA proof, Filter when told, and an ack for every Notification. An MQTT subscriber
CONNECTs, SUBSCRIBEs to its own topic at the QoS asked, and PUBACKs QoS 1 messages. Both
reconnect by themselves when asked to (the reconnect storm), and time-stamp what arrives
when the payload carries a send time ("t").
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import random
import ssl
import struct
import time

from cryptography.hazmat.primitives import serialization

from bench import common
from pushd import tls, wire

NOTIFICATION = wire.NOTIFICATION
HEADER = wire.HEADER
SAMPLE_LIMIT = 400_000  # latency samples kept per worker


def _source_ip(i: int) -> str:
    # Many loopback source addresses: 28k ephemeral ports each, so 100k+ connections fit.
    return f"127.0.{1 + (i // 250) % 250}.{2 + i % 250}"


class Stats:
    def __init__(self):
        self.received = 0
        self.duplicates = 0
        self.connects = 0
        self.last_connect = 0.0
        self.last_receive = 0.0
        self.first_receive = 0.0
        self.latencies: list[float] = []
        self.seen: set = set()


# --- pushd ---------------------------------------------------------------------------------


class PushdDevice(asyncio.Protocol):
    def __init__(self, fleet, index, der, key):
        self.fleet, self.index, self.der, self.key = fleet, index, der, key
        self.transport = None
        self.decoder = wire.FrameDecoder()
        self.ready = None

    def connection_made(self, transport):
        self.transport = transport
        nonce = tls.make_nonce(time.time())
        transport.write(wire.Connect(certificate=self.der, nonce=nonce, signature=tls.sign_nonce(self.key, nonce),
                                     state=1, flags=0x41, protocol_version=11).encode())

    def data_received(self, data):
        acks = []
        stats = self.fleet.stats
        for frame in self.decoder.feed(data):
            if frame.command == NOTIFICATION:
                msg = wire.parse(frame)
                acks.append(wire.NotificationAck(message_id=msg.message_id, status=0).encode())
                now = time.time()
                stats.received += 1
                stats.last_receive = now
                if not stats.first_receive:
                    stats.first_receive = now
                if self.fleet.check_duplicates:
                    key = (self.index, msg.message_id)
                    if key in stats.seen:
                        stats.duplicates += 1
                    stats.seen.add(key)
                if self.fleet.timestamps and len(stats.latencies) < SAMPLE_LIMIT:
                    try:
                        sent = json.loads(msg.payload)["t"]
                    except (ValueError, KeyError, TypeError):
                        sent = 0
                    if sent:  # 0: a payload from a closed-loop run, not a timed one
                        stats.latencies.append(now - sent)
            elif frame.command == wire.CONNECT_ACK:
                ack = wire.parse(frame)
                if ack.status != 0:
                    self.transport.abort()
                    if self.ready and not self.ready.done():
                        self.ready.set_exception(RuntimeError(f"ConnectAck status {ack.status}"))
                    return
                self.fleet.connected(self)
                if self.fleet.filter_on_connect:
                    self.send_filter()
                if self.ready and not self.ready.done():
                    self.ready.set_result(None)
        if acks:
            self.transport.write(b"".join(acks))

    def send_filter(self):
        self.transport.write(wire.Filter(enabled=[common.topic_hash()]).encode())

    def connection_lost(self, exc):
        self.fleet.lost(self, exc)
        if self.ready and not self.ready.done():
            self.ready.set_exception(ConnectionError(f"lost before ConnectAck: {exc!r}"))


# --- MQTT 3.1.1 ------------------------------------------------------------------------------


def _remaining(n: int) -> bytes:
    out = bytearray()
    while True:
        n, d = divmod(n, 128)
        out.append(d | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_connect(client_id: bytes, clean=True, keepalive=900) -> bytes:
    body = b"\x00\x04MQTT\x04" + bytes([0x02 if clean else 0x00]) + struct.pack(">H", keepalive)
    body += struct.pack(">H", len(client_id)) + client_id
    return b"\x10" + _remaining(len(body)) + body


def mqtt_subscribe(topic: bytes, qos: int, packet_id=1) -> bytes:
    body = struct.pack(">H", packet_id) + struct.pack(">H", len(topic)) + topic + bytes([qos])
    return b"\x82" + _remaining(len(body)) + body


def mqtt_publish(topic: bytes, payload: bytes, qos: int, packet_id=0) -> bytes:
    body = struct.pack(">H", len(topic)) + topic + (struct.pack(">H", packet_id) if qos else b"") + payload
    return bytes([0x30 | (qos << 1)]) + _remaining(len(body)) + body


class MqttStream(asyncio.Protocol):
    """Splits MQTT packets; subclasses handle them."""

    def __init__(self):
        self.buf = b""
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        buf = self.buf + data if self.buf else data
        pos, n = 0, len(buf)
        out = []
        while n - pos >= 2:
            first = buf[pos]
            length, mult, i = 0, 1, pos + 1
            while True:
                if i >= n:
                    self.buf = buf[pos:]
                    self._flush(out)
                    return
                b = buf[i]
                length += (b & 0x7F) * mult
                mult *= 128
                i += 1
                if not b & 0x80:
                    break
            if n - i < length:
                break
            self.packet(first, buf[i:i + length], out)
            pos = i + length
        self.buf = buf[pos:]
        self._flush(out)

    def _flush(self, out):
        if out:
            self.transport.write(b"".join(out))


class MqttSubscriber(MqttStream):
    def __init__(self, fleet, index, qos, clean):
        super().__init__()
        self.fleet, self.index, self.qos, self.clean = fleet, index, qos, clean
        self.ready = None
        self.topic = b"d/%d" % index

    def connection_made(self, transport):
        super().connection_made(transport)
        transport.write(mqtt_connect(b"bench-%d" % self.index, clean=self.clean)
                        + mqtt_subscribe(self.topic, self.qos))

    def packet(self, first, body, out):
        kind = first >> 4
        if kind == 3:  # PUBLISH
            qos = (first >> 1) & 3
            tlen = struct.unpack_from(">H", body)[0]
            pos = 2 + tlen
            if qos:
                out.append(b"\x40\x02" + body[pos:pos + 2])
                pos += 2
            stats = self.fleet.stats
            now = time.time()
            stats.received += 1
            stats.last_receive = now
            if not stats.first_receive:
                stats.first_receive = now
            if self.fleet.timestamps and len(stats.latencies) < SAMPLE_LIMIT:
                try:
                    sent = json.loads(body[pos:])["t"]
                except (ValueError, KeyError, TypeError):
                    sent = 0
                if sent:
                    stats.latencies.append(now - sent)
        elif kind == 9:  # SUBACK: subscribed, so ready
            self.fleet.connected(self)
            if self.ready and not self.ready.done():
                self.ready.set_result(None)
        elif kind == 2 and body[1] != 0:  # CONNACK refused
            self.transport.abort()

    def connection_lost(self, exc):
        self.fleet.lost(self, exc)
        if self.ready and not self.ready.done():
            self.ready.set_exception(ConnectionError(f"lost before SUBACK: {exc!r}"))


class MqttPublisher(MqttStream):
    """Publishes as fast as the broker takes it, at most `window` QoS 1 messages unacked."""

    def __init__(self, window=2000):
        super().__init__()
        self.window = window
        self.unacked = 0
        self.room = asyncio.Event()
        self.room.set()
        self.ready = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        super().connection_made(transport)
        transport.write(mqtt_connect(b"bench-publisher-%d" % os.getpid()))

    def packet(self, first, body, out):
        kind = first >> 4
        if kind == 2 and not self.ready.done():
            self.ready.set_result(None)
        elif kind == 4:  # PUBACK
            self.unacked -= 1
            if self.unacked < self.window:
                self.room.set()


# --- a worker's fleet ----------------------------------------------------------------------


class Fleet:
    def __init__(self):
        self.stats = Stats()
        self.protos: dict[int, asyncio.Protocol] = {}
        self.reconnect = False
        self.jitter = 1.0
        self.timestamps = False
        self.check_duplicates = False
        self.filter_on_connect = False
        self.errors: list[str] = []
        self.spec = None
        self.ctx = None
        self.loop = asyncio.get_running_loop()
        self.identities = {}

    def connected(self, proto):
        self.stats.connects += 1
        self.stats.last_connect = time.time()

    def lost(self, proto, exc):
        was_live, proto.alive = getattr(proto, "alive", False), False
        # Only an established connection redials from here; a failed dial retries in _redial.
        if was_live and self.reconnect and self.protos.get(proto.index) is proto:
            self.loop.call_later(random.uniform(0, self.jitter), lambda: self.loop.create_task(self._redial(proto.index)))

    def prepare(self, spec):
        """Device certificates are made before the clock starts (a device has its own)."""
        self.spec = spec
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        if spec["kind"] == "pushd":
            ctx.set_alpn_protocols(["apns-security-v3"])
            ca_key = tls.load_key(spec["ca_key"])
            from cryptography import x509

            ca_cert = x509.load_pem_x509_certificate(spec["ca_cert"])
            key = tls.new_key("ec")
            certs = [common.device_cert(ca_key, ca_cert, key.public_key(), i) for i in spec["indices"]]
            if spec.get("registry") and certs:
                common.register_devices(spec["registry"], certs)
            for i, cert in zip(spec["indices"], certs):
                self.identities[i] = (cert.public_bytes(serialization.Encoding.DER), key)
        self.ctx = ctx

    def _factory(self, i):
        spec = self.spec
        if spec["kind"] == "pushd":
            der, key = self.identities[i]
            return PushdDevice(self, i, der, key)
        return MqttSubscriber(self, i, spec.get("qos", 1), spec.get("clean", True))

    async def _dial(self, i):
        spec = self.spec
        proto = self._factory(i)
        proto.ready = self.loop.create_future()
        self.protos[i] = proto
        port = spec["ports"][i % len(spec["ports"])]
        await self.loop.create_connection(lambda: proto, "127.0.0.1", port, ssl=self.ctx,
                                          server_hostname="localhost", local_addr=(_source_ip(i), 0))
        await asyncio.wait_for(proto.ready, 60)
        proto.alive = True

    async def _redial(self, i):
        delay = 0.25
        while self.reconnect:
            try:
                await self._dial(i)
                return
            except Exception:
                await asyncio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 2.0)

    async def connect(self, concurrency=64):
        sem = asyncio.Semaphore(concurrency)

        async def one(i):
            async with sem:
                try:
                    await self._dial(i)
                except Exception as e:
                    self.errors.append(repr(e))

        start = time.time()
        await asyncio.gather(*(one(i) for i in self.spec["indices"]))
        return {"connected": self.count_live(), "seconds": time.time() - start, "errors": self.errors[:3],
                "error_count": len(self.errors)}

    def count_live(self):
        return sum(1 for p in self.protos.values() if getattr(p, "alive", False) and not p.transport.is_closing())

    def send_filter(self):
        for p in self.protos.values():
            if p.transport is not None and not p.transport.is_closing():
                p.send_filter()

    async def publish(self, port, indices, count, qos, payload_size=64, window=2000, rate=None):
        """Publish `count` messages to each subscriber topic in `indices` (round robin)."""
        pub = MqttPublisher(window)
        await self.loop.create_connection(lambda: pub, "127.0.0.1", port, ssl=self.ctx, server_hostname="localhost")
        await pub.ready
        pad = b"x" * max(0, payload_size - 40)
        packet_id = 0
        sent = 0
        start = time.time()
        topics = [b"d/%d" % i for i in indices]
        for _ in range(count):
            chunk = []
            for t in topics:
                packet_id = packet_id % 65535 + 1
                body = b'{"t":%.6f,"p":"%s"}' % (time.time(), pad)
                chunk.append(mqtt_publish(t, body, qos, packet_id))
                sent += 1
                if qos:
                    pub.unacked += 1
                if len(chunk) >= 200:
                    pub.transport.write(b"".join(chunk))
                    chunk = []
                    if qos and pub.unacked >= pub.window:
                        pub.room.clear()
                        await pub.room.wait()
                    elif pub.transport.get_write_buffer_size() > 1 << 20:
                        await asyncio.sleep(0.001)
            if chunk:
                pub.transport.write(b"".join(chunk))
        while qos and pub.unacked > 0:
            pub.room.clear()
            await asyncio.wait_for(pub.room.wait(), 120)
        elapsed = time.time() - start
        pub.transport.close()
        return {"published": sent, "seconds": elapsed}

    async def publish_paced(self, port, indices, rate, duration, qos=1, payload_size=64):
        """Open loop: `rate` messages/s for `duration` s, round robin over the topics, each
        stamped with its send time; what is due goes out every millisecond."""
        pub = MqttPublisher(window=1 << 30)
        await self.loop.create_connection(lambda: pub, "127.0.0.1", port, ssl=self.ctx, server_hostname="localhost")
        await pub.ready
        pad = b"x" * max(0, payload_size - 40)
        topics = [b"d/%d" % i for i in indices]
        total = int(rate * duration)
        sent = 0
        start = time.perf_counter()
        while sent < total:
            due = min(total, int((time.perf_counter() - start) * rate) + 1)
            chunk = []
            while sent < due:
                body = b'{"t":%.6f,"p":"%s"}' % (time.time(), pad)
                chunk.append(mqtt_publish(topics[sent % len(topics)], body, qos, sent % 65535 + 1))
                sent += 1
            if chunk:
                pub.unacked += len(chunk) if qos else 0
                pub.transport.write(b"".join(chunk))
            await asyncio.sleep(0.001)
        elapsed = time.perf_counter() - start
        deadline = time.monotonic() + 10
        while qos and pub.unacked > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        pub.transport.close()
        return {"published": sent, "seconds": elapsed, "rate": sent / elapsed if elapsed else None}

    def close(self):
        self.reconnect = False
        for p in self.protos.values():
            if p.transport is not None:
                p.transport.abort()


async def _serve(conn):
    loop = asyncio.get_running_loop()
    fleet = Fleet()
    while True:
        # A blocking read in a thread: the pipe must stay blocking (a large message would
        # be read half if an event loop made it non-blocking).
        cmd, args = await loop.run_in_executor(None, conn.recv)
        try:
            if cmd == "prepare":
                fleet.prepare(args)
                result = len(fleet.identities) or len(args["indices"])
            elif cmd == "connect":
                fleet.reconnect = args.get("reconnect", False)
                fleet.jitter = args.get("jitter", 1.0)
                fleet.filter_on_connect = args.get("filter", False)
                result = await fleet.connect(args.get("concurrency", 64))
            elif cmd == "options":
                for k, v in args.items():
                    setattr(fleet, k, v)
                result = True
            elif cmd == "filter":
                fleet.send_filter()
                result = time.time()
            elif cmd == "reset":
                fleet.stats = Stats()
                result = True
            elif cmd == "stats":
                s = fleet.stats
                result = {"received": s.received, "duplicates": s.duplicates, "connects": s.connects,
                          "live": fleet.count_live(), "first_receive": s.first_receive,
                          "last_receive": s.last_receive, "last_connect": s.last_connect,
                          "latencies": s.latencies if args else []}
            elif cmd == "publish":
                fleet.prepare({"kind": "mqtt", "indices": []})
                result = await fleet.publish(**args)
            elif cmd == "publish_paced":
                fleet.prepare({"kind": "mqtt", "indices": []})
                result = await fleet.publish_paced(**args)
            elif cmd == "close":
                fleet.close()
                conn.send(("ok", True))
                return
            else:
                raise ValueError(cmd)
            conn.send(("ok", result))
        except Exception as e:  # reported to the driver, which fails the scenario
            conn.send(("error", repr(e)))


def _worker(conn, cpus):
    common.raise_fd_limit()
    os.sched_setaffinity(0, cpus)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_serve(conn))


class Workers:
    """The driver's handle on a set of fleet worker processes."""

    def __init__(self, n, cpus=None):
        ctx = multiprocessing.get_context("fork")
        self.conns, self.procs = [], []
        for _ in range(n):
            a, b = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(b, cpus or common.LOAD_CPUS), daemon=True)
            p.start()
            self.conns.append(a)
            self.procs.append(p)

    def call(self, cmd, args_for, timeout=600.0):
        """Send a command to every worker (args_for(k) gives worker k's arguments); gather replies."""
        for k, c in enumerate(self.conns):
            c.send((cmd, args_for(k)))
        results = []
        deadline = time.monotonic() + timeout
        for c in self.conns:
            if not c.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"fleet worker did not answer {cmd} in {timeout} s")
            status, value = c.recv()
            if status != "ok":
                raise RuntimeError(f"fleet worker failed {cmd}: {value}")
            results.append(value)
        return results

    def one(self, k, cmd, args, timeout=600.0):
        c = self.conns[k]
        c.send((cmd, args))
        if not c.poll(timeout):
            raise TimeoutError(f"fleet worker did not answer {cmd} in {timeout} s")
        status, value = c.recv()
        if status != "ok":
            raise RuntimeError(f"fleet worker failed {cmd}: {value}")
        return value

    def stats(self, latencies=False):
        rs = self.call("stats", lambda k: latencies)
        total = {k: sum(r[k] for r in rs) for k in ("received", "duplicates", "connects", "live")}
        firsts = [r["first_receive"] for r in rs if r["first_receive"]]
        total["first_receive"] = min(firsts) if firsts else 0.0
        total["last_receive"] = max(r["last_receive"] for r in rs)
        total["last_connect"] = max(r["last_connect"] for r in rs)
        if latencies:
            total["latencies"] = [x for r in rs for x in r["latencies"]]
        return total

    def close(self):
        try:
            self.call("close", lambda k: None, timeout=60)
        except Exception:
            pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()


def slices(indices, n):
    return [indices[k::n] for k in range(n)]
