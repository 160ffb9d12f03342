"""
The courier's Connect proof, apart from the framing: is this Connect, on this connection,
the device it names? The certificate, the nonce's time and the signature (over this TLS
connection's exporter when the Connect is bound to it), the device registry (through the
router), and for a nonce-only Connect the replay cache.

``ConnectVerifier.verify`` answers with a Deferred: the device id, or a failure with
``ConnectRefused`` and its reason (for the log; the device only learns it was refused).
"""

from __future__ import annotations

from twisted.internet import defer

from pushd import tls, wire
from pushd.gateway.replay import MemoryReplayCache, nonce_key
from pushd.store.interfaces import ReplayCacheFull


class ConnectRefused(Exception):
    """A Connect that does not prove its device; the reason says why (for the log)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def proof_of(msg: wire.Connect) -> str:
    """How a Connect proves itself, for the log line of an accepted one."""
    return "bound to its TLS session" if msg.binding is not None else "nonce only"


class ConnectVerifier:
    def __init__(self, ca_cert, clock, router=None, replay_cache=None):
        self.ca_cert = ca_cert
        self.clock = clock
        #: Asked whether the device registry accepts the certificate (None: any of the CA).
        self.router = router
        #: Nonces of nonce-only Connects seen inside the window (IReplayCache).
        self.replay_cache = replay_cache if replay_cache is not None else MemoryReplayCache(clock=clock)

    def verify(self, msg: wire.Connect, transport):
        """A Deferred of the device id ``msg`` proves on ``transport``, or ConnectRefused."""
        try:
            device_id, exporter = self._check(msg, transport)
        except ConnectRefused as e:
            return defer.fail(e)
        if exporter is not None:
            # Signed over this connection's exporter: on any other connection the same
            # bytes fail the signature, and a connection takes one Connect. Nothing to remember.
            return defer.succeed(device_id)
        # Signed over the nonce alone (APNs-style): accepted once within the window.
        d = self.replay_cache.seen(
            nonce_key(device_id, msg.nonce), tls.nonce_time(msg.nonce) + tls.NONCE_WINDOW,
            owner=device_id,
        )
        return d.addCallbacks(self._fresh, self._unremembered, (device_id,), None, (device_id,))

    def _check(self, msg, transport):
        exporter = None
        try:
            if msg.binding is not None:
                if msg.binding != wire.BINDING_TLS_EXPORTER:
                    raise tls.AuthError(f"unknown Connect binding {msg.binding}")
                try:
                    # Read here, after the handshake: the Connect is application data.
                    exporter = tls.session_exporter(transport)
                except tls.NoExporter as e:
                    raise tls.AuthError(f"Connect bound to its TLS session, but {e}")
            device_id = tls.verify_connect(
                self.ca_cert, msg.certificate, msg.nonce, msg.signature, self.clock.seconds(), exporter
            )
        except tls.AuthError as e:
            raise ConnectRefused(str(e))
        router = self.router
        if router is not None:
            why = router.certificate_refused(msg.certificate, device_id, self.clock.seconds())
            if why is not None:
                raise ConnectRefused(f"device {device_id}: {why}")
        return device_id, exporter

    @staticmethod
    def _fresh(seen, device_id):
        if seen:
            raise ConnectRefused(f"replayed Connect of device {device_id} (its nonce was accepted before)")
        return device_id

    @staticmethod
    def _unremembered(failure, device_id):
        if failure.check(ConnectRefused):
            return failure
        if failure.check(ReplayCacheFull):
            raise ConnectRefused(f"{failure.getErrorMessage()}: nonce-only Connects refused until nonces expire")
        # Fail closed: a nonce that cannot be checked is refused, never let through.
        raise ConnectRefused(f"replay cache unavailable, nonce-only Connect refused ({failure.getErrorMessage()})")
