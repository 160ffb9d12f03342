"""
Certificate renewal on the device: at about 2/3 of the certificate's life (jittered, so a fleet
enrolled together does not renew together), ask the gateway for a new key's certificate with the
same device id (so the same tokens), proving possession of the current one. Failures retry with
jittered backoff; the next Connect uses the new certificate.
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

    def renew(self):
        self._call = None
        d = self._in_thread(self._renew_call, self.url, self.ident)
        d.addCallbacks(self._renewed, self._failed)
        return d

    def _renewed(self, key_cert):
        key, cert = key_cert
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
        delay = min(MAX_RETRY, FIRST_RETRY * 2 ** (self.failures - 1)) * self.rng.uniform(0.5, 1.5)
        why = failure.getErrorMessage() if failure.check(identity_mod.EnrolError) else repr(failure.value)
        self.log.warn("certificate renewal failed ({why}); retrying in {delay:.0f} s", why=why, delay=delay)
        if self.running:
            self._schedule(delay)
