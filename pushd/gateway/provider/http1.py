"""
The provider API's listener: HTTP/1.1 by twisted.web, HTTP/2 by ``http2`` (chosen by ALPN
``h2``, or by the HTTP/2 preface from a client that offers no ALPN, as aioapns does). Both
hand requests to ``rules.ProviderAPI`` and write back its ``Answer``.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import http, resource, server

from pushd.gateway.provider.http2 import Logs, ProviderH2
from pushd.gateway.provider.limits import Limits
from pushd.gateway.provider.rules import SINGLE_HEADERS, Answer, DeviceAPI, ProviderAPI

#: Bytes of request body kept at most; beyond this the body is discarded unread.
MAX_BODY = 64 * 1024
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


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


class Root(resource.Resource):
    """Every path goes to the rules, so that unknown paths get APNs' 404 BadPath, not an HTML page."""

    isLeaf = True

    def __init__(self, device: DeviceAPI, enrol=None):
        super().__init__()
        self.api = ProviderAPI(device, enrol)
        self.device = device
        self.enrol = enrol

    def render(self, request):
        raw = request.requestHeaders.getRawHeaders
        dup = any(len(raw(name, ())) > 1 for name in SINGLE_HEADERS)
        return render(request, self.api.answer(request.method, request.path, request.getHeader,
                                               request.content.read(), request.body_overflow,
                                               str(request.getClientAddress()), dup))


class ProviderChannel(http.HTTPChannel):
    """
    twisted.web's channel with an absolute deadline for each request's headers and body (at
    most 64 KiB kept): its idle timer is reset by every byte, so a client trickling one byte at
    a time held a connection forever. The deadline runs from the connection's start, and for
    each later request from its first byte; trickling does not move it.
    """

    _deadline_call = None
    _awaiting_headers = True
    started = None

    def connectionMade(self):
        super().connectionMade()
        self.started = self.site.seconds()
        self._arm()

    def _arm(self):
        delay = self.site.limits.header_deadline
        self._deadline_call = self.callLater(delay, self._headers_late)

    def _disarm(self):
        if self._deadline_call is not None:
            if self._deadline_call.active():
                self._deadline_call.cancel()
            self._deadline_call = None

    def dataReceived(self, data):
        if self._awaiting_headers and self._deadline_call is None:
            self._arm()
        super().dataReceived(data)

    def allHeadersReceived(self):
        self._awaiting_headers = False  # the deadline runs on until the body is in (slow POST)
        super().allHeadersReceived()

    def allContentReceived(self):
        self._disarm()
        super().allContentReceived()

    def requestDone(self, request):
        self._awaiting_headers = True  # the next request's deadline starts with its first byte
        super().requestDone(request)

    def _headers_late(self):
        self._deadline_call = None
        self.site.logs.late(peer=str(self.transport.getPeer()),
                            why=f"request not complete within {self.site.limits.header_deadline:g} s")
        self.transport.abortConnection()

    def connectionLost(self, reason):
        self._disarm()
        super().connectionLost(reason)


class PrefaceSniffingChannel(http._GenericHTTPChannelProtocol):
    """
    HTTP/1.1 stays with twisted.web; HTTP/2 goes to ``http2``. HTTP/2 is chosen by ALPN h2,
    or, as APNs also accepts from a client that offers no ALPN (aioapns), by the connection
    opening with the HTTP/2 preface: so look at the first 24 bytes.
    """

    _sniffed = b""

    def dataReceived(self, data):
        if self._negotiatedProtocol is None:
            if getattr(self._channel.transport, "negotiatedProtocol", None) == b"h2":
                self._switch_to_h2()
            else:
                self._sniffed += data
                if len(self._sniffed) < len(H2_PREFACE) and H2_PREFACE.startswith(self._sniffed):
                    return  # could still be the preface (the header deadline runs meanwhile)
                data, self._sniffed = self._sniffed, b""
                if data.startswith(H2_PREFACE):
                    self._switch_to_h2()
        return super().dataReceived(data)

    def _switch_to_h2(self):
        http_channel = self._channel
        http_channel._networkProducer.unregisterProducer()
        http_channel.setTimeout(None)
        http_channel._disarm()
        site = self._site
        transport = http_channel.transport
        self._channel = ProviderH2(site.resource.api, site.reactor, self._timeOut, site.limits, site.logs,
                                   str(transport.getPeer()), http_channel.started)
        self._channel.makeConnection(transport)
        self._negotiatedProtocol = b"h2"


class ProviderSite(server.Site):
    #: One line per request in the log: off by default, a push service takes thousands a second.
    access_log = False
    _log = Logger()

    def __init__(self, resource, limits: Limits, **kw):
        super().__init__(resource, **kw)
        self.limits = limits
        self.logs = Logs(self, self._log)

    def seconds(self) -> float:
        """The site's clock (``reactor`` may be replaced by a test's Clock after construction)."""
        return self.reactor.seconds()

    def protocol(self):
        return PrefaceSniffingChannel(ProviderChannel())

    def log(self, request):
        if self.access_log:
            super().log(request)


def make_site(router, auth, enrol=None, clock=None, token_limit=None, team_limit=None, limits: Limits = Limits()):
    device = DeviceAPI(router, auth, token_limit, team_limit)
    # No form parsing: the API takes JSON bodies, and parsing content types cost every request.
    site = ProviderSite(Root(device, enrol), limits, requestFactory=BoundedRequest, parsePOSTFormSubmission=False)
    if clock is not None:
        site.reactor = clock
    site.displayTracebacks = False
    return site
