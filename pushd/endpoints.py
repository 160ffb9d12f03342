"""
Listener descriptions: any Twisted endpoint string, plus ``tls:`` in front of one to wrap
it in pushd's own TLS (its certificate and ALPN list): ``tls:5223``,
``tls:tcp:443:interface=::``, ``tls:systemd:domain=INET6:name=courier``, or plain ``tcp:...``
behind a terminating proxy.
"""

from __future__ import annotations

from twisted.application.internet import StreamServerEndpointService
from twisted.internet import endpoints
from twisted.protocols.tls import TLSMemoryBIOFactory


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


def listener(reactor, description: str, factory, tls_options):
    wants_tls, inner = split_tls(description)
    try:
        ep = endpoints.serverFromString(reactor, inner)
    except (ValueError, KeyError, TypeError) as e:
        raise BadListener(f"bad listener {description!r}: {e}")
    if wants_tls:
        factory = TLSMemoryBIOFactory(tls_options, False, factory)
    svc = StreamServerEndpointService(ep, factory)
    svc._raiseSynchronously = True
    return svc
