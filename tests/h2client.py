"""A small HTTP/2 client for tests (the h2 package, over Twisted TLS), able to misbehave."""

from __future__ import annotations

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ConnectionTerminated, DataReceived, ResponseReceived, StreamEnded, StreamReset
from twisted.internet import defer, protocol, reactor, ssl


class Response:
    def __init__(self):
        self.status = None
        self.headers = {}
        self.body = b""
        self.reset = None

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
            elif isinstance(ev, DataReceived):
                self.responses[ev.stream_id].body += ev.data
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, (StreamEnded, StreamReset)):
                r = self.responses[ev.stream_id]
                if isinstance(ev, StreamReset):
                    r.reset = ev.error_code
                d = self.waiting.pop(ev.stream_id, None)
                if d is not None:
                    d.callback(r)
            elif isinstance(ev, ConnectionTerminated):
                self.terminated = ev
                for sid, d in list(self.waiting.items()):
                    if sid > (ev.last_stream_id or 0):
                        del self.waiting[sid]
                        d.errback(ConnectionError(f"GOAWAY {ev.error_code!r}"))
        self.flush()

    def connectionLost(self, reason):
        for d in self.waiting.values():
            d.errback(reason)
        self.waiting.clear()
        self.closed.callback(None)

    def request(self, path, headers=(), body=b"", method="POST", end=True):
        """Fire with a Response. ``end=False`` leaves the stream open (a stalled client)."""
        sid = self.conn.get_next_available_stream_id()
        hdrs = [(":method", method), (":scheme", "https"), (":authority", "localhost"), (":path", path)]
        hdrs += list(headers)
        self.conn.send_headers(sid, hdrs, end_stream=not body and end)
        if body:
            self.conn.send_data(sid, body, end_stream=end)
        self.responses[sid] = Response()
        d = self.waiting[sid] = defer.Deferred()
        self.flush()
        d.stream_id = sid
        return d

    def reset(self, stream_id):
        """Reset one of our streams; its request fires with ``reset == "local"``."""
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


def connect(port, ca_pem, alpn=True):
    """Fire with a connected H2Client; ``alpn=False`` offers no ALPN and relies on the preface."""
    client = H2Client()
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
