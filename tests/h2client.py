"""A small HTTP/2 client for tests (the h2 package, over Twisted TLS), able to misbehave."""

from __future__ import annotations

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingAckReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from hyperframe.frame import PingFrame
from twisted.internet import defer, protocol, reactor, ssl


class Response:
    def __init__(self):
        self.status = None
        self.headers = {}
        self.body = b""
        self.reset = None
        self.data_frames = 0  # DATA events (a HEAD answer must have none)
        self.ended_on_headers = False  # END_STREAM came on the HEADERS frame

    @property
    def json(self):
        import json

        return json.loads(self.body) if self.body else None


class H2Client(protocol.Protocol):
    def __init__(self):
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.responses: dict = {}
        self.waiting: dict = {}
        self.closed = defer.Deferred()
        self.terminated = None
        self.settings = defer.Deferred()  # fires when the server's first SETTINGS arrived
        self.queued: list = []  # requests beyond the server's MAX_CONCURRENT_STREAMS, as clients queue them
        self.pings_acked = 0
        self.resets_received = []
        self.unsent: dict = {}  # stream id -> (body bytes waiting for flow-control window, end)

    def connectionMade(self):
        self.conn.initiate_connection()
        self.flush()

    def flush(self):
        data = self.conn.data_to_send()
        if data:
            self.transport.write(data)

    def dataReceived(self, data):
        for ev in self.conn.receive_data(data):
            if isinstance(ev, ResponseReceived):
                r = self.responses[ev.stream_id]
                r.headers = {k.decode(): v.decode() for k, v in ev.headers}
                r.status = int(r.headers[":status"])
                r.ended_on_headers = ev.stream_ended is not None
            elif isinstance(ev, DataReceived):
                r = self.responses[ev.stream_id]
                r.body += ev.data
                r.data_frames += 1
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, (StreamEnded, StreamReset)):
                r = self.responses[ev.stream_id]
                if isinstance(ev, StreamReset):
                    self.unsent.pop(ev.stream_id, None)
                    self.resets_received.append((ev.stream_id, ev.error_code))
                    if r.status is None or ev.stream_id in self.waiting:
                        r.reset = ev.error_code
                d = self.waiting.pop(ev.stream_id, None)
                if d is not None:
                    d.callback(r)
                self._send_queued()
            elif isinstance(ev, RemoteSettingsChanged):
                if not self.settings.called:
                    self.settings.callback(self)
                self._send_queued()
            elif isinstance(ev, WindowUpdated):
                self._send_bodies()
            elif isinstance(ev, PingAckReceived):
                self.pings_acked += 1
            elif isinstance(ev, ConnectionTerminated):
                self.terminated = ev
                for sid, d in list(self.waiting.items()):
                    if sid > (ev.last_stream_id or 0):
                        del self.waiting[sid]
                        d.errback(ConnectionError(f"GOAWAY {ev.error_code!r}"))
                self._fail_queued(ConnectionError(f"GOAWAY {ev.error_code!r}"))
        self.flush()

    def _fail_queued(self, why):
        """Requests never sent (no free stream before the connection ended) fail too."""
        queued, self.queued = self.queued, []
        for *_, d in queued:
            d.errback(why)

    def connectionLost(self, reason):
        for d in self.waiting.values():
            d.errback(reason)
        self.waiting.clear()
        self._fail_queued(reason)
        self.closed.callback(None)

    def request(self, path, headers=(), body=b"", method="POST", end=True):
        """
        Fire with a Response. ``end=False`` leaves the stream open (a stalled client). Beyond
        the server's MAX_CONCURRENT_STREAMS the request waits for a free stream (``stream_id``
        is set on the Deferred once it is sent).
        """
        d = defer.Deferred()
        self.queued.append((path, headers, body, method, end, d))
        self._send_queued()
        return d

    def _send_queued(self):
        if self.terminated is not None or self.conn.state_machine.state is ConnectionState.CLOSED:
            return  # a GOAWAY came (its event may not be handled yet): ConnectionTerminated fails them
        while self.queued and self.conn.open_outbound_streams < self.conn.remote_settings.max_concurrent_streams:
            path, headers, body, method, end, d = self.queued.pop(0)
            sid = self.conn.get_next_available_stream_id()
            hdrs = [(":method", method), (":scheme", "https"), (":authority", "localhost"), (":path", path)]
            hdrs += list(headers)
            self.conn.send_headers(sid, hdrs, end_stream=not body and end)
            if body:
                self.unsent[sid] = (body, end)
            self.responses[sid] = Response()
            self.waiting[sid] = d
            d.stream_id = sid
        self._send_bodies()

    def _send_bodies(self):
        """Request bodies as the server's flow-control windows allow."""
        for sid, (body, end) in list(self.unsent.items()):
            try:
                room = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            except ProtocolError:
                del self.unsent[sid]
                continue
            if room <= 0:
                continue
            chunk, rest = body[:room], body[room:]
            self.conn.send_data(sid, chunk, end_stream=end and not rest)
            if rest:
                self.unsent[sid] = (rest, end)
            else:
                del self.unsent[sid]
        self.flush()

    def ping(self):
        """A PING; after a GOAWAY (h2 refuses to send one then) the raw frame, as a stubborn client would."""
        try:
            self.conn.ping(b"12345678")
            self.flush()
        except ProtocolError:
            self.transport.write(PingFrame(0, opaque_data=b"12345678").serialize())

    def reset(self, stream_id):
        """Reset one of our streams; its request fires with ``reset == "local"``."""
        self.unsent.pop(stream_id, None)
        self.conn.reset_stream(stream_id)
        self.flush()
        r = self.responses[stream_id]
        r.reset = "local"
        d = self.waiting.pop(stream_id, None)
        if d is not None:
            d.callback(r)

    def close(self):
        self.transport.loseConnection()
        return self.closed


def until(predicate, timeout=10.0, step=0.005):
    """
    Fire once ``predicate()`` is true, looked at every ``step`` s on the reactor; fail after
    ``timeout`` s. For state that changes in another protocol over a real socket: a test
    waits for it, not for a fixed time (which a loaded machine overruns).
    """
    d = defer.Deferred()
    started = reactor.seconds()

    def check():
        if predicate():
            d.callback(None)
        elif reactor.seconds() - started > timeout:
            d.errback(AssertionError(f"not true within {timeout} s: {predicate}"))
        else:
            reactor.callLater(step, check)

    check()
    return d


def connect(port, ca_pem, alpn=True, client=None):
    """Fire with a connected H2Client (or ``client``); ``alpn=False`` offers no ALPN and
    relies on the preface."""
    client = client or H2Client()
    opts = ssl.optionsForClientTLS(
        "localhost", ssl.Certificate.loadPEM(ca_pem), acceptableProtocols=[b"h2"] if alpn else None
    )
    ready = defer.Deferred()
    f = protocol.ClientFactory.forProtocol(lambda: client)
    f.clientConnectionFailed = lambda c, reason: ready.errback(reason)
    orig = client.connectionMade

    def made():
        orig()
        ready.callback(client)

    client.connectionMade = made
    reactor.connectSSL("127.0.0.1", port, f, opts)
    return ready
