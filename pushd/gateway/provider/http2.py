"""
HTTP/2 for the provider API, straight on the h2 state machine: frames in, ``rules`` decides,
answers out.

twisted.web's H2Connection makes a full web Request per stream (content-type parsing
through the email package, an access-log line, a priority tree for scheduling): profiled
under load that was three quarters of the gateway's time per push, and the provider API
has one request shape.

Bounded before authenticated: a request's authorization is judged on its HEADERS, before
any body byte is kept; a connection has one stream until a valid provider token arrives on
it (as APNs does), then ``max_streams``; one without a valid token is closed at
``auth_deadline`` from its start or at its ``unauthenticated_requests``-th refused request; bodies of streams not yet dispatched are held
against the connection's flow-control window, which is reopened only as they are
dispatched, so they never exceed ``body_budget``; requests and resets per second are
bounded (CVE-2023-44487, rapid reset), and so are frames that carry no request bytes (the
2019 HTTP/2 floods: PING, SETTINGS, empty frames, ...); header blocks are bounded in bytes and
in time, and each body in time from its HEADERS.
Every way this protocol ends a connection unregisters it as the transport's producer
first: a TLS ``loseConnection`` waits for that.
"""

from __future__ import annotations

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import H2Error, StreamClosedError
from h2.settings import SettingCodes
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from pushd._lowlevel import h2 as lowlevel_h2
from pushd.gateway import hpackfast
from pushd.gateway.provider.limits import H2_INITIAL_WINDOW, EventLog, Limits
from pushd.gateway.provider.rules import Answer, Refused, duplicated

hpackfast.install()


def _check_h2_internals():
    """
    h2 bounds an unfinished header block only by its count of CONTINUATION frames (64, up to
    1 MiB); this protocol also bounds its bytes and age, reading the two attributes of h2's
    FrameBuffer that hold it. Checked at start-up, so that an h2 upgrade that renames them
    fails loudly instead of silently dropping the bound.
    """
    from h2.frame_buffer import FrameBuffer

    fb = FrameBuffer(server=True)
    if not isinstance(getattr(fb, "_headers_buffer", None), list) or not isinstance(getattr(fb, "_data", None), bytearray):
        raise ImportError("h2's FrameBuffer no longer has _headers_buffer/_data: update ProviderH2._check_header_block")


_check_h2_internals()

#: After a GOAWAY, how long the TLS close may take before the connection is aborted.
ABORT_AFTER = 15
#: The same after a hostile close (protocol error, too many requests or resets, late headers).
ABORT_HOSTILE = 2
#: Drain: how often a connection with requests under way looks again whether it is idle.
DRAIN_POLL = 0.05
_SHUTDOWN = b'{"reason":"Shutdown"}'
_DATA, _HEADERS, _CONTINUATION = 0x0, 0x1, 0x9
_END_STREAM, _PADDED = 0x1, 0x8
_PREFACE = 24  # b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_500 = Answer(500, [(b"content-type", b"application/json")], b'{"reason": "InternalServerError"}')

# h2's inbound header validation (RFC 9113 8.2 rules, a sixth of the remaining cost) is off:
# the API reads six headers and validates each of them itself, and a malformed or missing
# one gets its APNs reason (BadPath, MissingTopic, ...), as before. Frames are still checked.
_CONFIG = H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=False,
                          validate_outbound_headers=False,
                          normalize_outbound_headers=False)


class ControlFrames:
    """
    Counts the frames on the wire that carry no request bytes, from their 9-byte headers,
    before h2 parses them: h2 answers every PING and SETTINGS itself and takes RST_STREAM for
    a forgotten stream, ALTSVC and unknown frame types without an event, so its events would
    miss them. Counted: every frame but HEADERS, CONTINUATION and DATA, and of those the ones
    with an empty payload (a DATA that ends its stream excepted) and padded DATA.
    """

    __slots__ = ("skip", "head", "marks")

    def __init__(self):
        self.skip = _PREFACE  # payload bytes (or the preface) still to pass over
        self.head = b""  # a frame header cut by the end of the last read
        #: With ``mark``: where in the last read each request-carrying HEADERS frame ends.
        self.marks = []

    def count(self, data, mark: bool = False) -> int:
        n = len(data)
        control = 0
        marks = self.marks = []
        if self.head:
            take = 9 - len(self.head)
            head = self.head + data[:take]
            if len(head) < 9:
                self.head = head
                return 0
            self.head = b""
            control += _is_control(head, 0)
            pos = take + (head[0] << 16 | head[1] << 8 | head[2])
            if mark and head[3] == _HEADERS and pos > take:
                marks.append(pos)
        else:
            pos = self.skip
        while pos + 9 <= n:
            control += _is_control(data, pos)
            end = pos + 9 + (data[pos] << 16 | data[pos + 1] << 8 | data[pos + 2])
            if mark and data[pos + 3] == _HEADERS and end > pos + 9:
                marks.append(end)
            pos = end
        if pos < n:
            self.head = bytes(data[pos:])
            self.skip = 0
        else:
            self.skip = pos - n
        return control


def _is_control(b, i) -> bool:
    kind = b[i + 3]
    empty = not (b[i] or b[i + 1] or b[i + 2])
    if kind == _DATA:
        flags = b[i + 4]
        return bool(flags & _PADDED) or (empty and not flags & _END_STREAM)
    if kind == _HEADERS or kind == _CONTINUATION:
        return empty
    return True


class _Stream:
    """A request whose headers passed and whose body is coming in."""

    __slots__ = ("ticket", "body", "size", "held", "since")

    def __init__(self, ticket, since):
        self.ticket = ticket
        self.since = since  # its HEADERS: the body must be complete within body_deadline
        self.body = bytearray()  # one buffer: a body in 1-byte DATA frames costs no more than in one
        self.size = 0  # body bytes
        self.held = 0  # flow-controlled bytes not yet given back to the client's window


class Logs:
    """The hostile events one provider listener logs, each at most once a second."""

    def __init__(self, clock, log):
        self.protocol_error = EventLog(clock, log, "closing HTTP/2 connection from {peer}: {why}")
        self.calm = EventLog(clock, log, "GOAWAY ENHANCE_YOUR_CALM to {peer}: {why}")
        self.late = EventLog(clock, log, "closing provider connection from {peer}: {why}")
        self.idle = EventLog(clock, log, "closing idle HTTP/2 connection from {peer}")
        self.slow_body = EventLog(clock, log, "400 IdleTimeout to {peer}: {why}")
        self.unauthenticated = EventLog(clock, log, "closing provider connection without a valid token from {peer}: {why}")

    def stop(self):
        """Log what is counted and leave no timer (the listener stops)."""
        for event in vars(self).values():
            event.stop()


@implementer(IPushProducer)
class ProviderH2(Protocol):
    log = Logger()

    def __init__(self, api, clock, idle_timeout, limits: Limits = Limits(), logs: Logs | None = None,
                 peer="", started=None, source=None):
        self.api = api
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.limits = limits
        self.logs = logs or Logs(clock, self.log)
        self.peer = peer
        self.source = source  # the address key the API's per-address verification bucket counts
        self.started = clock.seconds() if started is None else started
        self.conn = H2Connection(_CONFIG)
        self.streams: dict = {}  # stream id -> _Stream, headers passed, body not yet complete
        self.unsent: dict = {}  # stream id -> response body bytes waiting for window
        self.early: set = set()  # answered before the client ended its request: reset once sent
        self.pending = 0  # dispatched, the answer not yet back from the store
        self.held = 0  # body bytes held for undispatched streams (the budget's counter)
        self.held_peak = 0
        self.stream_limit = 1
        self.authenticated = False
        self.refused = 0  # requests refused on their headers before a valid token
        self.requests = 0  # HEADERS received in the current one-second window
        self.resets = 0
        self.control = 0  # frames without request bytes in the current second
        self.frames = ControlFrames()
        self._second = self.started
        self.last_activity = self.started
        self._flush_scheduled = False
        self._idle_call = None
        self._deadline_call = None
        self._body_call = None
        self._auth_call = None
        self._drain_call = None
        self._abort = None
        self.headers_seen = False
        self.closing = False
        self.closed = False
        self.paused = False  # the transport has more than its buffer's worth of our output unsent

    # --- connection life ------------------------------------------------------

    def connectionMade(self):
        self.conn.initiate_connection()
        self.conn.update_settings({
            SettingCodes.MAX_CONCURRENT_STREAMS: 1,
            SettingCodes.MAX_HEADER_LIST_SIZE: self.limits.max_header_bytes,
        })
        self.transport.registerProducer(self, True)
        if self.idle_timeout:
            self._idle_call = self.clock.callLater(self.idle_timeout, self._idle_check)
        self._arm_deadline(self.started)
        delay = max(0.0, self.started + self.limits.auth_deadline - self.clock.seconds())
        self._auth_call = self.clock.callLater(delay, self._auth_late)
        self.flush()

    def dataReceived(self, data):
        if self.closing:
            return  # ended: nothing more is read, parsed or logged
        now = self.clock.seconds()
        if now - self._second >= 1.0:
            self._second, self.requests, self.resets, self.control = now, 0, 0, 0
        self.control += self.frames.count(data, not self.authenticated)
        if self.control > self.limits.control_frames_per_second:
            # Before h2 sees them: no PING or SETTINGS of this read is answered.
            self._hostile(self.logs.calm, ErrorCodes.ENHANCE_YOUR_CALM,
                          f"more than {self.limits.control_frames_per_second} control frames in a second")
            return
        marks, k = self.frames.marks, self.limits.unauthenticated_requests
        if not self.authenticated and len(marks) > k:
            # Before a valid token h2 parses (and HPACK-decodes) at most k requests of a read;
            # the rest only once one of those authenticated the connection. A rapid-reset
            # flood packed 64 KiB of HEADERS + RST_STREAM into each read, all of it parsed
            # before any limit could answer: 53% of a core, honest p99 266 ms (bench/abuse.py).
            cut = marks[k - 1]
            self._receive(data[:cut], now)
            if self.closing:
                return
            if not self.authenticated:
                self._hostile(self.logs.calm, ErrorCodes.ENHANCE_YOUR_CALM,
                              f"more than {k} requests in one read before a valid provider token")
                return
            data = data[cut:]
        self._receive(data, now)

    def _receive(self, data, now):
        try:
            events = self.conn.receive_data(data)
        except H2Error as e:
            self._hostile(self.logs.protocol_error, None, str(e) or type(e).__name__)
            return
        active = False
        for event in events:
            kind = type(event)
            if kind is DataReceived:
                active = True
                self._data(event)
            elif kind is RequestReceived:
                active = True
                self._request(event)
            elif kind is StreamEnded:
                s = self.streams.pop(event.stream_id, None)
                if s is not None:
                    self._release(event.stream_id, s)
                    self._dispatch(event.stream_id, s)
                else:
                    self.early.discard(event.stream_id)
            elif kind is StreamReset:
                self.resets += 1
                s = self.streams.pop(event.stream_id, None)
                if s is not None:
                    self._release(event.stream_id, s)
                self.unsent.pop(event.stream_id, None)
                self.early.discard(event.stream_id)
            elif kind is WindowUpdated or kind is RemoteSettingsChanged:
                self._send_unsent()
            elif kind is ConnectionTerminated:
                self._close(None)
                return
            if self.closing:
                return
        if self.requests > self.limits.requests_per_second:
            self._hostile(self.logs.calm, ErrorCodes.ENHANCE_YOUR_CALM,
                          f"more than {self.limits.requests_per_second} requests in a second")
            return
        if self.resets > self.limits.resets_per_second:
            self._hostile(self.logs.calm, ErrorCodes.ENHANCE_YOUR_CALM,
                          f"more than {self.limits.resets_per_second} stream resets in a second")
            return
        if active:
            self.last_activity = now
        self._check_header_block(now)
        if not self.closing:
            self.flush()

    def _check_header_block(self, now):
        """
        An unfinished header block (or frame header) is bounded in bytes and held to the
        deadline; so is an unfinished body before the connection has a valid token (enrolment).
        """
        buf = self.conn.incoming_buffer
        block = buf._headers_buffer
        partial = buf._data
        waiting = (bool(block) or (0 < len(partial) < 9) or (len(partial) >= 9 and partial[3] in (_HEADERS, _CONTINUATION))
                   or (not self.authenticated and bool(self.streams)))  # before a token, bodies too
        if waiting:
            size = len(partial) + sum(len(f.data) for f in block) if block else len(partial)
            if size > self.limits.max_header_bytes + 9:
                self._hostile(self.logs.calm, ErrorCodes.ENHANCE_YOUR_CALM,
                              f"a header block over {self.limits.max_header_bytes} bytes")
            elif self._deadline_call is None:
                self._arm_deadline(now)
        elif self.headers_seen and self._deadline_call is not None:
            self._deadline_call.cancel()
            self._deadline_call = None

    def _arm_deadline(self, since):
        delay = max(0.0, since + self.limits.header_deadline - self.clock.seconds())
        self._deadline_call = self.clock.callLater(delay, self._headers_late)

    def _headers_late(self):
        self._deadline_call = None
        self._hostile(self.logs.late, ErrorCodes.ENHANCE_YOUR_CALM,
                      f"request headers not complete within {self.limits.header_deadline:g} s")

    def _auth_late(self):
        """No valid token within auth_deadline of the start: refused requests do not keep a connection."""
        self._auth_call = None
        if self.closing or self.authenticated:
            return
        self.logs.unauthenticated(peer=self.peer, why=f"no valid token within {self.limits.auth_deadline:g} s")
        self._close(ErrorCodes.NO_ERROR, ABORT_HOSTILE, self._last_refusal)

    _last_refusal = b'{"reason":"MissingProviderToken"}'

    def _idle_check(self):
        self._idle_call = None
        if self.closing:
            return
        quiet = self.clock.seconds() - self.last_activity
        # An answer waiting for a window the client never opens does not keep it: only requests
        # and answer bytes the client takes count as activity (_send_unsent).
        if quiet >= self.idle_timeout and not self.pending:
            self.logs.idle(peer=self.peer)
            self._close(ErrorCodes.NO_ERROR, debug=b'{"reason":"IdleTimeout"}')
        else:
            self._idle_call = self.clock.callLater(max(self.idle_timeout - quiet, 0.1), self._idle_check)

    def _hostile(self, log, error_code, why):
        log(peer=self.peer, why=why)
        # From here on nothing is parsed or logged; reading goes on only so that the client's
        # TLS close_notify ends the connection at once (paused, it would wait for the abort).
        self._close(error_code, ABORT_HOSTILE)

    def _close(self, error_code, abort_after=ABORT_AFTER, debug=None):
        """GOAWAY (unless h2 has one queued already), then close: unregistered first, aborted if slow."""
        if self.closing:
            return
        self.closing = True
        if error_code is not None:
            try:
                self.conn.close_connection(error_code=error_code, additional_data=debug)
            except H2Error:
                pass
        self.flush()
        self._stop_timers()
        self.transport.unregisterProducer()
        self.transport.loseConnection()
        self._abort = self.clock.callLater(abort_after, self.transport.abortConnection)

    def drain(self):
        """
        The gateway stops: requests that come are answered 503 Shutdown (the router); once
        none is under way, GOAWAY (NO_ERROR, the last stream processed, debug data
        Shutdown) and the close; a request sent meanwhile has a higher stream id, so its
        client knows it was not processed (RFC 9113 6.8). One GOAWAY, sent only when idle,
        not a first one at once: an h2-based client (aioapns) fails on any frame after a
        GOAWAY, the answers of its requests under way included (h2 4.4's state machine).
        """
        if not self.closing and self._drain_call is None:
            self._drained()

    def _drained(self):
        self._drain_call = None
        if self.closing:
            return
        if self.pending or self.streams or self.unsent:
            self._drain_call = self.clock.callLater(DRAIN_POLL, self._drained)
            return
        self._close(ErrorCodes.NO_ERROR, debug=_SHUTDOWN)

    def _stop_timers(self):
        for name in ("_idle_call", "_deadline_call", "_body_call", "_auth_call", "_drain_call"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)

    def connectionLost(self, reason):
        self.closed = self.closing = True
        self._stop_timers()
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        self.streams.clear()
        self.unsent.clear()
        self.early.clear()
        self.held = 0
        lowlevel_h2.forget(self.conn)  # its one cycle: freed by refcount, not the collector

    # --- requests -------------------------------------------------------------

    def _request(self, event):
        sid = event.stream_id
        self.requests += 1
        self.headers_seen = True
        if len(self.streams) + self.pending + len(self.unsent) >= self.stream_limit:
            # More streams than advertised (a client that has not seen our SETTINGS yet): not processed.
            self.conn.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        raw = event.headers
        headers = dict(raw)
        dup = len(headers) != len(raw) and duplicated(raw)
        method = headers.get(b":method")
        try:
            t = self.api.head(method, headers.get(b":path", b""), headers.get, dup, self.peer, self.source)
        except Exception:
            self.log.failure("judging a request from {peer} failed", peer=self.peer)
            t = Refused(_500, False)
        if t.authenticated and not self.authenticated:
            self._authenticated()
        if type(t) is Refused:
            # Refused on its headers: no body byte of it is kept.
            self._respond(sid, t.answer, method == b"HEAD", event.stream_ended is None)
            if not self.authenticated:
                self._refused_unauthenticated(t.answer)
            return
        s = _Stream(t, self.clock.seconds())
        if event.stream_ended is not None:
            self._dispatch(sid, s)
        else:
            self.streams[sid] = s
            if self._body_call is None:
                self._arm_body_deadline()

    def _arm_body_deadline(self):
        """One timer for the oldest open body (streams are kept in the order their HEADERS came)."""
        for s in self.streams.values():
            delay = max(0.0, s.since + self.limits.body_deadline - self.clock.seconds())
            self._body_call = self.clock.callLater(delay, self._bodies_late)
            return

    def _bodies_late(self):
        """Bodies not complete in time: APNs' 400 IdleTimeout, reset, their budget given back."""
        self._body_call = None
        if self.closing:
            return
        now = self.clock.seconds()
        late = []
        for sid, s in self.streams.items():
            if now - s.since < self.limits.body_deadline - 1e-6:
                break
            late.append(sid)
        for sid in late:
            s = self.streams.pop(sid)
            self._release(sid, s)
            self._respond(sid, self.api.body_late(s.ticket), False, True)
            self.logs.slow_body(peer=self.peer,
                                why=f"a request body not complete within {self.limits.body_deadline:g} s")
        self._arm_body_deadline()
        self.flush()

    def _refused_unauthenticated(self, answer):
        """
        Each refused request before a valid token may have cost a signature verification (up
        to 1.1 ms): a few are a provider whose key just changed, more are an attack.
        """
        self.refused += 1
        if answer.body:
            self._last_refusal = answer.body  # APNs' JSON, the GOAWAY's debug data
        if self.refused >= self.limits.unauthenticated_requests:
            self.logs.unauthenticated(peer=self.peer, why=f"{self.refused} requests refused without a valid token")
            self._close(ErrorCodes.ENHANCE_YOUR_CALM, ABORT_HOSTILE, self._last_refusal)

    def _authenticated(self):
        """A valid provider token: the connection may use APNs' stream count and the full budget."""
        self.authenticated = True
        if self._auth_call is not None:
            if self._auth_call.active():
                self._auth_call.cancel()
            self._auth_call = None
        self.stream_limit = self.limits.max_streams
        self.conn.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: self.limits.max_streams})
        extra = self.limits.body_budget - H2_INITIAL_WINDOW
        if extra > 0:
            self.conn.increment_flow_control_window(extra)

    def _data(self, event):
        sid = event.stream_id
        s = self.streams.get(sid)
        if s is None:
            # A stream answered already (or refused): its data is dropped, its window given back.
            self._ack(event.flow_controlled_length, sid)
            return
        n = event.flow_controlled_length
        s.held += n
        self.held += n
        if self.held > self.held_peak:
            self.held_peak = self.held
        s.size += len(event.data)
        if s.size > s.ticket.limit:
            del self.streams[sid]
            self._release(sid, s)
            self._respond(sid, self._finish(s.ticket, b"", True), False, True)
            return
        s.body += event.data
        if self.held > self.limits.body_budget:
            # Flow control makes this impossible for a client that keeps to its window.
            self._hostile(self.logs.calm, ErrorCodes.FLOW_CONTROL_ERROR, "bodies over the connection's budget")

    def _release(self, sid, s):
        """The stream's body leaves the budget: reopen the client's window by as much."""
        if s.held:
            self.held -= s.held
            self._ack(s.held, sid)
            s.held = 0

    def _ack(self, n, sid):
        if n:
            try:
                self.conn.acknowledge_received_data(n, sid)
            except H2Error:
                pass

    def _finish(self, ticket, body, overflow):
        try:
            return self.api.finish(ticket, body, overflow)
        except Exception:
            self.log.failure("answering a request from {peer} failed", peer=self.peer)
            return _500

    def _dispatch(self, stream_id, s):
        answer = self._finish(s.ticket, bytes(s.body), False)
        if isinstance(answer, defer.Deferred):
            self.pending += 1
            answer.addCallback(self._respond_later, stream_id)
        else:
            self._respond(stream_id, answer)

    def _respond_later(self, answer, stream_id):
        self.pending -= 1
        self._respond(stream_id, answer)
        if not self._flush_scheduled:
            # Answers that the store completes together leave in one write.
            self._flush_scheduled = True
            self.clock.callLater(0, self.flush)

    def _respond(self, stream_id, answer, head=False, early=False):
        """HEADERS (END_STREAM when there is no body, or for HEAD), then the body as window allows."""
        if self.closing:
            return
        body = answer.body
        headers = [(b":status", b"%d" % answer.status), *answer.headers]
        if body and not head:
            headers.append((b"content-length", b"%d" % len(body)))
        else:
            body = b""
        try:
            self.conn.send_headers(stream_id, headers, end_stream=not body)
        except (StreamClosedError, H2Error):
            return  # the client reset or gave up on the stream
        if early:
            self.early.add(stream_id)
        if body:
            self.unsent[stream_id] = body
            self._send_unsent()
        elif early:
            self._reset_early(stream_id)

    def _reset_early(self, stream_id):
        """RFC 9113 8.1: the answer is complete before the request; ask the client to stop, no error."""
        if stream_id in self.early:
            self.early.discard(stream_id)
            try:
                self.conn.reset_stream(stream_id, ErrorCodes.NO_ERROR)
            except H2Error:
                pass

    def _send_unsent(self):
        for stream_id, body in list(self.unsent.items()):
            try:
                room = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
            except (StreamClosedError, H2Error):
                del self.unsent[stream_id]
                continue
            if room <= 0:
                continue
            chunk, rest = body[:room], body[room:]
            try:
                self.conn.send_data(stream_id, chunk, end_stream=not rest)
            except (StreamClosedError, H2Error):
                del self.unsent[stream_id]
                continue
            self.last_activity = self.clock.seconds()  # the client takes its answers
            if rest:
                self.unsent[stream_id] = rest
            else:
                del self.unsent[stream_id]
                if self.early:
                    self._reset_early(stream_id)

    def flush(self):
        self._flush_scheduled = False
        data = self.conn.data_to_send()
        if data and not self.closed:
            self.transport.write(data)

    # The transport's buffer is full (the client does not read its answers): stop reading
    # requests until it drains, so nothing grows without bound.
    def pauseProducing(self):
        self.paused = True
        self.transport.pauseProducing()

    def resumeProducing(self):
        self.paused = False
        if not self.closing:
            self.transport.resumeProducing()

    def stopProducing(self):
        pass
