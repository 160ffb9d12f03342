"""
The nodes' bus on the Redis a cluster shares (INodeBus): heartbeats and PUBLISH go through
the store's connection pool (its timeouts, its bounded queue); each node SUBSCRIBEs to its
own channel on one more connection, txredisapi's subscriber protocol, which reconnects by
itself. Keys and channels: the docstring of ``pushd.store.redis`` and docs/cluster.md.
"""

from __future__ import annotations

import txredisapi
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectError
from twisted.logger import Logger
from zope.interface import implementer

from pushd.store.interfaces import INodeBus
from pushd.store.redis import parse_url

# KEYS: the heartbeat key; ARGV: TTL (ms). Returns 1 if it was alive already.
_BEAT = b"""
local was = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
return was
"""


class _Subscriber(txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern, channel, message):
        self.factory.bus._message(message)


class _SubscriberFactory(txredisapi.SubscriberFactory):
    protocol = _Subscriber

    def __init__(self, bus, password, username):
        super().__init__(isLazy=True)
        self.bus = bus
        # Public attributes buildProtocol reads (SubscriberFactory's constructor takes neither).
        self.charset = None
        self.password = password
        self.username = username
        # Fires once connected, or fails if it gives up (a wrong password); nobody else listens.
        self.deferred.addErrback(lambda f: bus.log.warn("Redis subscriber: {why}", why=f.getErrorMessage()))

    def buildProtocol(self, addr):
        p = super().buildProtocol(addr)
        p.whenConnected().addCallback(self.bus._subscribe)
        return p


class _MasterEndpoint:
    """Connects where the store's master is at each attempt (it moves on a failover)."""

    def __init__(self, bus):
        self.bus = bus

    def connect(self, factory):
        where = self.bus.where()
        if where is None:
            # A failed attempt: txredisapi's ClientService tries again after its backoff.
            return defer.fail(ConnectError(string="the sentinels have not named the Redis master yet"))
        host, port = where
        store = self.bus.store
        return HostnameEndpoint(store.reactor, host, port, timeout=store.timeout).connect(factory)


@implementer(INodeBus)
class RedisNodeBus:
    log = Logger()

    shared = True

    def __init__(self, store):
        self.store = store
        self._auth = (store._pool_args["password"], store._pool_args["username"])
        self._factory = None
        self._unwatch = None
        self._conn = None  # the subscriber connection, once subscribed
        self._channel = None
        self._received = self._connected = None

    # --- INodeBus ------------------------------------------------------------------------

    def listen(self, node, received, connected):
        if self._factory is not None:
            raise RuntimeError("this bus listens already")
        self._channel = self.store.channel_prefix + node.encode("utf-8")
        self._received, self._connected = received, connected
        self._factory = _SubscriberFactory(self, *self._auth)
        self._factory.startConnecting(_MasterEndpoint(self))
        on_master = getattr(self.store, "on_master", None)
        if on_master is not None:  # a store that can fail over (Sentinel) says when it moved
            self._unwatch = on_master(self._master_changed)

    def publish(self, node, data):
        d = self.store._command(b"PUBLISH", self.store.channel_prefix + node.encode("utf-8"), data)
        return d.addCallback(int)

    def beat(self, node, ttl):
        d = self.store._script(_BEAT, [self.store.beat_prefix + node.encode("utf-8")], [b"%d" % int(ttl * 1000)])
        return d.addCallback(lambda was: bool(int(was)))

    def reconnect(self):
        conn, self._conn = self._conn, None
        if conn is not None and conn.connected:
            # txredisapi's ClientService connects again, and _subscribe says so.
            conn.transport.abortConnection()
        elif self._factory is not None:
            self._restart()

    def _restart(self):
        """Subscribe now with a fresh factory. Between attempts txredisapi's ClientService
        waits out its backoff (1, 2.7, 7.4, then 10 s): after a Sentinel failover the node
        stayed unsubscribed for 3-4 s after its store was on the new master (measured,
        tests/test_cluster_ha.py), its devices woken by nobody, asking to subscribe again."""
        old, self._factory = self._factory, _SubscriberFactory(self, *self._auth)
        self._factory.startConnecting(_MasterEndpoint(self))
        old.disconnect().addErrback(lambda f: self.log.failure("closing the old subscriber", f))

    def close(self):
        factory, self._factory = self._factory, None
        self._conn = None
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if factory is None:
            return defer.succeed(None)
        return factory.disconnect().addErrback(lambda f: self.log.failure("closing the subscriber", f))

    # --- the subscriber connection ---------------------------------------------------------

    def where(self):
        """(host, port) to subscribe at: the store's master if it knows one, else its URL's;
        None while a Sentinel URL's master is not known yet (a gateway listens at start,
        before its store's pool has asked the sentinels: that raised and stopped the node)."""
        master = getattr(self.store, "master", None)
        if master is not None and master[0] is not None:
            return master
        if self.store.url.startswith("redis-sentinel://"):
            return None
        host, port = parse_url(self.store.url)[:2]
        return host, port

    def _master_changed(self):
        conn = self._conn
        if conn is not None and conn.connected:
            peer = conn.transport.getPeer()
            if (peer.host, peer.port) != tuple(self.where() or ()):
                self.log.info("Redis master moved: subscribing there")
                self.reconnect()
        elif self._factory is not None:
            self.log.info("Redis answers again: subscribing now")
            self._restart()

    def _subscribe(self, conn):
        def subscribed(_):
            if self._factory is None or conn.factory is not self._factory or not conn.connected:
                return  # closed, or a factory replaced by _restart
            self._conn = conn
            self.log.info("subscribed to {channel}", channel=self._channel.decode("utf-8", "replace"))
            self._connected()

        def failed(f):
            self.log.warn("subscribing to {channel} failed: {why}", channel=self._channel.decode("utf-8", "replace"),
                          why=f.getErrorMessage())
            if conn.connected:
                conn.transport.abortConnection()

        conn.subscribe([self._channel]).addCallbacks(subscribed, failed)

    def _message(self, data):
        try:
            self._received(data)
        except Exception:
            self.log.failure("handling a message on {channel}", channel=self._channel)
