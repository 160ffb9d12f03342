"""
The provider API: ``POST /3/device/<hex token>`` as APNs defines it, over HTTPS (HTTP/2
by ALPN or by its preface, HTTP/1.1), authorised by an ES256 JWT (``auth.py``).
"""

from __future__ import annotations

import json
import os
import uuid
from typing import NamedTuple

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import http, resource, server

from pushd import wire
from pushd.gateway.h2 import ProviderH2  # at start-up: it builds its HPACK tables on import
from pushd.gateway.router import Rejected

#: Bytes of request body kept at most; beyond this the body is discarded unread.
MAX_BODY = 64 * 1024
PUSH_TYPES = {
    b"alert", b"background", b"voip", b"complication", b"fileprovider",
    b"mdm", b"location", b"liveactivity", b"pushtotalk", b"widgets", b"controls",
}


class BoundedRequest(server.Request):
    """A request whose body is kept up to MAX_BODY bytes; the rest is counted, not stored."""

    body_overflow = False
    _body_seen = 0

    def handleContentChunk(self, data):
        self._body_seen += len(data)
        if self._body_seen > MAX_BODY:
            self.body_overflow = True
            return
        server.Request.handleContentChunk(self, data)


class _Ids:
    """apns-ids (random UUIDs) from one urandom read per 256: uuid4() was a tenth of a push's cost."""

    def __init__(self):
        self.buf = b""
        self.pos = 0

    def new(self) -> tuple:
        if self.pos >= len(self.buf):
            self.buf, self.pos = os.urandom(16 * 256), 0
        b = bytearray(self.buf[self.pos:self.pos + 16])
        self.pos += 16
        b[6] = b[6] & 0x0F | 0x40  # version 4
        b[8] = b[8] & 0x3F | 0x80  # RFC 4122 variant
        h = b.hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}", bytes(b)


new_apns_id = _Ids().new


class Answer(NamedTuple):
    """A response, whatever HTTP version carries it."""

    status: int
    headers: list
    body: bytes


def _answer(status: int, apns_id: str, reason: str | None = None, **extra) -> Answer:
    headers = [(b"apns-id", apns_id.encode())]
    if reason is None:
        return Answer(status, headers, b"")
    headers.append((b"content-type", b"application/json"))
    return Answer(status, headers, json.dumps({"reason": reason, **extra}).encode())


def _status_and_headers(request, answer: Answer) -> bytes:
    request.defaultContentType = None
    request.setResponseCode(answer.status)
    for name, value in answer.headers:
        request.setHeader(name, value)
    return answer.body


def _write(answer: Answer, request) -> None:
    if not request._disconnected:
        request.write(_status_and_headers(request, answer))
        request.finish()


def render(request, answer):
    """An Answer (or a Deferred of one) onto a twisted.web request."""
    if isinstance(answer, defer.Deferred):
        answer.addCallback(_write, request)
        return server.NOT_DONE_YET
    return _status_and_headers(request, answer)


class DeviceAPI:
    """``POST /3/device/<token>``, whatever HTTP version carries it (Root routes here)."""

    log = Logger()

    def __init__(self, router, auth, token_limit=None, team_limit=None):
        self.router = router
        self.auth = auth
        self.token_limit = token_limit
        self.team_limit = team_limit

    def answer(self, method: bytes, path: bytes, header, payload: bytes, overflow: bool):
        """
        One push request: an Answer now, or a Deferred of one once the store has it.
        ``header(name)`` gives a request header's value (lower-case name) or None.
        """
        raw_id = header(b"apns-id")
        if raw_id is None:
            apns_id, id_bytes = new_apns_id()
        else:
            try:
                given = uuid.UUID(raw_id.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                return _answer(400, new_apns_id()[0], "BadMessageId")
            apns_id, id_bytes = str(given), given.bytes
        if method != b"POST":
            return _answer(405, apns_id, "MethodNotAllowed")
        try:
            team = self.auth.authenticate(header(b"authorization"))
            token, topic, fields = self.parse(path, header, payload, overflow)
            if not self.auth.allowed(team, topic):
                raise Rejected(403, "TopicDisallowed")
            if self.team_limit is not None and not self.team_limit.allow(team):
                raise Rejected(429, "TooManyRequests")
            if self.token_limit is not None and not self.token_limit.allow(token):
                raise Rejected(429, "TooManyRequests")
        except Rejected as e:
            return _answer(e.status, apns_id, e.reason, **e.extra)
        d = self.router.accept(token, topic, apns_id=id_bytes, **fields)
        return d.addCallbacks(lambda _: _answer(200, apns_id), self._failed, errbackArgs=(apns_id,))

    def _failed(self, failure, apns_id):
        if failure.check(Rejected):
            e = failure.value
            return _answer(e.status, apns_id, e.reason, **e.extra)
        self.log.failure("accepting {apns_id} failed", failure, apns_id=apns_id)
        return _answer(500, apns_id, "InternalServerError")

    def parse(self, path, header, payload, overflow):
        parts = path.split(b"/")
        if len(parts) != 4 or parts[1:3] != [b"3", b"device"]:
            raise Rejected(404, "BadPath")
        try:
            token = bytes.fromhex(parts[3].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise Rejected(400, "BadDeviceToken")
        if not token:
            raise Rejected(400, "MissingDeviceToken")
        topic = header(b"apns-topic")
        if not topic:
            raise Rejected(400, "MissingTopic")
        try:
            topic = topic.decode("ascii")
        except UnicodeDecodeError:
            raise Rejected(400, "BadTopic")
        push_type = header(b"apns-push-type") or b"alert"
        if push_type not in PUSH_TYPES:
            raise Rejected(400, "InvalidPushType")
        fields = {}
        raw = header(b"apns-expiration")
        if raw is not None:
            try:
                fields["expiry"] = int(raw)
            except ValueError:
                raise Rejected(400, "BadExpirationDate")
            if fields["expiry"] < 0 or fields["expiry"] >= 2**32:
                raise Rejected(400, "BadExpirationDate")
        else:
            # APNs stores a notification without apns-expiration for a while; keep 30 days.
            fields["expiry"] = int(self.router.now()) + 30 * 86400
        raw = header(b"apns-priority")
        if raw is not None:
            if raw not in (b"10", b"5", b"1"):
                raise Rejected(400, "BadPriority")
            fields["priority"] = int(raw)
        raw = header(b"apns-collapse-id")
        if raw is not None:
            if len(raw) > 64:
                raise Rejected(400, "BadCollapseId")
            fields["collapse_id"] = raw.decode("utf-8", "replace")
        limit = wire.MAX_PAYLOAD_VOIP if push_type == b"voip" else wire.MAX_PAYLOAD
        if overflow or len(payload) > limit:
            raise Rejected(413, "PayloadTooLarge")
        if not payload.strip():
            raise Rejected(400, "PayloadEmpty")
        try:
            if not isinstance(json.loads(payload), dict):
                raise ValueError
        except ValueError:
            raise Rejected(400, "BadPayload")
        fields["payload"] = payload
        return token, topic, fields


class Root(resource.Resource):
    """Routes by path itself, so that unknown paths get APNs' 404 BadPath, not an HTML page."""

    isLeaf = True

    def __init__(self, device, enrol=None):
        super().__init__()
        self.device = device
        self.enrol = enrol

    def render(self, request):
        body = request.content.read()
        return render(request, self.answer(request.method, request.path, request.getHeader, body,
                                           getattr(request, "body_overflow", False), str(request.getClientAddress())))

    def answer(self, method, path, header, body, overflow, peer):
        if path.startswith(b"/3/device/"):
            return self.device.answer(method, path, header, body, overflow)
        if self.enrol is not None and path == b"/pushd/v1/enrol":
            if method != b"POST":
                return Answer(405, [(b"content-type", b"application/json")], b'{"reason": "MethodNotAllowed"}')
            status, out = self.enrol.answer(body, overflow, peer)
            return Answer(status, [(b"content-type", b"application/json")], out)
        return _answer(404, new_apns_id()[0], "BadPath")


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class PrefaceSniffingChannel(http._GenericHTTPChannelProtocol):
    """
    HTTP/1.1 stays with twisted.web; HTTP/2 goes to pushd.gateway.h2. HTTP/2 is chosen by
    ALPN h2, or, as APNs also accepts from a client that offers no ALPN (aioapns), by the
    connection opening with the HTTP/2 preface: so look at the first 24 bytes.
    """

    _sniffed = b""

    def dataReceived(self, data):
        if self._negotiatedProtocol is None:
            if getattr(self._channel.transport, "negotiatedProtocol", None) == b"h2":
                self._switch_to_h2()
            else:
                self._sniffed += data
                if len(self._sniffed) < len(H2_PREFACE) and H2_PREFACE.startswith(self._sniffed):
                    return  # could still be the preface
                data, self._sniffed = self._sniffed, b""
                if data.startswith(H2_PREFACE):
                    self._switch_to_h2()
        return super().dataReceived(data)

    def _switch_to_h2(self):
        http_channel = self._channel
        http_channel._networkProducer.unregisterProducer()
        http_channel.setTimeout(None)
        transport = http_channel.transport
        self._channel = ProviderH2(self._site.resource, self._callLater, self._timeOut, str(transport.getPeer()))
        self._channel.makeConnection(transport)
        self._negotiatedProtocol = b"h2"


class ProviderSite(server.Site):
    #: One line per request in the log: off by default, a push service takes thousands a second.
    access_log = False

    def protocol(self):
        return PrefaceSniffingChannel(http.HTTPChannel())

    def log(self, request):
        if self.access_log:
            super().log(request)


def make_site(router, auth, enrol=None, clock=None, token_limit=None, team_limit=None):
    device = DeviceAPI(router, auth, token_limit, team_limit)
    # No form parsing: the API takes JSON bodies, and parsing content types cost every request.
    site = ProviderSite(Root(device, enrol), requestFactory=BoundedRequest, parsePOSTFormSubmission=False)
    if clock is not None:
        site.reactor = clock
    site.displayTracebacks = False
    return site
