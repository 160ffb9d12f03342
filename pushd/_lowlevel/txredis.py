"""
Everything pushd knows about txredisapi's insides (pinned: ``txredisapi>=1.6,<1.7``).

The store needs four things txredisapi does not offer as API: to be told when a pool
connection becomes ready (to load the scripts on it, and to tell the cluster that the
master is (re)connected: a failover), whether the pool has given up reconnecting, its live
connections, and to send an already encoded command and get its reply. The last is the
fast path: ``execute_command`` encodes every argument through four isinstance tests and a
bytearray per call (50 us for an enqueue's 16 arguments, measured), and ``eval`` hashes the
script text on every call; pushd encodes its few commands itself and writes them at once,
several in one write where their replies are independent (EVALSHA then WAIT).

Replies are parsed by hiredis (C) when it is installed: txredisapi picks ``HiredisProtocol``
by itself then, and ``self_check`` says whether it did.
"""

from __future__ import annotations

import txredisapi
from twisted.internet.endpoints import HostnameEndpoint

#: The txredisapi releases this module was written against: [low, high).
SUPPORTED = ((1, 6), (1, 7))


def version() -> tuple:
    return tuple(int(p) for p in txredisapi.__version__.split(".")[:2])


class _Hooked:
    """A pool factory that calls ``on_connection(conn)`` once a connection is ready and in the pool."""

    on_connection = None

    def addConnection(self, conn):
        super().addConnection(conn)
        if self.on_connection is not None and conn in self.pool:
            self.on_connection(conn)


class _PlainFactory(_Hooked, txredisapi.RedisFactory):
    pass


class _SentinelProtocol(txredisapi.SentinelRedisProtocol):
    """Its connectionMade drops a connection unless ROLE's first item == "master" (a str);
    the store reads bytes (charset None), so the role is decoded here."""

    def role(self):
        return super().role().addCallback(lambda r: [r[0].decode() if isinstance(r[0], bytes) else r[0], *r[1:]])


class _SentinelFactory(_Hooked, txredisapi.SentinelConnectionFactory):
    protocol = _SentinelProtocol


class Pool:
    """A txredisapi connection pool, seen through what the store needs and nothing more."""

    def __init__(self, factory, sentinel=None):
        self._factory = factory
        self._sentinel = sentinel

    @property
    def gave_up(self) -> bool:
        """txredisapi stopped reconnecting for good (a connection lost during AUTH or SELECT)."""
        return self._factory.stopped

    def connections(self) -> list:
        """The connections ready for commands now."""
        return [c for c in self._factory.pool if c.connected]

    def on_failure(self, callback):
        """``callback(failure)`` if the pool gives up before it is full once."""
        if self._factory.deferred is not None:
            self._factory.deferred.addErrback(callback)

    def disconnect(self):
        from twisted.internet import defer

        ds = [self._factory.disconnect()]
        if self._sentinel is None:
            return defer.gatherResults(ds, consumeErrors=True)
        ds.append(self._sentinel.disconnect())
        done = defer.gatherResults(ds, consumeErrors=True)
        return done.addBoth(lambda r: self._sentinel.settled().addCallback(lambda _: r))


def _factory_kwargs(password, username):
    return {
        "charset": None,
        "convertNumbers": False,
        "password": password,
        "username": username,
        "isLazy": True,
    }


def plain_pool(reactor, host, port, *, dbid, poolsize, password, username, connect_timeout, on_connection):
    factory = _PlainFactory(f"{host}:{port}", dbid, poolsize, handler=txredisapi.ConnectionHandler,
                            **_factory_kwargs(password, username))
    factory.on_connection = on_connection
    factory.startConnecting(HostnameEndpoint(reactor, host, port, timeout=connect_timeout))
    return Pool(factory)


class _Sentinel(txredisapi.Sentinel):
    """
    txredisapi's manager, remembering when its last master look-up began: each look-up
    arms a timer of the global reactor for ``discovery_timeout`` that only a sentinel
    naming a healthy master cancels (not a look-up cancelled by closing the pool). A pool
    closed meanwhile left that timer behind (a test's dirty reactor), so ``disconnect``
    waits it out: at most ``discovery_timeout`` (the store's timeout, 1-2 s).
    """

    looked_at = None

    def discover_master(self, service_name):
        from twisted.internet import reactor

        d = super().discover_master(service_name)
        if not d.called:
            self.looked_at = reactor.seconds()
        return d

    def settled(self):
        """Fire once no look-up's timer can be left."""
        from twisted.internet import defer, reactor, task

        if self.looked_at is None:
            return defer.succeed(None)
        left = self.looked_at + self.discovery_timeout - reactor.seconds()
        if left <= 0:
            return defer.succeed(None)
        return task.deferLater(reactor, left + 0.01, lambda: None)


def sentinel_pool(sentinels, service, *, dbid, poolsize, password, username, connect_timeout, on_connection,
                  discovery_timeout):
    """
    A pool on the master Sentinel names for ``service``: every (re)connection asks the
    sentinels first, and connections to a node that is no longer the master are dropped.
    """
    manager = _Sentinel(sentinels, connectTimeout=connect_timeout)
    # How long a master look-up waits for a sentinel that knows a healthy master (default 10 s:
    # a failover would keep every node silent that much longer).
    manager.discovery_timeout = discovery_timeout
    factory = _SentinelFactory(manager, service, True, uuid=None, dbid=dbid, poolsize=poolsize,
                               **_factory_kwargs(password, username))
    factory.on_connection = on_connection
    # Its reconnect backoff grows to 10 s while Sentinel has no master to name (the failover's
    # first seconds), and a node would then stay silent up to 10 s after the new master is
    # there: look again at least every 2 s. (Also its connect timeout: ample on a LAN.)
    factory.maxDelay = 2.0
    factory.startConnecting(txredisapi._SentinelEndpoint(factory))
    return Pool(factory, manager)


def send_to(conn, command: bytes, waiters) -> None:
    """
    Write ``command`` (one or more encoded commands, pipelined); each waiter's
    ``callback(reply)`` is called with its reply, in order: an Exception instance for an error
    reply or a lost connection. The waiters go straight into the protocol's reply queue
    (a DeferredQueue whose ``put`` pops ``waiting[0]`` and calls ``.callback``), so a command
    costs no Deferred of txredisapi's.
    """
    conn.replyQueue.waiting.extend(waiters)
    conn.transport.write(command)


def self_check() -> list:
    """What in the installed txredisapi differs from what this module relies on ([] if nothing)."""
    problems = []
    if not SUPPORTED[0] <= version() < SUPPORTED[1]:
        problems.append(f"txredisapi {txredisapi.__version__} is outside the supported range "
                        f"{'.'.join(map(str, SUPPORTED[0]))} to {'.'.join(map(str, SUPPORTED[1]))}")
    for cls, names in ((txredisapi.RedisFactory, ("addConnection", "startConnecting", "disconnect", "pool",
                                                  "stopped", "deferred")),
                       (txredisapi.SentinelConnectionFactory, ("addConnection", "maxDelay", "retryDelay")),
                       (txredisapi.SentinelRedisProtocol, ("role", "connectionMade")),
                       (txredisapi.Sentinel, ("discovery_timeout", "disconnect", "discover_master")),
                       (txredisapi.BaseRedisProtocol, ("handle_reply",))):
        probe = cls
        if cls is txredisapi.RedisFactory:
            probe = cls("x", None, 1)
        for name in names:
            if not hasattr(probe, name):
                problems.append(f"txredisapi.{cls.__name__} has no {name}")
    if not hasattr(txredisapi, "_SentinelEndpoint"):
        problems.append("txredisapi has no _SentinelEndpoint")
    proto = txredisapi.RedisProtocol(charset=None)
    queue = getattr(proto, "replyQueue", None)
    if not isinstance(getattr(queue, "waiting", None), list) or not hasattr(queue, "put"):
        problems.append("a txredisapi protocol has no replyQueue with a waiting list to wait on")
    else:
        # A reply is handed to the first waiter's callback, errors as Exception instances.
        got = []

        class Waiter:
            callback = got.append

        queue.waiting.append(Waiter())
        proto.replyReceived(txredisapi.ResponseError("probe"))
        if len(got) != 1 or not isinstance(got[0], txredisapi.ResponseError):
            problems.append("txredisapi's reply queue does not hand replies to the waiters in order")
    try:
        import hiredis  # noqa: F401
    except ImportError:
        pass
    else:
        if txredisapi.RedisFactory.protocol is not txredisapi.HiredisProtocol:
            problems.append("hiredis is installed but txredisapi does not parse replies with it")
    return problems
