"""
The provider API's listener: HTTP/1.1 by twisted.web, HTTP/2 by ``http2`` (chosen by ALPN
``h2``, or by the HTTP/2 preface from a client that offers no ALPN, as aioapns does). Both
hand requests to ``rules.ProviderAPI`` and write back its ``Answer``.
"""

from __future__ import annotations

import io

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import http, resource, server

from pushd.admission import address_key
from pushd.gateway.provider.http2 import ABORT_HOSTILE, Logs, ProviderH2
from pushd.gateway.provider.limits import Limits
from pushd.gateway.provider.rules import SINGLE_HEADERS, Answer, DeviceAPI, ProviderAPI, Refused

#: Bytes of request body kept at most; beyond this the body is discarded unread.
MAX_BODY = 64 * 1024
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class BoundedRequest(server.Request):
    """
    A request whose body is kept in memory up to the limit its headers earned (``judged`` by
    ProviderChannel: none for a refused request, the ticket's limit else); the rest is
    counted, not stored.
    """

    body_overflow = False
    _body_seen = 0
    judged = None  # rules' Ticket or Refused, from the headers
    max_body = MAX_BODY

    def gotLength(self, length):
        # twisted.web opens a temporary file for a chunked body or a Content-Length of 100,000
        # or more: an fd per connection beyond what the admission caps count. Bodies are bounded.
        self.content = io.BytesIO()

    def handleContentChunk(self, data):
        self._body_seen += len(data)
        if self._body_seen > self.max_body:
            self.body_overflow = True
            return
        self.content.write(data)


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
        t = request.judged
        if t is None:  # not judged on its headers (a channel other than ProviderChannel)
            raw = request.requestHeaders.getRawHeaders
            dup = any(len(raw(name, ())) > 1 for name in SINGLE_HEADERS)
            t = self.api.head(request.method, request.path, request.getHeader, dup, str(request.getClientAddress()))
        if type(t) is Refused:
            return render(request, t.answer)
        return render(request, self.api.finish(t, request.content.getvalue(), request.body_overflow))


class ProviderChannel(http.HTTPChannel):
    """
    twisted.web's channel with an absolute deadline for each request's headers and body (the
    authorization judged on the headers, the body kept up to the limit they earned): its idle
    timer is reset by every byte, so a client trickling one byte at a time held a connection
    forever. The deadline runs from the connection's start, and for each later request from
    its first byte; trickling does not move it. Until a valid token, ``auth_deadline`` and
    ``unauthenticated_requests`` bound the connection too.
    """

    _deadline_call = None
    _auth_call = None
    _abort_call = None
    _awaiting_headers = True
    started = None
    source = None  # the address key of the API's per-address verification bucket
    authenticated = False  # a valid provider token (or the operator key) came on this connection
    refused = 0  # requests refused on their headers before that
    _ended = False  # answered before its body was read, closing: nothing more is read
    _hold_continue = False
    _continue_wanted = False

    def connectionMade(self):
        super().connectionMade()
        self.started = self.site.seconds()
        self.source = address_key(self.transport.getPeer(), self.site.ipv6_prefix)
        self._arm()
        self._auth_call = self.callLater(self.site.limits.auth_deadline, self._auth_late)

    def _arm(self):
        delay = self.site.limits.header_deadline
        self._deadline_call = self.callLater(delay, self._headers_late)

    def _disarm(self):
        if self._deadline_call is not None:
            if self._deadline_call.active():
                self._deadline_call.cancel()
            self._deadline_call = None

    def _stop_timers(self):
        self._disarm()
        self._stop_auth_deadline()

    def dataReceived(self, data):
        if self._ended:
            return
        if self._awaiting_headers and self._deadline_call is None:
            self._arm()
        super().dataReceived(data)

    def rawDataReceived(self, data):
        if not self._ended:
            super().rawDataReceived(data)

    def allHeadersReceived(self):
        self._awaiting_headers = False  # the deadline runs on until the body is in (slow POST)
        self._hold_continue = True  # no 100 Continue before the headers are judged
        try:
            super().allHeadersReceived()
        finally:
            self._hold_continue = False
        self._judge(self.requests[-1])
        if self._continue_wanted and not self._ended:
            self._continue_wanted = False
            super()._send100Continue()

    def _send100Continue(self):
        if self._hold_continue:
            self._continue_wanted = True
        else:
            super()._send100Continue()

    def _judge(self, request):
        """
        Authorization is judged on the headers, before any body byte is read: before a valid
        token, a refused request (or one whose body is over its limit) is answered at once and
        the connection closed, its body unread; after, the body of a refused request is read
        and dropped, so that the connection stays.
        """
        raw = request.requestHeaders.getRawHeaders
        dup = any(len(raw(name, ())) > 1 for name in SINGLE_HEADERS)
        path = self._path.split(b"?", 1)[0]
        api = self.site.resource.api
        t = api.head(self._command, path, request.getHeader, dup, str(request.getClientAddress()), self.source)
        request.judged = t
        if t.authenticated and not self.authenticated:
            self.authenticated = True
            self._stop_auth_deadline()
        body = self.length != 0
        if type(t) is Refused:
            request.max_body = 0
            if self.authenticated:
                return
            self.refused += 1
            if body:
                self._answer_now(request, t.answer, "a request refused before its body was read")
            elif self.refused >= self.site.limits.unauthenticated_requests:
                self.site.logs.unauthenticated(peer=str(self.transport.getPeer()),
                                               why=f"{self.refused} requests refused without a valid token")
                self.persistent = False
                request.setHeader(b"connection", b"close")
            return
        request.max_body = t.limit
        if not self.authenticated and self.length is not None and self.length > t.limit:
            answer = api.finish(t, b"", True)
            if isinstance(answer, Answer):
                self._answer_now(request, answer, "a body over its limit before a valid token")

    def _stop_auth_deadline(self):
        if self._auth_call is not None:
            if self._auth_call.active():
                self._auth_call.cancel()
            self._auth_call = None

    def _answer_now(self, request, answer: Answer, why):
        """The answer, ``Connection: close``, and the connection closes without reading the body."""
        self.site.logs.unauthenticated(peer=str(self.transport.getPeer()), why=why)
        self._ended = True
        self.persistent = False
        self._stop_timers()
        request.method, request.clientproto = self._command, self._version  # set by requestReceived, not run
        request.setHeader(b"connection", b"close")
        request.setHeader(b"content-length", b"%d" % len(answer.body))
        _write(answer, request)  # finished: twisted.web's requestDone closes (unregistered first)
        self._abort_later()

    def _abort_later(self):
        if self._abort_call is None:
            self._abort_call = self.callLater(ABORT_HOSTILE, self.transport.abortConnection)

    def _auth_late(self):
        """No valid token within auth_deadline of the start: refused requests do not keep a connection."""
        self._auth_call = None
        if self.authenticated or self._ended:
            return
        self.site.logs.unauthenticated(peer=str(self.transport.getPeer()),
                                       why=f"no valid token within {self.site.limits.auth_deadline:g} s")
        self._ended = True
        self._stop_timers()
        self.loseConnection()
        self._abort_later()

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
        self._stop_timers()
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        super().connectionLost(reason)

    def drain(self):
        """The gateway stops: closed now if idle, else after the answer under way."""
        self.persistent = False
        if not self.requests:
            self._stop_timers()
            self.loseConnection()


class PrefaceSniffingChannel(http._GenericHTTPChannelProtocol):
    """
    HTTP/1.1 stays with twisted.web; HTTP/2 goes to ``http2``. HTTP/2 is chosen by ALPN h2,
    or, as APNs also accepts from a client that offers no ALPN (aioapns), by the connection
    opening with the HTTP/2 preface: so look at the first 24 bytes.
    """

    _sniffed = b""

    @property
    def authenticated(self) -> bool:
        """A valid provider token came on this connection (pushd.admission stops pacing it)."""
        return bool(getattr(self._channel, "authenticated", False))

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
        http_channel._stop_timers()
        site = self._site
        transport = http_channel.transport
        self._channel = ProviderH2(site.resource.api, site.reactor, self._timeOut, site.limits, site.logs,
                                   str(transport.getPeer()), http_channel.started, http_channel.source)
        self._channel.makeConnection(transport)
        self._negotiatedProtocol = b"h2"

    def makeConnection(self, transport):
        self._site.channels.add(self)  # (the proxy passes makeConnection on, not connectionMade)
        super().makeConnection(transport)

    def connectionLost(self, reason):
        self._site.channels.discard(self)
        if not self._site.channels and self._site._drained is not None:
            d, self._site._drained = self._site._drained, None
            d.callback(None)
        super().connectionLost(reason)

    def drain(self):
        self._channel.drain()


class ProviderSite(server.Site):
    #: One line per request in the log: off by default, a push service takes thousands a second.
    access_log = False
    _log = Logger()

    def __init__(self, resource, limits: Limits, ipv6_prefix: int = 64, **kw):
        super().__init__(resource, **kw)
        self.limits = limits
        self.ipv6_prefix = ipv6_prefix  # for address_key, as the admission's
        self.logs = Logs(self, self._log)
        #: Live connections (at most --provider-max-connections): the drain closes them.
        self.channels = set()
        self._drained = None

    def drain(self):
        """The gateway stops: HTTP/2 connections get GOAWAY, HTTP/1.1 ones close after the
        answer under way; fire once all are closed (the caller bounds the wait)."""
        self._drained = d = defer.Deferred()
        for channel in list(self.channels):
            channel.drain()
        if not self.channels and self._drained is d:
            self._drained = None
            d.callback(None)
        return d

    def seconds(self) -> float:
        """The site's clock (``reactor`` may be replaced by a test's Clock after construction)."""
        return self.reactor.seconds()

    def callLater(self, delay, f, *a, **kw):
        return self.reactor.callLater(delay, f, *a, **kw)

    def stopFactory(self):
        self.logs.stop()  # the last counts are logged, no timer is left behind
        super().stopFactory()

    def protocol(self):
        return PrefaceSniffingChannel(ProviderChannel())

    def log(self, request):
        if self.access_log:
            super().log(request)


def make_site(router, auth, enrol=None, clock=None, token_limit=None, team_limit=None, limits: Limits = Limits(),
              verify_limit=None, ipv6_prefix=64):
    device = DeviceAPI(router, auth, token_limit, team_limit, verify_limit)
    # No form parsing: the API takes JSON bodies, and parsing content types cost every request.
    site = ProviderSite(Root(device, enrol), limits, ipv6_prefix, requestFactory=BoundedRequest,
                        parsePOSTFormSubmission=False)
    if clock is not None:
        site.reactor = clock
    site.displayTracebacks = False
    return site
