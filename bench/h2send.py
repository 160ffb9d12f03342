#!/usr/bin/env python3
"""
An open-loop, paced HTTP/2 sender for latency measurement: ``POST /3/device/<token>`` at a
fixed total rate, spread over a few HTTP/2 connections (TLS, ALPN h2), round-robin over a
list of device tokens. Sends follow the schedule (every ~1 ms tick sends what is due by
then), never the responses: when answers lag, requests keep going out (open loop), so
response times are not hidden by coordinated omission. Each payload carries the wall-clock
send time and a sequence number, so a receiving device can compute end-to-end latency:

    {"aps":{"alert":"bench"},"t":<time.time() at send>,"n":<sequence>}

    python bench/h2send.py --port 2197 --authorization "bearer $KEY" --tokens-file tokens.txt \\
        --topic com.example.bench --rate 2000 --duration 10 --connections 4

Prints one JSON line at the end: sent, answered, status counts, response times (ms,
p50/p99/p999/max, measured from each request's scheduled time), achieved rate. It stops by
itself: after ``duration`` it waits at most ``drain`` seconds (<= 10) for the answers still
due, then closes. ``run(...)`` does the same from Python (returns the dict);
``run_in_process(...)`` runs it in a child process (``multiprocessing``), pinned if asked.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import ssl
import sys
import time

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import FlowControlError, ProtocolError, TooManyStreamsError

MAX_DRAIN = 10.0
TICK = 0.001


class _Conn(asyncio.Protocol):
    """One HTTP/2 connection: sends what the pacer hands it, records each answer."""

    def __init__(self, sender, index):
        self.sender = sender
        self.index = index
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.transport = None
        self.ready = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.waiting: collections.deque = collections.deque()  # (scheduled, seq, token) not yet sent
        self.inflight: dict = {}  # stream id -> [scheduled, seq, status]
        self.blocked: dict = {}  # stream id -> remaining body (flow control)
        self.dead = False

    # --- transport ---------------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        if transport.get_extra_info("ssl_object").selected_alpn_protocol() != "h2":
            self.ready.set_exception(ConnectionError("server did not select ALPN h2"))
            transport.close()
            return
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(2**30)  # never make the server wait on our window
        self.flush()
        self.ready.set_result(self)

    def flush(self):
        data = self.h2.data_to_send()
        if data and not self.dead:
            self.transport.write(data)

    def connection_lost(self, exc):
        self.dead = True
        s = self.sender
        for sid, (sched, seq, status) in self.inflight.items():
            s.statuses["conn_lost"] += 1
        if self.waiting:
            s.statuses["conn_lost_unsent"] += len(self.waiting)
        self.inflight.clear()
        self.waiting.clear()
        if not self.ready.done():
            self.ready.set_exception(exc or ConnectionError("closed"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data):
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as e:
            self.sender.statuses[f"protocol_error:{type(e).__name__}"] += 1
            self.transport.close()
            return
        now = time.perf_counter()
        for ev in events:
            if isinstance(ev, ResponseReceived):
                r = self.inflight.get(ev.stream_id)
                if r is not None:
                    for k, v in ev.headers:
                        if k == b":status":
                            r[2] = v.decode()
                            break
            elif isinstance(ev, DataReceived):
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, (StreamEnded, StreamReset)):
                r = self.inflight.pop(ev.stream_id, None)
                self.blocked.pop(ev.stream_id, None)
                if r is not None:
                    status = r[2] if isinstance(ev, StreamEnded) else f"reset:{ev.error_code!r}"
                    self.sender.answered(r[0], now, status or "no_status")
            elif isinstance(ev, WindowUpdated):
                self._unblock()
            elif isinstance(ev, RemoteSettingsChanged):
                self._unblock()
            elif isinstance(ev, ConnectionTerminated):
                self.sender.statuses[f"goaway:{ev.error_code!r}"] += 1
                self.dead = True
        self.pump()
        self.flush()

    # --- sending -----------------------------------------------------------------

    def enqueue(self, sched, seq, token):
        self.waiting.append((sched, seq, token))

    def pump(self):
        """Open streams for waiting requests as far as the server's stream limit allows."""
        if self.dead:
            return
        limit = self.h2.remote_settings.max_concurrent_streams
        s = self.sender
        while self.waiting and self.h2.open_outbound_streams < limit:
            sched, seq, token = self.waiting.popleft()
            sid = self.h2.get_next_available_stream_id()
            body = b'{"aps":{"alert":"bench"},"t":%.6f,"n":%d}' % (time.time(), seq)
            headers = [
                (b":method", b"POST"), (b":scheme", b"https"), (b":authority", s.authority),
                (b":path", b"/3/device/" + token),
                (b"authorization", s.authorization), (b"apns-topic", s.topic),
                (b"apns-push-type", b"alert"), (b"content-length", b"%d" % len(body)),
            ]
            try:
                self.h2.send_headers(sid, headers)
            except TooManyStreamsError:
                self.waiting.appendleft((sched, seq, token))
                break
            self.inflight[sid] = [sched, seq, None]
            s.sent += 1
            self._send_body(sid, body)

    def _send_body(self, sid, body):
        window = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
        if window >= len(body):
            self.h2.send_data(sid, body, end_stream=True)
            return
        if window > 0:
            self.h2.send_data(sid, body[:window])
            body = body[window:]
        self.blocked[sid] = body

    def _unblock(self):
        for sid in list(self.blocked):
            body = self.blocked.pop(sid)
            try:
                self._send_body(sid, body)
            except (FlowControlError, ProtocolError):
                self.blocked[sid] = body
                break

    def close(self):
        if not self.dead and self.transport is not None:
            try:
                self.h2.close_connection(ErrorCodes.NO_ERROR)
                self.flush()
            except ProtocolError:
                pass
            self.transport.close()


class Sender:
    def __init__(self, host, port, authorization, tokens, topic, rate, duration, connections, ca=None,
                 drain=MAX_DRAIN, server_name="localhost"):
        if not tokens:
            raise ValueError("no tokens")
        self.host, self.port = host, port
        self.authority = f"{server_name}:{port}".encode()
        self.authorization = authorization.encode() if isinstance(authorization, str) else authorization
        # Hex text on the path; raw 32-byte tokens are accepted too.
        self.tokens = [t.encode().lower() if isinstance(t, str) else (t.hex().encode() if len(t) == 32 else t)
                       for t in tokens]
        self.topic = topic.encode() if isinstance(topic, str) else topic
        self.rate, self.duration, self.connections = float(rate), float(duration), int(connections)
        self.drain = min(float(drain), MAX_DRAIN)
        self.ca, self.server_name = ca, server_name
        self.statuses: collections.Counter = collections.Counter()
        self.latencies: list = []
        self.sent = 0
        self.scheduled = 0
        self.done = 0

    def answered(self, sched, now, status):
        self.latencies.append(now - sched)
        self.statuses[status] += 1
        self.done += 1

    def _ssl(self):
        ctx = ssl.create_default_context(cafile=self.ca) if self.ca else ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if not self.ca:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        return ctx

    async def main(self) -> dict:
        loop = asyncio.get_running_loop()
        ctx = self._ssl()
        conns = []
        for i in range(self.connections):
            _, proto = await loop.create_connection(lambda i=i: _Conn(self, i), self.host, self.port, ssl=ctx,
                                                    server_hostname=self.server_name)
            await proto.ready
            conns.append(proto)
        # Let the server's SETTINGS arrive before the first burst.
        await asyncio.sleep(0.05)
        start = time.perf_counter()
        end = start + self.duration
        total = int(self.rate * self.duration)
        ntok, nconn = len(self.tokens), len(conns)
        while self.scheduled < total:
            now = time.perf_counter()
            due = min(total, int((now - start) * self.rate) + 1)
            touched = set()
            while self.scheduled < due:
                seq = self.scheduled
                c = conns[seq % nconn]
                if not c.dead:
                    c.enqueue(start + seq / self.rate, seq, self.tokens[seq % ntok])
                    touched.add(c)
                else:
                    self.statuses["conn_dead_unsent"] += 1
                self.scheduled += 1
            for c in touched:
                c.pump()
                c.flush()
            if self.scheduled >= total:
                break
            next_due = start + self.scheduled / self.rate
            delay = max(0.0, min(TICK, next_due - time.perf_counter()))
            await asyncio.sleep(delay)
        send_end = time.perf_counter()
        # Drain: what is still unanswered (or not even sent for lack of streams) gets `drain` s.
        deadline = max(end, send_end) + self.drain
        while time.perf_counter() < deadline and any(c.inflight or c.waiting for c in conns if not c.dead):
            await asyncio.sleep(0.01)
        unsent = sum(len(c.waiting) for c in conns)
        unanswered = sum(len(c.inflight) for c in conns)
        for c in conns:
            c.close()
        await asyncio.wait([c.closed for c in conns], timeout=2)
        self.latencies.sort()
        lat = self.latencies

        def pct(p):
            return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000, 3) if lat else None

        elapsed = send_end - start
        return {
            "scenario": "h2send",
            "target_rate": self.rate,
            "duration_s": self.duration,
            "connections": nconn,
            "scheduled": self.scheduled,
            "sent": self.sent,
            "answered": self.done,
            "unanswered_after_drain": unanswered,
            "unsent_after_drain": unsent,
            "statuses": dict(sorted(self.statuses.items())),
            "response_ms": {"p50": pct(50), "p99": pct(99), "p999": pct(99.9), "max": pct(100)},
            "achieved_rate": round(self.sent / elapsed, 1) if elapsed > 0 else None,
            "send_elapsed_s": round(elapsed, 3),
        }


def run(port, authorization, tokens, topic, rate, duration, connections=1, host="127.0.0.1", ca=None,
        drain=MAX_DRAIN, server_name="localhost") -> dict:
    """Send for ``duration`` s at ``rate``/s; return the summary dict (see module doc)."""
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    sender = Sender(host, port, authorization, tokens, topic, rate, duration, connections, ca, drain, server_name)
    return runner(sender.main())


def _child(kwargs, cpus, queue):
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        queue.put(run(**kwargs))
    except BaseException as e:  # report, do not hang the parent
        queue.put({"error": repr(e)})


def run_in_process(cpus=None, **kwargs) -> dict:
    """``run(**kwargs)`` in a child process (optionally pinned to ``cpus``); its result."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(kwargs, cpus, q), daemon=True)
    p.start()
    try:
        return q.get(timeout=float(kwargs["duration"]) + MAX_DRAIN + 30)
    finally:
        p.join(5)
        if p.is_alive():
            p.kill()


def read_tokens(path) -> list:
    with open(path) as f:
        return [line.strip().lower() for line in f if line.strip()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--server-name", default="localhost", help="TLS SNI / :authority host")
    p.add_argument("--authorization", required=True, help="the whole header value, e.g. 'bearer KEY'")
    p.add_argument("--tokens-file", required=True, help="device tokens in hex, one per line")
    p.add_argument("--topic", required=True)
    p.add_argument("--rate", type=float, required=True, help="requests per second, all connections together")
    p.add_argument("--duration", type=float, required=True, help="seconds of sending")
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--ca", help="verify the server against this CA (default: no verification)")
    p.add_argument("--drain", type=float, default=MAX_DRAIN, help=f"seconds to wait for late answers (<= {MAX_DRAIN:g})")
    o = p.parse_args(argv)
    result = run(o.port, o.authorization, read_tokens(o.tokens_file), o.topic, o.rate, o.duration,
                 o.connections, o.host, o.ca, o.drain, o.server_name)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
