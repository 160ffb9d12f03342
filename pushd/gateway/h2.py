"""
HTTP/2 for the provider API, straight on the h2 state machine.

twisted.web's H2Connection makes a full web Request per stream (content-type parsing
through the email package, an access-log line, a priority tree for scheduling): profiled
under load that was three quarters of the gateway's time per push, and the provider API
has one request shape. This protocol turns frames into calls on the Root's ``answer`` and
answers back; every request body is bounded, the stream count is bounded by SETTINGS, and
an idle connection is closed with a GOAWAY.
"""

from __future__ import annotations

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
    RemoteSettingsChanged,
)
from h2.exceptions import H2Error, ProtocolError, StreamClosedError
from h2.settings import SettingCodes
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from pushd.gateway import hpackfast

hpackfast.install()

#: Streams a client may have open at once (APNs allows 1,000 after the first request).
MAX_STREAMS = 1000
#: Bytes of one request body kept; beyond this the body is counted, not stored.
MAX_BODY = 32 * 1024
#: After a GOAWAY for idleness, how long the close may take before the connection is aborted.
ABORT_AFTER = 15

# h2's inbound header validation (RFC 9113 8.2 rules, a sixth of the remaining cost) is off:
# the API reads six headers and validates each of them itself, and a malformed or missing
# one gets its APNs reason (BadPath, MissingTopic, ...), as before. Frames are still checked.
_CONFIG = H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=False,
                          validate_outbound_headers=False,
                          normalize_outbound_headers=False)


class _Stream:
    __slots__ = ("headers", "body", "size")

    def __init__(self, headers):
        self.headers = headers
        self.body = []
        self.size = 0


@implementer(IPushProducer)
class ProviderH2(Protocol, TimeoutMixin):
    log = Logger()

    def __init__(self, root, callLater, timeout, peer=""):
        self.root = root
        self.callLater = callLater
        self.idle_timeout = timeout
        self.peer = peer
        self.conn = H2Connection(_CONFIG)
        self.streams: dict = {}
        self.unsent: dict = {}  # stream id -> response body bytes waiting for window
        self._flush_scheduled = False
        self._abort = None
        self.closed = False

    def connectionMade(self):
        self.conn.initiate_connection()
        self.conn.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS})
        self.transport.registerProducer(self, True)
        self.setTimeout(self.idle_timeout)
        self.flush()

    def dataReceived(self, data):
        self.resetTimeout()
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as e:
            self.log.info("closing HTTP/2 connection from {peer}: {why}", peer=self.peer, why=str(e) or type(e).__name__)
            self.flush()  # h2 has queued a GOAWAY
            self.transport.loseConnection()
            return
        for event in events:
            kind = type(event)
            if kind is DataReceived:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                s = self.streams.get(event.stream_id)
                if s is not None:
                    s.size += len(event.data)
                    if s.size <= MAX_BODY:
                        s.body.append(event.data)
            elif kind is RequestReceived:
                self.streams[event.stream_id] = _Stream(event.headers)
            elif kind is StreamEnded:
                s = self.streams.pop(event.stream_id, None)
                if s is not None:
                    self._dispatch(event.stream_id, s)
            elif kind is StreamReset:
                self.streams.pop(event.stream_id, None)
                self.unsent.pop(event.stream_id, None)
            elif kind is WindowUpdated or kind is RemoteSettingsChanged:
                self._send_unsent()
            elif kind is ConnectionTerminated:
                self.flush()
                self.transport.loseConnection()
                return
        self.flush()

    def _dispatch(self, stream_id, s):
        headers = dict(s.headers)
        body = b"".join(s.body)
        answer = self.root.answer(headers.get(b":method"), headers.get(b":path", b""), headers.get, body,
                                  s.size > MAX_BODY, self.peer)
        if isinstance(answer, defer.Deferred):
            answer.addCallback(self._respond_later, stream_id)
        else:
            self._respond(stream_id, answer)

    def _respond_later(self, answer, stream_id):
        self._respond(stream_id, answer)
        if not self._flush_scheduled:
            # Answers that the store completes together leave in one write.
            self._flush_scheduled = True
            self.callLater(0, self.flush)

    def _respond(self, stream_id, answer):
        if self.closed:
            return
        headers = [(b":status", b"%d" % answer.status), *answer.headers]
        if answer.body:
            headers.append((b"content-length", b"%d" % len(answer.body)))
        try:
            self.conn.send_headers(stream_id, headers, end_stream=not answer.body)
        except (StreamClosedError, H2Error):
            return  # the client reset or gave up on the stream
        if answer.body:
            self.unsent[stream_id] = answer.body
            self._send_unsent()

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
            if rest:
                self.unsent[stream_id] = rest
            else:
                del self.unsent[stream_id]

    def flush(self):
        self._flush_scheduled = False
        data = self.conn.data_to_send()
        if data and not self.closed:
            self.transport.write(data)

    def timeoutConnection(self):
        self.log.info("closing idle HTTP/2 connection from {peer}", peer=self.peer)
        self.conn.close_connection(error_code=ErrorCodes.NO_ERROR)
        self.flush()
        self.transport.loseConnection()
        self._abort = self.callLater(ABORT_AFTER, self.transport.abortConnection)

    def connectionLost(self, reason):
        self.closed = True
        self.setTimeout(None)
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        self.streams.clear()
        self.unsent.clear()

    # The transport's buffer is full (the client does not read its answers): stop reading
    # requests until it drains, so nothing grows without bound.
    def pauseProducing(self):
        self.transport.pauseProducing()

    def resumeProducing(self):
        self.transport.resumeProducing()

    def stopProducing(self):
        pass
