"""
``twistd pushd-device``: the apsd-like daemon. One courier connection kept up with backoff,
and a local AMP socket for apps and ``pushctl``.
"""

from __future__ import annotations

import signal
from pathlib import Path

from twisted.application import service, strports
from twisted.internet import protocol
from twisted.logger import Logger
from twisted.python import usage

from pushd import config
from pushd.device import transports
from pushd.device.courier import CourierClientFactory
from pushd.device.daemon import AppProtocol, DeviceDaemon
from pushd.device.identity import EnrolError, Identity, enrol
from pushd.device.renewal import Renewer

log = Logger()


class Options(config.Options):
    section = "device"
    synopsis = "[options]"
    longdesc = "Run the pushd device daemon: one courier connection for all local apps."
    optParameters = [
        ["state-dir", "d", "var/device", "Directory for the device key, certificate and tokens."],
        ["gateway", "g", "localhost", "Gateway host (courier transports and enrolment default to it)."],
        ["tls-name", None, None, "Name the gateway's certificate must carry [default: the transport host]."],
        ["enrol-url", None, None, "Enrolment URL [default: https://GATEWAY:2197]."],
        ["enrol-secret", None, None, "The gateway's enrolment secret (first start only)."],
        ["enrol-secret-file", None, None, "File holding the enrolment secret."],
        ["key-type", None, "ec", "Device key type for enrolment: ec or rsa."],
        ["environment", None, "production", "The connection environment shown in the status report."],
        ["socket", "s", None, "App socket path [default: STATE-DIR/pushd.sock]."],
        ["keepalive-min", None, 30.0, "Shortest keepalive interval (s); the interval starts here.", config.positive(float)],
        ["keepalive-max", None, 600.0, "Longest keepalive interval (s) the adaptive interval may reach.", config.positive(float)],
        ["keepalive-timeout", None, 15.0, "Seconds to wait for a KeepAliveAck before reconnecting.", config.positive(float)],
        ["max-delay", None, 60.0, "Longest backoff between attempts (s).", config.positive(float)],
        # --- device lifecycle ---
        ["renew-at", None, 0.667, "Renew the certificate at this fraction of its life (jittered +-0.05), over the enrol URL.", float],
    ]
    multi = {"transport": []}

    def opt_transport(self, description):
        """Courier transport tls:HOST:PORT or tcp:HOST:PORT, tried in order. Repeatable. [default: tls:GATEWAY:5223, tls:GATEWAY:443]"""
        self["transport"].append(description)

    def postOptions(self):
        super().postOptions()
        if self["keepalive-min"] > self["keepalive-max"]:
            raise usage.UsageError("--keepalive-min must not be above --keepalive-max")
        if not 0 < self["renew-at"] < 1:
            raise usage.UsageError("--renew-at must be between 0 and 1 (a fraction of the certificate's life)")
        if self["key-type"] not in ("ec", "rsa"):
            raise usage.UsageError("--key-type must be ec or rsa")
        g = self["gateway"]
        host = f"[{g}]" if ":" in g else g
        if not self["transport"]:
            self["transport"] = [f"tls:{host}:5223", f"tls:{host}:443"]
        if not self["enrol-url"]:
            self["enrol-url"] = f"https://{host}:2197"
        if not self["socket"]:
            self["socket"] = str(Path(self["state-dir"]) / "pushd.sock")
        if len(self["socket"].encode()) > 107:
            raise usage.UsageError(
                f"socket path {self['socket']!r} is longer than AF_UNIX allows (107 bytes); give a shorter --socket"
            )


def load_identity(options) -> Identity:
    state = Path(options["state-dir"])
    ident = Identity.load(state)
    if ident is not None:
        return ident
    secret = options["enrol-secret"]
    if options["enrol-secret-file"]:
        try:
            secret = Path(options["enrol-secret-file"]).read_text().strip()
        except OSError as e:
            raise usage.UsageError(f"cannot read {options['enrol-secret-file']}: {e.strerror}")
    if not secret:
        raise usage.UsageError(
            f"{state} holds no device identity: give --enrol-secret or --enrol-secret-file "
            "(or run 'pushctl provision') for the first start"
        )
    try:
        return enrol(options["enrol-url"], secret.encode(), state, options["key-type"])
    except EnrolError as e:
        raise usage.UsageError(f"enrolment failed: {e}")


class CourierService(service.Service):
    """Starts the factory's first attempt with the reactor; on shutdown stops retrying,
    closes the connection, then the held-push file."""

    def __init__(self, factory, daemon):
        self.factory = factory
        self.daemon = daemon

    def startService(self):
        super().startService()
        self.factory.start()
        # SIGHUP means the network changed (as a dispatcher script would signal it).
        reactor = self.factory.reactor
        self._previous = signal.signal(
            signal.SIGHUP, lambda *_: reactor.callFromThread(self.factory.reconnect_now, "SIGHUP")
        )

    def stopService(self):
        super().stopService()
        signal.signal(signal.SIGHUP, self._previous or signal.SIG_DFL)
        return self.factory.stop().addBoth(lambda _: self.daemon.close())  # logs the last throttled counts too


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    ident = load_identity(options)
    try:
        transport_list = [
            transports.parse(t, ident.ca_pem, options["tls-name"]) for t in options["transport"]
        ]
    except ValueError as e:
        raise usage.UsageError(str(e))
    daemon = DeviceDaemon(ident, reactor, options["environment"])
    factory = CourierClientFactory(
        daemon,
        transport_list,
        ident.key,
        ident.cert_der,
        base_token=ident.base_token,
        reactor=reactor,
        keepalive_min=options["keepalive-min"],
        keepalive_max=options["keepalive-max"],
        keepalive_timeout=options["keepalive-timeout"],
        max_delay=options["max-delay"],
    )
    daemon.factory = factory

    top = service.MultiService()
    CourierService(factory, daemon).setServiceParent(top)
    Renewer(ident, factory, options["enrol-url"], reactor, options["renew-at"]).setServiceParent(top)
    apps = protocol.Factory.forProtocol(lambda: AppProtocol(daemon))
    sock = options["socket"].replace(":", r"\:")
    strports.service(f"unix:{sock}:mode=600:lockfile=1", apps).setServiceParent(top)
    log.info("device {device}; app socket {sock}", device=ident.device_id, sock=options["socket"])
    return top
