"""
Listener descriptions: any Twisted endpoint string, plus ``tls:`` in front of one to wrap
it in pushd's own TLS (its certificate and ALPN list): ``tls:5223``,
``tls:tcp:443:interface=::``, ``tls:systemd:domain=INET6:name=courier``, or plain ``tcp:...``
behind a terminating proxy.
"""

from __future__ import annotations

import re
import socket

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, endpoints, error
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory

from pushd.admission import AdmissionFactory

log = Logger()


def renew_bios(connection) -> bool:
    """
    Give a pyOpenSSL memory-BIO ``Connection`` two fresh, empty memory BIOs, freeing the
    old ones; only when both are drained (nothing is lost). True if it did.

    OpenSSL's memory BIO never shrinks: after a handshake, the one coming in keeps a
    buffer the size of the ClientHello and the one going out the size of the server's
    whole first flight (certificate chain included), about 2 KiB per connection that an
    idle connection never needs again. Fresh BIOs grow only to what later traffic needs.
    """
    try:
        from OpenSSL._util import ffi, lib

        into, out, ssl = connection._into_ssl, connection._from_ssl, connection._ssl
        if into is None or out is None:
            return False
        if lib.BIO_get_mem_data(into, ffi.NULL) or lib.BIO_get_mem_data(out, ffi.NULL):
            return False
        new_into = lib.BIO_new(lib.BIO_s_mem())
        new_out = lib.BIO_new(lib.BIO_s_mem())
        if new_into == ffi.NULL or new_out == ffi.NULL:
            for b in (new_into, new_out):
                if b != ffi.NULL:
                    lib.BIO_free(b)
            return False
        # SSL_set_bio frees the old pair (and points the record layers at the new one).
        lib.SSL_set_bio(ssl, new_into, new_out)
        connection._into_ssl, connection._from_ssl = new_into, new_out
        return True
    except (ImportError, AttributeError) as e:  # a pyOpenSSL without these internals
        log.debug("cannot renew TLS BIOs: {e}", e=e)
        return False


class LeanTLSProtocol(BufferingTLSTransport):
    """
    Twisted's TLS transport, renewing its memory BIOs once the handshake is over, and again
    after any large read: a memory BIO keeps the capacity of the largest chunk ever written
    to it, so a peer that once sent 64 KiB in one go (an HTTP/2 body flood before any token)
    left ~64 KiB per connection behind for the connection's life.
    """

    _biosRenewed = False
    #: A read at least this large is followed by fresh BIOs (once they are drained).
    BIG_READ = 16 * 1024

    @property
    def handshake_done(self) -> bool:
        """Past its handshake (or failed): pushd.admission stops pacing its reads."""
        return self._handshakeDone or self._lostTLSConnection

    # Two reference cycles would leave an ended connection (its application protocol
    # with it) to the cyclic collector, whose full collections stalled every honest push
    # by 41-102 ms under floods of closing connections (bench/abuse.py, gc callbacks in
    # the gateway). Broken here, so refcounting frees it:

    def _tlsShutdownFinished(self, reason):
        # a TLS error's Failure -> its traceback -> the frame that caught it, whose
        # locals hold the Failure (and this protocol); an EOF without close_notify, what
        # most floods end with, is one. Strings instead of frames, as Failure does to pickle.
        super()._tlsShutdownFinished(reason)
        if reason is not None:
            reason.cleanFailure()

    def connectionLost(self, reason):
        super().connectionLost(reason)
        # this -> the producer membrane -> the application (it registered itself as the
        # producer) -> its transport, this.
        self._producer = None

    def dataReceived(self, data):
        super().dataReceived(data)
        if self._handshakeDone and not self._lostTLSConnection:
            if not self._biosRenewed or len(data) >= self.BIG_READ:
                if renew_bios(self._tlsConnection):
                    self._biosRenewed = True


class LeanTLSFactory(TLSMemoryBIOFactory):
    protocol = LeanTLSProtocol


class BadListener(ValueError):
    pass


def split_tls(description: str) -> tuple:
    """Return (wants_tls, inner endpoint description)."""
    if description.startswith("tls:"):
        inner = description[4:]
        if inner[:1].isdigit():
            inner = "tcp:" + inner
        return True, inner
    return False, description


class ReusePortEndpoint:
    """
    A TCP listening socket opened with SO_REUSEPORT, so that several gateway processes
    (``--workers N``, or ``pushd-gateway@.service`` instances) each listen on the same port
    and the kernel spreads new connections over them (docs/workers.md). Twisted's
    ``listenTCP`` has no such flag: the socket is made here and handed to
    ``reactor.adoptStreamPort``.
    """

    def __init__(self, reactor, port: int, interface: str = "", backlog: int = 50, ipv6: bool = False):
        self.reactor = reactor
        self.port = port
        self.interface = interface
        self.backlog = backlog
        self.family = socket.AF_INET6 if ipv6 or ":" in interface else socket.AF_INET

    def listen(self, factory):
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.interface or ("::" if self.family == socket.AF_INET6 else ""), self.port))
            sock.listen(self.backlog)
            sock.setblocking(False)
            return defer.succeed(self.reactor.adoptStreamPort(sock.fileno(), self.family, factory))
        except OSError as e:
            return defer.fail(error.CannotListenError(self.interface, self.port, e))
        finally:
            sock.close()  # adoptStreamPort keeps its own duplicate of the descriptor


def _unescaped_split(text: str) -> list:
    return [part.replace("\\:", ":") for part in re.split(r"(?<!\\):", text)]


def reuse_port_endpoint(reactor, inner: str):
    """
    The SO_REUSEPORT endpoint for a ``tcp:``/``tcp6:`` description (optionally behind
    ``haproxy:``); BadListener for anything else: a UNIX path or a socket inherited from
    systemd cannot be opened once per process.
    """
    proxied = inner.startswith("haproxy:")
    if proxied:
        inner = inner[len("haproxy:"):]
    kind, *args = _unescaped_split(inner)
    if kind not in ("tcp", "tcp6"):
        raise ValueError(f"only tcp: and tcp6: listeners can be shared by several processes (SO_REUSEPORT), not {kind}:")
    kw = {}
    positional = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if eq:
            kw[key] = value
        else:
            positional.append(arg)
    if positional:
        kw.setdefault("port", positional[0])
    unknown = set(kw) - {"port", "interface", "backlog"}
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown)}")
    port = int(kw.get("port", ""))
    if port == 0:
        raise ValueError("port 0 would give each process a different port")
    ep = ReusePortEndpoint(reactor, port, kw.get("interface", ""), int(kw.get("backlog", 50)), kind == "tcp6")
    if proxied:
        from twisted.protocols.haproxy import proxyEndpoint

        return proxyEndpoint(ep)
    return ep


def listener(reactor, description: str, factory, tls_options, admission=None, reuse_port=False):
    """A listening service; ``admission`` (pushd.admission.Admission), when given, decides
    on each connection before its TLS: a refused one is closed with no handshake.
    ``reuse_port``: open a tcp listener with SO_REUSEPORT (ReusePortEndpoint)."""
    wants_tls, inner = split_tls(description)
    try:
        ep = reuse_port_endpoint(reactor, inner) if reuse_port else endpoints.serverFromString(reactor, inner)
    except (ValueError, KeyError, TypeError) as e:
        raise BadListener(f"bad listener {description!r}: {e}")
    if wants_tls:
        factory = LeanTLSFactory(tls_options, False, factory)
    if admission is not None:
        factory = AdmissionFactory(admission, factory)
    svc = StreamServerEndpointService(ep, factory)
    svc._raiseSynchronously = True
    return svc
