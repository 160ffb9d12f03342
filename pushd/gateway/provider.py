"""
The provider API: ``POST /3/device/<hex token>`` as APNs defines it, over HTTPS (HTTP/2
by ALPN or by its preface, HTTP/1.1), authorised by an ES256 JWT (``auth.py``).
"""

from __future__ import annotations

import json
import uuid

from twisted.logger import Logger
from twisted.web import http, resource, server

from pushd import wire
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


def _answer(request, status: int, apns_id: str, reason: str | None = None, **extra):
    request.defaultContentType = None
    request.setResponseCode(status)
    request.setHeader(b"apns-id", apns_id.encode())
    if reason is None:
        return b""
    request.setHeader(b"content-type", b"application/json")
    return json.dumps({"reason": reason, **extra}).encode()


class DeviceResource(resource.Resource):
    isLeaf = True
    log = Logger()

    def __init__(self, router, auth, token_limit=None, team_limit=None):
        super().__init__()
        self.router = router
        self.auth = auth
        self.token_limit = token_limit
        self.team_limit = team_limit

    def render(self, request):
        apns_id = str(uuid.uuid4())
        raw_id = request.getHeader(b"apns-id")
        if raw_id is not None:
            try:
                apns_id = str(uuid.UUID(raw_id.decode("ascii")))
            except (UnicodeDecodeError, ValueError):
                return _answer(request, 400, apns_id, "BadMessageId")
        if request.method != b"POST":
            return _answer(request, 405, apns_id, "MethodNotAllowed")
        try:
            team = self.auth.authenticate(request.getHeader(b"authorization"))
            token, topic, fields = self.parse(request)
            if not self.auth.allowed(team, topic):
                raise Rejected(403, "TopicDisallowed")
            if self.team_limit is not None and not self.team_limit.allow(team):
                raise Rejected(429, "TooManyRequests")
            if self.token_limit is not None and not self.token_limit.allow(token):
                raise Rejected(429, "TooManyRequests")
        except Rejected as e:
            return _answer(request, e.status, apns_id, e.reason, **e.extra)
        d = self.router.accept(token, topic, apns_id=uuid.UUID(apns_id), **fields)
        d.addCallbacks(
            lambda _: _answer(request, 200, apns_id),
            lambda f: self._failed(f, request, apns_id),
        )
        d.addCallback(self._finish, request)
        return server.NOT_DONE_YET

    def _failed(self, failure, request, apns_id):
        if failure.check(Rejected):
            e = failure.value
            return _answer(request, e.status, apns_id, e.reason, **e.extra)
        self.log.failure("accepting {apns_id} failed", failure, apns_id=apns_id)
        return _answer(request, 500, apns_id, "InternalServerError")

    @staticmethod
    def _finish(body, request):
        if request._disconnected:
            return
        request.write(body)
        request.finish()

    def parse(self, request):
        parts = request.path.split(b"/")
        if len(parts) != 4 or parts[1:3] != [b"3", b"device"]:
            raise Rejected(404, "BadPath")
        try:
            token = bytes.fromhex(parts[3].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise Rejected(400, "BadDeviceToken")
        if not token:
            raise Rejected(400, "MissingDeviceToken")
        topic = request.getHeader(b"apns-topic")
        if not topic:
            raise Rejected(400, "MissingTopic")
        try:
            topic = topic.decode("ascii")
        except UnicodeDecodeError:
            raise Rejected(400, "BadTopic")
        push_type = request.getHeader(b"apns-push-type") or b"alert"
        if push_type not in PUSH_TYPES:
            raise Rejected(400, "InvalidPushType")
        fields = {}
        raw = request.getHeader(b"apns-expiration")
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
        raw = request.getHeader(b"apns-priority")
        if raw is not None:
            if raw not in (b"10", b"5", b"1"):
                raise Rejected(400, "BadPriority")
            fields["priority"] = int(raw)
        raw = request.getHeader(b"apns-collapse-id")
        if raw is not None:
            if len(raw) > 64:
                raise Rejected(400, "BadCollapseId")
            fields["collapse_id"] = raw.decode("utf-8", "replace")
        limit = wire.MAX_PAYLOAD_VOIP if push_type == b"voip" else wire.MAX_PAYLOAD
        if getattr(request, "body_overflow", False):
            raise Rejected(413, "PayloadTooLarge")
        payload = request.content.read()
        if len(payload) > limit:
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
        if request.path.startswith(b"/3/device/"):
            return self.device.render(request)
        if self.enrol is not None and request.path == b"/pushd/v1/enrol":
            return self.enrol.render(request)
        return _answer(request, 404, str(uuid.uuid4()), "BadPath")


H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class PrefaceSniffingChannel(http._GenericHTTPChannelProtocol):
    """
    twisted.web picks HTTP/2 only when ALPN says h2. APNs also accepts a client that offers
    no ALPN and opens with the HTTP/2 connection preface (aioapns does): so look at the first
    24 bytes, and switch this channel to H2Connection when they are the preface.
    """

    _sniffed = b""

    def dataReceived(self, data):
        if self._negotiatedProtocol is None and getattr(self._channel.transport, "negotiatedProtocol", None) != b"h2":
            self._sniffed += data
            if len(self._sniffed) < len(H2_PREFACE) and H2_PREFACE.startswith(self._sniffed):
                return  # could still be the preface
            data, self._sniffed = self._sniffed, b""
            if data.startswith(H2_PREFACE):
                self._switch_to_h2()
        return super().dataReceived(data)

    def _switch_to_h2(self):
        # As _GenericHTTPChannelProtocol does on ALPN h2.
        from twisted.web._http2 import H2Connection

        network_producer = self._channel._networkProducer
        network_producer.unregisterProducer()
        self._channel.setTimeout(None)
        transport = self._channel.transport
        self._channel = H2Connection()
        self._channel.requestFactory = self._requestFactory
        self._channel.site = self._site
        self._channel.factory = self._factory
        self._channel.timeOut = self._timeOut
        self._channel.callLater = self._callLater
        self._channel.makeConnection(transport)
        network_producer.registerProducer(self._channel, True)
        self._negotiatedProtocol = b"h2"


class ProviderSite(server.Site):
    def protocol(self):
        return PrefaceSniffingChannel(http.HTTPChannel())


def make_site(router, auth, enrol=None, clock=None, token_limit=None, team_limit=None):
    device = DeviceResource(router, auth, token_limit, team_limit)
    site = ProviderSite(Root(device, enrol), requestFactory=BoundedRequest)
    if clock is not None:
        site.reactor = clock
    site.displayTracebacks = False
    return site
