"""
The device's one connection to the courier, kept up for all apps on the device.

``CourierClientProtocol`` turns frames into calls on an ``ICourierListener`` (the daemon)
and keeps the connection alive; ``CourierClientFactory`` is the ReconnectingClientFactory
that retries with jittered exponential backoff, rotating through the configured transports
(5223, then 443). Twisted endpoints never call clientConnectionFailed/Lost, so transports
connect with ``reactor.connectSSL``/``connectTCP`` (see ``pushd.device.transports``).
"""

from __future__ import annotations

import random

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import Logger
from zope.interface import Interface, implementer

from pushd import tls, wire
from pushd.device.keepalive import AdaptiveKeepalive

PUSHD_VERSION = 1

#: The largest clock offset a ConnectAck may set (s). A real skew is seconds to minutes
#: (hours for a clock never set: a day covers a wrong time zone); beyond, not believed.
MAX_CLOCK_OFFSET = 86400.0


class ICourierListener(Interface):
    """What the device daemon hears from its courier connection."""

    def connected(proto, base_token):
        """Connect accepted; ``proto`` can now send Filter and ScopedToken."""

    def disconnected(reason):
        """The connection is gone (the factory will retry)."""

    def tokenReceived(topic_hash, token):
        """A ScopedTokenAck arrived."""

    def notificationReceived(msg):
        """A Notification arrived; return a Deferred or value; the ack is sent after."""

    def keepaliveSent():
        """A KeepAlive went out."""

    def keepaliveAnswered():
        """Its KeepAliveAck came back."""


@implementer(IHandshakeListener)
class CourierClientProtocol(protocol.Protocol):
    log = Logger()

    def __init__(self):
        self.decoder = wire.FrameDecoder()
        self.ready = False
        self.was_ready = False
        self._ka_call = None
        self._ka_timeout = None
        self._closing = False
        #: The TLS handshake completed: the gateway's certificate verified against its CA
        #: (client_options; otherwise the handshake fails). Only then is its time believed.
        self._verified = False

    @property
    def listener(self):
        return self.factory.listener

    def connectionMade(self):
        f = self.factory
        self.clock = f.clock
        # Connect must be answered within one keepalive timeout (a TLS handshake included).
        self._ka_timeout = self.clock.callLater(f.keepalive_timeout, self._dead, "no ConnectAck")
        if not tls.is_tls(self.transport):
            self._sendConnect(None)
        # On TLS, handshakeCompleted sends it: the exporter exists only from then on.

    def handshakeCompleted(self):
        if self._closing:
            return
        self._verified = True
        try:
            exporter = tls.session_exporter(self.transport)
        except tls.NoExporter as e:
            # Still safe against a replay (the gateway remembers nonce-only nonces), but say so.
            self.log.warn("Connect not bound to the TLS session ({why}): signing the nonce alone", why=str(e))
            exporter = None
        self._sendConnect(exporter)

    def _sendConnect(self, exporter):
        """Connect, signed over nonce || exporter when there is one (field 33 says so)."""
        f = self.factory
        # Stamped with the gateway's clock as last heard: ours may be off by more than the
        # nonce window (a clock jump), and the gateway refuses such a Connect.
        nonce = tls.make_nonce(self.clock.seconds() + f.clock_offset)
        self.send(
            wire.Connect(
                push_token=f.base_token,
                state=1,
                flags=0x41,
                certificate=f.certificate_der,
                nonce=nonce,
                signature=tls.sign_nonce(f.private_key, nonce, exporter or b""),
                protocol_version=11,
                pushd_version=PUSHD_VERSION,
                binding=wire.BINDING_TLS_EXPORTER if exporter is not None else None,
            )
        )

    def send(self, message):
        self.transport.write(message.encode())

    def dataReceived(self, data):
        if self._closing:
            return
        try:
            for frame in self.decoder.feed(data):
                try:
                    msg = wire.parse(frame)
                except wire.WireError as e:
                    if frame.command not in wire.MESSAGES:
                        self.log.debug("ignoring unknown command {c}", c=frame.command)
                        continue
                    raise e
                self.frameReceived(msg)
                if self._closing:
                    return
        except wire.WireError as e:
            self._fail(str(e))

    def frameReceived(self, msg):
        if not self.ready and not isinstance(msg, wire.ConnectAck):
            return self._fail(f"{type(msg).__name__} before ConnectAck")
        handler = getattr(self, f"handle_{type(msg).__name__}", None)
        if handler is None:
            self.log.debug("ignoring {kind}", kind=type(msg).__name__)
            return
        handler(msg)

    def handle_ConnectAck(self, msg):
        self._cancel_timeout()
        if msg.server_time:
            self._gateway_time(msg.server_time)
        if msg.status != wire.STATUS_OK or not (msg.token or self.factory.base_token):
            self.factory.refused += 1
            return self._fail(f"gateway refused Connect (status {msg.status})")
        f = self.factory
        if msg.token:
            f.base_token = msg.token
        # Field 32 is pushd's: this gateway takes pushd's own commands too.
        f.gateway_is_pushd = msg.keepalive_interval is not None
        if msg.keepalive_interval:
            f.keepalive.gateway_accepts(msg.keepalive_interval)
        self.ready = True
        f.resetDelay()
        f.transportConnected()
        self._schedule_keepalive()
        self.listener.connected(self, f.base_token)

    def _gateway_time(self, server_time):
        """Stamp later nonces with the gateway's clock: only from a gateway whose
        certificate verified (over plain tcp anyone on the path could set it), and
        within MAX_CLOCK_OFFSET."""
        if not self._verified:
            return
        offset = server_time / 1000.0 - self.clock.seconds()
        if abs(offset) > MAX_CLOCK_OFFSET:
            self.log.warn("ignoring the gateway's time: {offset} s off this device's clock"
                          " (more than {max} s)", offset=round(offset), max=MAX_CLOCK_OFFSET)
            return
        self.factory.clock_offset = offset

    def handle_ScopedTokenAck(self, msg):
        if msg.status == wire.STATUS_OK and msg.scoped_token:
            self.listener.tokenReceived(msg.topic, msg.scoped_token)
        else:
            self.log.warn("gateway refused a scoped token (status {s})", s=msg.status)

    def handle_Notification(self, msg):
        d = defer.maybeDeferred(self.listener.notificationReceived, msg)

        def ack(status):
            if self.ready and not self._closing:
                self.send(wire.NotificationAck(token=msg.token, message_id=msg.message_id,
                                               status=status if status is not None else wire.STATUS_OK))

        def failed(f):
            self.log.failure("handling a notification failed", f)
            return wire.STATUS_ERROR

        d.addErrback(failed).addCallback(ack)

    def handle_KeepAliveAck(self, msg):
        if self._ka_timeout is None:
            return  # not one we are waiting for
        self._cancel_timeout()
        self.factory.keepalive.succeeded()
        self.listener.keepaliveAnswered()
        self._schedule_keepalive()

    def handle_NotificationAck(self, msg):
        pass

    def handle_GoAway(self, msg):
        """The gateway drains: close (what we wrote, acks included, is flushed first) and
        connect again within its window, not after a backoff (the factory does that)."""
        window = wire.GOAWAY_DEFAULT_WINDOW_MS if msg.window_ms is None else msg.window_ms
        self.factory.going_away(window / 1000.0)
        self._closing = True
        self.transport.loseConnection()

    # --- keepalive -------------------------------------------------------------

    def _schedule_keepalive(self):
        if self._ka_call is not None and self._ka_call.active():
            self._ka_call.cancel()
        self._ka_call = self.clock.callLater(self.factory.keepalive.interval, self.keepalive)

    def keepalive(self):
        self._ka_call = None
        if self._closing:
            return
        self.send(wire.KeepAlive())
        self.listener.keepaliveSent()
        self._ka_timeout = self.clock.callLater(self.factory.keepalive_timeout, self._keepalive_lost)

    def _keepalive_lost(self):
        self.factory.keepalive.failed()
        self._dead("keepalive unanswered")

    def _cancel_timeout(self):
        if self._ka_timeout is not None and self._ka_timeout.active():
            self._ka_timeout.cancel()
        self._ka_timeout = None

    def _dead(self, why):
        self._ka_timeout = None
        self.log.info("connection dead: {why}; dropping it", why=why)
        self._closing = True
        self.transport.abortConnection()

    def _fail(self, reason):
        self.log.warn("closing courier connection: {reason}", reason=reason)
        self._closing = True
        self.transport.abortConnection()

    def connectionLost(self, reason):
        if not self.ready and not self._closing:
            # A failed attempt whose reason nobody logged yet (a TLS handshake failure, a
            # close by the gateway): one line per attempt, bounded by the backoff.
            f = self.factory
            self.log.info("connection to {transport} ended before Connect was accepted: {why}",
                          transport=f.current.describe(), why=f.current.explain(self.transport, reason))
        self._closing = True
        self._cancel_timeout()
        if self._ka_call is not None and self._ka_call.active():
            self._ka_call.cancel()
        self._ka_call = None
        self.was_ready, self.ready = self.ready, False
        if self.was_ready:
            self.listener.disconnected(reason)


class CourierClientFactory(protocol.ReconnectingClientFactory):
    """
    Retries with exponential backoff and full jitter up to ``maxDelay``; the delay resets
    after a successful Connect (not a mere TCP connect, so a gateway that accepts and
    refuses does not get hammered). Each retry moves to the next transport.
    """

    protocol = CourierClientProtocol
    log = Logger()
    initialDelay = 1.0
    factor = 2.0
    maxDelay = 60.0

    def __init__(
        self,
        listener,
        transports,
        private_key,
        certificate_der: bytes,
        base_token: bytes | None = None,
        reactor=None,
        keepalive_min: float = 30.0,
        keepalive_max: float = 600.0,
        keepalive_timeout: float = 15.0,
        max_delay: float = 60.0,
        rng=None,
    ):
        if reactor is None:
            from twisted.internet import reactor
        self.listener = listener
        self.transports = list(transports)
        self.private_key = private_key
        self.certificate_der = certificate_der
        self.base_token = base_token
        self.reactor = self.clock = reactor
        self.keepalive = AdaptiveKeepalive(keepalive_min, keepalive_max)
        self.keepalive_timeout = keepalive_timeout
        self.maxDelay = max_delay
        self.delay = self.initialDelay
        self.rng = rng or random.Random()
        self._index = 0
        self.attempts = 0
        self.failures = 0
        self.refused = 0
        self.successes = 0
        self.current = None
        self.last_attempt = None
        self.connection = None
        self._lost_waiters: list = []
        self._immediate = False
        #: The window (s) a GoAway announced on the current connection, or None.
        self._goaway = None
        self.gateway_is_pushd = False
        #: Gateway clock minus ours (s), from the last ConnectAck; nonces are stamped with it.
        self.clock_offset = 0.0

    # --- connecting ---------------------------------------------------------

    def start(self, reactor=None):
        self.continueTrying = True
        self._connect()

    def _connect(self):
        self.current = self.transports[self._index % len(self.transports)]
        self.attempts += 1
        self.last_attempt = self.clock.seconds()
        self.connector = self.current.connect(self.reactor, self)

    def transportConnected(self):
        """Connect accepted: keep this transport for the next attempt; failures start over."""
        self.failures = 0
        self.successes += 1

    def stop(self):
        """Stop retrying and close the connection; fire when it is closed."""
        self.stopTrying()
        if self.connection is None or self.connection.transport is None:
            return defer.succeed(None)
        d = defer.Deferred()
        self._lost_waiters.append(d)
        self.connection.transport.loseConnection()
        return d

    def buildProtocol(self, addr):
        p = self.protocol()
        p.factory = self
        self.connection = p
        return p

    # --- the retry policy -----------------------------------------------------

    def clientConnectionFailed(self, connector, reason):
        self.failures += 1
        self.log.info(
            "connecting to {transport} failed: {why}",
            transport=self.current.describe(),
            why=reason.getErrorMessage(),
        )
        self._index += 1
        self.retry()

    def reconnect_now(self, why: str = "asked to") -> None:
        """A network change (SIGHUP, ``pushctl reconnect``): drop any connection and connect
        again at once, backoff reset; the old path may be gone without a word."""
        if not self.continueTrying:
            return
        self.log.info("reconnecting now: {why}", why=why)
        pending, self._callID = self._callID, None
        self.resetDelay()  # (also forgets _callID: hence taken above)
        if self.connection is not None and self.connection.transport is not None:
            self._immediate = True
            self.connection._closing = True
            self.connection.transport.abortConnection()
        elif pending is not None and pending.active():
            pending.cancel()
            self._connect()

    def going_away(self, window: float) -> None:
        """The gateway said GoAway: once the connection is closed, connect again after a
        uniform random wait in [0, window] (bounded by --max-delay, whatever it announced),
        with the backoff reset."""
        self._goaway = min(max(window, 0.0), self.maxDelay)

    def clientConnectionLost(self, connector, reason):
        was_up = self.connection is not None and self.connection.was_ready
        self.connection = None
        waiters, self._lost_waiters = self._lost_waiters, []
        for d in waiters:
            d.callback(None)
        window, self._goaway = self._goaway, None
        if self._immediate:
            self._immediate = False
            if self.continueTrying:
                self._connect()
            return
        if window is not None and self.continueTrying:
            # The gateway drains (a restart, a node leaving the cluster): reconnect now,
            # spread over its window, on the same transport (it was reachable).
            self.resetDelay()
            wait = self.rng.uniform(0, window)
            self.log.info("gateway going away: reconnecting in {wait:.2f} s (its window {window:g} s)",
                          wait=wait, window=window)
            self._callID = self.clock.callLater(wait, self._retry_now)
            return
        if not was_up:
            # Lost before ConnectAck (TLS failure, refused Connect): a failed attempt.
            self.failures += 1
            self._index += 1
        self.retry()

    def retry(self, connector=None):
        if not self.continueTrying:
            return
        self.retries += 1
        if self.maxRetries is not None and self.retries > self.maxRetries:
            return
        # Full jitter: uniform in [0, d], d doubling up to maxDelay.
        wait = self.rng.uniform(0, self.delay)
        self.delay = min(self.delay * self.factor, self.maxDelay)
        self.log.info("reconnecting in {wait:.1f} s", wait=wait)
        self._callID = self.clock.callLater(wait, self._retry_now)

    def _retry_now(self):
        self._callID = None
        self._connect()

    def stopTrying(self):
        if self._callID is not None:
            self._callID.cancel()
            self._callID = None
        self.continueTrying = False
        if self.connector is not None:
            try:
                self.connector.stopConnecting()
            except Exception:
                pass

    @property
    def keepalive_interval(self) -> float:
        return self.keepalive.interval
