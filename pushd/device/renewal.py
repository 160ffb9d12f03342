"""
Certificate renewal on the device: at about 2/3 of the certificate's life (jittered, so a fleet
enrolled together does not renew together), ask the gateway for a new key's certificate with the
same device id (so the same tokens), proving possession of the current one. Failures retry with
jittered backoff; the next Connect uses the new certificate.

The request is stamped with the gateway's clock as the courier last learned it (every ConnectAck
carries it: the factory's clock_offset), so a device whose own clock is off by more than the
gateway's window (300 s) can still renew; if the gateway still finds it stale, its StaleRequest
answer carries its time, which the next try uses. The new key is kept across retries until a
renewal succeeds: a device that lost the gateway's answer asks again with that same key, which
is the only key the gateway still certifies for a replaced certificate.
"""

from __future__ import annotations

import random

from twisted.application import service
from twisted.internet import threads
from twisted.logger import Logger

from pushd.device import identity as identity_mod

#: Spread of the renewal point, as a fraction of the certificate's life, either side.
JITTER = 0.05
#: Backoff after a failed renewal: doubling from FIRST_RETRY up to MAX_RETRY seconds.
FIRST_RETRY = 60.0
MAX_RETRY = 3600.0


class Renewer(service.Service):
    log = Logger()

    def __init__(self, ident, factory, url, clock, fraction=2 / 3, rng=None,
                 renew=identity_mod.renew, in_thread=threads.deferToThread):
        self.ident = ident
        self.factory = factory
        self.url = url
        self.clock = clock
        self.fraction = fraction
        self.rng = rng or random.Random()
        self._renew_call = renew
        self._in_thread = in_thread
        self._call = None
        self.failures = 0
        self.renewals = 0
        #: The key being certified, kept until a renewal succeeds.
        self._key = None
        #: The gateway's clock minus ours, from its last StaleRequest answer: for the next try only.
        self._stale_offset = None

    def due(self) -> float:
        """When to renew the current certificate (UNIX seconds)."""
        nb = self.ident.cert.not_valid_before_utc.timestamp()
        na = self.ident.cert.not_valid_after_utc.timestamp()
        share = min(0.99, max(0.0, self.fraction + self.rng.uniform(-JITTER, JITTER)))
        return nb + (na - nb) * share

    def startService(self):
        super().startService()
        self._schedule(max(0.0, self.due() - self.clock.seconds()))

    def stopService(self):
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self, delay):
        self.log.info("certificate renewal in {delay:.0f} s", delay=delay)
        self._call = self.clock.callLater(delay, self.renew)

    def gateway_time(self) -> float:
        """Now by the gateway's clock, as far as the device knows it."""
        offset = self._stale_offset
        if offset is None:
            offset = getattr(self.factory, "clock_offset", 0.0)
        return self.clock.seconds() + offset

    def renew(self):
        self._call = None
        when = int(self.gateway_time())
        self._stale_offset = None
        d = self._in_thread(self._attempt, when)
        d.addCallbacks(self._renewed, self._failed)
        return d

    def _attempt(self, when):
        """In a thread: key generation (RSA: ~0.1 s) and the request both block."""
        if self._key is None:
            self._key = identity_mod.new_key_like(self.ident)
        return self._renew_call(self.url, self.ident, key=self._key, when=when)

    def _renewed(self, key_cert):
        key, cert = key_cert
        self._key = None
        old = self.ident.cert.serial_number
        self.ident.key, self.ident.cert = key, cert
        # The next Connect presents the new certificate; this connection stays as it is.
        self.factory.private_key = key
        self.factory.certificate_der = self.ident.cert_der
        self.failures = 0
        self.renewals += 1
        self.log.info("renewed certificate: serial {old:x} -> {new:x}, valid until {until}",
                      old=old, new=cert.serial_number, until=cert.not_valid_after_utc.isoformat())
        if self.running:
            self._schedule(max(0.0, self.due() - self.clock.seconds()))

    def _failed(self, failure):
        self.failures += 1
        server_time = getattr(failure.value, "server_time", None)
        if failure.check(identity_mod.EnrolError) and server_time is not None:
            # Over TLS verified against our CA: the gateway's word on the time.
            self._stale_offset = server_time / 1000.0 - self.clock.seconds()
            self.log.warn("gateway found the renewal stale: its clock is {offset:+.0f} s from ours;"
                          " the next try uses it", offset=self._stale_offset)
        delay = min(MAX_RETRY, FIRST_RETRY * 2 ** (self.failures - 1)) * self.rng.uniform(0.5, 1.5)
        why = failure.getErrorMessage() if failure.check(identity_mod.EnrolError) else repr(failure.value)
        self.log.warn("certificate renewal failed ({why}); retrying in {delay:.0f} s", why=why, delay=delay)
        if self.running:
            self._schedule(delay)
