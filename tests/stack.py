"""A gateway and device daemons as real processes, in a short temp dir of a test's."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from . import procs

TOPIC = "com.example.e2e"


class Stack:
    def __init__(self, case: unittest.TestCase, *gateway_args: str):
        self.case = case
        # Short: AF_UNIX paths are limited to 107 bytes.
        self.dir = Path(tempfile.mkdtemp(prefix="pushd-e2e-"))
        case.addCleanup(shutil.rmtree, self.dir, True)
        self.gw_state = self.dir / "gateway"
        self.dev_state = self.state("device")
        self.courier_port = procs.free_port()
        self.provider_port = procs.free_port()
        self.gateway_args = list(gateway_args)
        self.gateway = self.device = None
        self.devices: dict = {}

    def state(self, name: str) -> Path:
        return self.dir / name

    def start_gateway(self):
        self.gateway = procs.spawn(
            "gateway",
            procs.TWISTD + [
                "pushd-gateway",
                "--state-dir", str(self.gw_state),
                "--courier", f"tls:{self.courier_port}:interface=127.0.0.1",
                "--provider", f"tls:{self.provider_port}:interface=127.0.0.1",
                *self.gateway_args,
            ],
            self.dir,
        )
        self.case.addCleanup(self.gateway.stop)
        return self.gateway.wait_for(r"Site \(TLS\) starting on")

    def start_device(self, name="device", *extra: str):
        """Start (or restart) a device daemon (``extra``: more options); fire when it is connected."""
        p = procs.spawn(
            name,
            procs.TWISTD + [
                "pushd-device",
                "--state-dir", str(self.state(name)),
                "--transport", f"tls:127.0.0.1:{self.courier_port}",
                "--tls-name", "localhost",
                "--enrol-url", f"https://127.0.0.1:{self.provider_port}",
                "--enrol-secret-file", str(self.gw_state / "enrol.secret"),
                "--max-delay", "2",
                *extra,
            ],
            self.dir,
        )
        self.devices[name] = p
        if name == "device":
            self.device = p
        self.case.addCleanup(p.stop)
        return p.wait_for(r"connected as device")

    @defer.inlineCallbacks
    def provider_key(self, team="TEAM1", key_id="KEY1", topic=TOPIC):
        """A team's ES256 key made with `pushctl keys new` (the .p8 path), as a provider would."""
        key = self.dir / f"AuthKey_{key_id}.p8"
        out, err, code = yield procs.run(procs.PUSHCTL + [
            "keys", "new", "-d", str(self.gw_state), "--team", team, "--key-id", key_id,
            "--topic", topic, "--out", str(key)], self.dir)
        self.case.assertEqual(code, 0, err)
        return key

    def listen(self, count=None, device="device", topic=TOPIC):
        argv = procs.PUSHCTL + ["listen", "--socket", str(self.state(device) / "pushd.sock")]
        if count is not None:
            argv += ["-n", str(count)]
        app = procs.spawn(f"app@{device}", argv + [topic], self.dir)
        self.case.addCleanup(app.stop)
        return app

    def send(self, token, payload, topic=TOPIC):
        return procs.run(
            procs.PUSHCTL + [
                "send", "-g", f"127.0.0.1:{self.provider_port}", "-d", str(self.gw_state),
                token, topic, json.dumps(payload),
            ],
            self.dir,
        )

    def status(self, device="device"):
        return procs.run(procs.PUSHCTL + ["status", "--socket", str(self.state(device) / "pushd.sock")], self.dir)


def spawn_node(s, name, courier, provider, cleanup):
    """Another gateway node of stack ``s`` (same state dir: one CA, token secret and device
    registry) on the given ports; fires once it is subscribed to its bus channel."""
    p = procs.spawn(f"gateway-{name}", procs.TWISTD + [
        "pushd-gateway", "--state-dir", str(s.gw_state), "--node-id", f"node-{name}",
        "--courier", f"tls:{courier}:interface=127.0.0.1",
        "--provider", f"tls:{provider}:interface=127.0.0.1",
        *s.gateway_args,
    ], s.dir)
    cleanup(p.stop)
    return p, p.wait_for(r"subscribed to pushd:bus:node-" + name)
