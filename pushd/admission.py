"""
Admission control for a listener: who may open a connection at all, decided in
``buildProtocol`` before any TLS work, so a refused connection costs one accept and one
close.

Measured before it existed (attacker script, loopback): no cap on connections, so 1,100
trickling courier connections exhausted the gateway's file descriptors (EMFILE) and honest
devices were reset. Now each role (courier, provider) has a cap in total, a cap per source
address, and a token bucket of new connections per source address; all its listeners share
them, so the caps bound the role's file descriptors whatever accept() keeps bringing.

Pacing (``Pacer``): the reads of connections not yet authenticated (TLS handshake, then
the protocol's own authentication) are handled at most ``budget`` per reactor turn per
role; the others wait, paused, for the next turns. Measured before it existed
(bench/abuse.py, the gateway's turns timed): 600 unauthenticated HTTP/2 connections sending
their PINGs together made turns of 300-540 ready sockets taking 80-173 ms, and 200
rapid-reset connections starting together one of 241 ms; an honest push waited behind them
(p99 155-266 ms).
"""

from __future__ import annotations

import ipaddress
from collections import deque

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOProtocol

from pushd.gateway.ratelimit import Buckets
from pushd.throttle import LogThrottle  # noqa: F401  (re-exported: one throttle for every hostile-event log)

log = Logger()

#: Refusal reasons (the keys of ``Admission.refused``).
TOTAL = "total"
PER_ADDRESS = "per-address"
RATE = "rate"


def address_key(addr, ipv6_prefix: int = 64):
    """
    The source a per-address limit counts: an IPv4 address; an IPv6 address's first
    ``ipv6_prefix`` bits (one subscriber usually gets a whole /64, so single IPv6
    addresses cost an attacker nothing); an IPv4-mapped IPv6 address as its IPv4 address.
    None for other transports (UNIX sockets): those get only the total cap.
    """
    if isinstance(addr, IPv4Address):
        return addr.host
    if isinstance(addr, IPv6Address):
        host = addr.host.split("%", 1)[0]
        try:
            ip = ipaddress.IPv6Address(host)
        except ValueError:
            return host
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return (int(ip) >> (128 - ipv6_prefix), ipv6_prefix)
    return None


class Admission:
    """
    The limits of one role (courier or provider), shared by all its listeners.

    Sources with live connections are at most ``max_connections``; their buckets
    (pushd.gateway.ratelimit.Buckets) are remembered only until full again, and never more
    than ``max_addresses`` of them (least recently used first out; a forgotten bucket
    starts full), so both tables are bounded.
    """

    def __init__(
        self,
        name: str,
        clock,
        max_connections: int,
        max_per_address: int,
        rate: float,
        burst: float,
        ipv6_prefix: int = 64,
        max_addresses: int = 16384,
        preauth_reads_per_turn: int = 0,
        heap=None,
    ):
        self.name = name
        self.clock = clock
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.rate = rate
        self.burst = burst
        self.ipv6_prefix = ipv6_prefix
        self.max_addresses = max_addresses
        self.live = 0
        self.admitted = 0
        self.listeners = 0  # listening ports using it (AdmissionFactory.doStart/doStop)
        #: Refused connections by reason (total, per-address, rate), for metrics.
        self.refused = {TOTAL: 0, PER_ADDRESS: 0, RATE: 0}
        self._active: dict = {}  # key -> its live connections (sources with some)
        #: New connections per second from one source.
        self.buckets = Buckets(rate, burst, clock, max_keys=max_addresses)
        self.refusals = LogThrottle(clock, self._log_refusals)
        #: Pre-handshake reads per reactor turn (0: not paced).
        self.pacer = Pacer(clock, preauth_reads_per_turn)
        #: Poked as connections end (pushd.gateway.heap.HeapTrimmer), or None.
        self.heap = heap

    def __len__(self):
        """Sources remembered."""
        return len(self._active.keys() | self.buckets.keys())

    def admit(self, addr):
        """Return a ticket for a connection from ``addr``, or None to refuse it."""
        if self.live >= self.max_connections:
            return self._refuse(TOTAL, addr)
        key = address_key(addr, self.ipv6_prefix)
        if key is None:
            self.live += 1
            self.admitted += 1
            return _UNKEYED
        live = self._active.get(key, 0)
        if live >= self.max_per_address:
            return self._refuse(PER_ADDRESS, addr)
        allowed = self.buckets.allow(key)
        self.buckets.forget_full()
        if not allowed:
            return self._refuse(RATE, addr)
        self._active[key] = live + 1
        self.live += 1
        self.admitted += 1
        return key

    def release(self, key) -> None:
        """A connection admitted under ``key`` (its ticket) is gone."""
        self.live -= 1
        if self.heap is not None:
            self.heap.poke()
        if key is _UNKEYED:
            return
        live = self._active.get(key)
        if live is None:
            return
        if live > 1:
            self._active[key] = live - 1
        else:
            del self._active[key]

    def _refuse(self, reason, addr):
        self.refused[reason] += 1
        self.refusals.note(reason, peer=getattr(addr, "host", str(addr)))
        return None

    def _log_refusals(self, counts, total, sample):
        log.warn(
            "refused {total} {role} connections since the last line: {counts} (last from {peer};"
            " live {live}/{max})",
            total=total, role=self.name, counts=counts, peer=sample.get("peer"),
            live=self.live, max=self.max_connections,
        )

    def stop(self) -> None:
        self.refusals.stop()
        self.pacer.stop()
        if self.heap is not None:
            self.heap.stop()


class Pacer:
    """
    At most ``budget`` reads of unauthenticated connections of one role handled per
    reactor turn; a
    connection whose read comes once the turn's budget is spent keeps that read (one
    reactor read, at most 64 KiB), pauses its transport and waits in a FIFO;
    the next turns hand it on, ``budget`` a turn, before the reads of that turn. So
    authenticated connections' events (honest pushes) interleave with a burst of handshakes
    or hostile requests instead of waiting behind all of it, and those still run back to
    back (a turn
    with waiting connections is followed at once by the next: no lower throughput).

    A turn ends with one shared ``callLater(0)`` (no timer per connection): it runs after
    the reactor has handled everything epoll reported together. The queue holds only live,
    admitted connections, so the role's connection cap bounds it; a connection that closes
    while waiting (its connect deadline, the peer) is skipped, its held bytes freed with it.
    """

    def __init__(self, clock, budget: int):
        self.clock = clock
        self.budget = budget
        self.used = 0  # reads handed on this turn
        self._waiting: deque = deque()
        self._call = None
        #: Reads that had to wait for a later turn (for metrics).
        self.deferred = 0

    def __len__(self):
        """Connections waiting (some may have closed since)."""
        return len(self._waiting)

    def take(self, conn) -> bool:
        """True: handle ``conn``'s read now. False: it waits (``conn.resume_read()`` later)."""
        if self.budget <= 0:
            return True
        self._schedule()
        if self._waiting or self.used >= self.budget:
            self._waiting.append(conn)
            self.deferred += 1
            return False
        self.used += 1
        return True

    def _schedule(self):
        if self._call is None:
            self._call = self.clock.callLater(0, self._turn)

    def _turn(self):
        self._call = None
        self.used = 0
        while self._waiting and self.used < self.budget:
            conn = self._waiting.popleft()
            if conn.resume_read():
                self.used += 1
        if self._waiting or self.used:
            # Still waiting, or budget used: the next turn starts afresh (reads of this
            # turn's sockets count against what the waiting ones used).
            self._schedule()

    def stop(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None


def _authenticated(inner) -> bool:
    """``inner``: what admission wraps (a TLS protocol, or the application's without TLS)."""
    if not getattr(inner, "handshake_done", True):
        return False
    app = inner.wrappedProtocol if isinstance(inner, TLSMemoryBIOProtocol) else inner
    return bool(getattr(app, "authenticated", True))


#: The ticket of a connection with no per-address key (e.g. a UNIX socket).
_UNKEYED = object()


class AdmittedProtocol(ProtocolWrapper):
    """
    Gives its ticket back when the connection ends. Until it is authenticated its reads go
    through the role's Pacer; afterwards a read is never delayed. Authenticated: the TLS
    protocol says its handshake is done (``handshake_done``) and the application protocol
    inside says ``authenticated`` (a protocol without that attribute: once the handshake
    is done; without TLS: after its first read).
    """

    ticket = None
    #: Reads still paced: the handshake is not done.
    _pacing = True
    #: The read waiting for its turn (the transport is paused meanwhile), or None.
    _held = None
    #: The inner protocol paused the transport itself (do not resume it for it).
    _inner_paused = False
    #: The transport's read size before pacing lowered it (restored once authenticated).
    _read_size = None
    #: Bytes read at once from an unauthenticated connection (the reactor's default is
    #: 64 KiB): a waiting connection keeps one read, so this bounds what it holds. With
    #: 64 KiB, 600 unauthenticated HTTP/2 connections waiting with their bodies' reads held
    #: 87 KiB each (bench/abuse.py, h2 from many addresses); one TLS record is 16 KiB.
    PACED_READ = 16 * 1024

    def makeConnection(self, transport):
        if self.factory.admission.pacer.budget > 0 and hasattr(transport, "bufferSize"):
            self._read_size = transport.bufferSize
            transport.bufferSize = min(self._read_size, self.PACED_READ)
        super().makeConnection(transport)

    def dataReceived(self, data):
        if not self._pacing:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._held is not None:  # a transport that delivered while paused
            self._held += data
            return
        if self.factory.admission.pacer.take(self):
            self._deliver(data)
            return
        self._held = data
        self.transport.pauseProducing()

    def _deliver(self, data):
        inner = self.wrappedProtocol
        inner.dataReceived(data)
        if self.wrappedProtocol is not None and _authenticated(inner):
            self._pacing = False
            if self._read_size is not None:
                self.transport.bufferSize, self._read_size = self._read_size, None

    def resume_read(self) -> bool:
        """The Pacer's turn for this connection: hand on its held read. False if it closed."""
        data, self._held = self._held, None
        if self.wrappedProtocol is None or data is None:
            return False
        if not self._inner_paused:
            self.transport.resumeProducing()
        try:
            self._deliver(data)
        except Exception:  # as the reactor does for a read that raises: that connection only
            log.failure("a paced read failed; closing its connection")
            self.transport.abortConnection()
        return True

    def pauseProducing(self):
        self._inner_paused = True
        self.transport.pauseProducing()

    def resumeProducing(self):
        self._inner_paused = False
        if self._held is None:  # waiting for a turn: stay paused until then
            self.transport.resumeProducing()

    def logPrefix(self):
        inner = self.wrappedProtocol
        return inner.logPrefix() if hasattr(inner, "logPrefix") else inner.__class__.__name__

    def connectionLost(self, reason):
        ticket, self.ticket = self.ticket, None
        if ticket is not None:
            self.factory.admission.release(ticket)
        self._held = None
        self.wrappedProtocol.connectionLost(reason)
        self.wrappedProtocol = None


class RefusedProtocol(Protocol):
    """
    A refused connection's protocol: aborts in makeConnection, before a byte is read or
    written. Not None: a wrapper outside admission (``haproxy:`` endpoints wrap every
    protocol in HAProxyProtocolWrapper) would wrap None and fail with a traceback per
    refused connection.
    """

    def makeConnection(self, transport):
        transport.abortConnection()


#: Stateless: one for every refused connection.
_REFUSED = RefusedProtocol()


class AdmissionFactory(WrappingFactory):
    """
    Wraps a listener's factory (outside its TLS): a refused connection is aborted at
    once, before a byte of TLS. Behind ``haproxy:`` the address here is the proxy's (the
    PROXY header comes later): every limit counts the proxy as one source.
    """

    protocol = AdmittedProtocol

    def __init__(self, admission: Admission, wrappedFactory):
        super().__init__(wrappedFactory)
        self.admission = admission

    def logPrefix(self):
        # Keep the wrapped factory's name in the log ("Site (TLS) starting on ...").
        inner = self.wrappedFactory
        return inner.logPrefix() if hasattr(inner, "logPrefix") else inner.__class__.__name__

    def buildProtocol(self, addr):
        ticket = self.admission.admit(addr)
        if ticket is None:
            return _REFUSED
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:
            self.admission.release(ticket)
            return _REFUSED
        p = self.protocol(self, inner)
        p.ticket = ticket
        return p

    # No registry of protocols: the admission's counts are the bookkeeping.
    def registerProtocol(self, p):
        pass

    def unregisterProtocol(self, p):
        pass

    def doStart(self):
        super().doStart()
        self.admission.listeners += 1

    def doStop(self):
        super().doStop()
        self.admission.listeners -= 1
        if not self.admission.listeners:
            self.admission.stop()  # the role's last listener: log what is pending, no timer left


def fit_fd_limit(caps: dict, reserve: int = 256, resource=None) -> dict:
    """
    Make the connection caps fit the process's file descriptor limit: raise the soft
    limit towards the hard one if needed, and if the caps still do not fit (plus
    ``reserve`` for the store, logs and listening sockets), lower them in proportion, so
    the gateway refuses connections rather than fail accept() with EMFILE.
    Returns the caps to use (name -> count).
    """
    if resource is None:
        try:
            import resource
        except ImportError:  # pragma: no cover - not POSIX
            return dict(caps)
    need = sum(caps.values()) + reserve
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warn("cannot raise the file descriptor limit to {need}: {e}", need=need, e=e)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return dict(caps)
    room = max(len(caps), soft - reserve)
    total = sum(caps.values())
    fitted = {name: max(1, cap * room // total) for name, cap in caps.items()}
    log.warn(
        "the file descriptor limit ({limit}) is below the connection caps {caps} + {reserve};"
        " using {fitted} (raise `ulimit -n` or lower the max-connections options)",
        limit=soft, caps=caps, reserve=reserve, fitted=fitted,
    )
    return fitted
