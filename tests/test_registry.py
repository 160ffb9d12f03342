"""The device registry, and what the courier and router do with it (unit level, Clock-driven)."""

from __future__ import annotations

import io
import json
import os
import stat
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from twisted.trial import unittest

from pushd import ctl, wire
from pushd.gateway.registry import MAX_LIST, DeviceRegistry
from pushd.gateway.errors import Unregistered
from pushd.store.interfaces import IDeviceRegistry
from zope.interface.verify import verifyObject

from .helpers import Device, Gateway


class RegistryTests(unittest.TestCase):
    def setUp(self):
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.path = self.dir / "devices.sqlite3"
        self.registry = DeviceRegistry(self.path)
        self.addCleanup(self.registry.close)

    def test_interface_and_file_mode(self):
        verifyObject(IDeviceRegistry, self.registry)
        self.registry.record_cert(Device().cert, "test")
        for name in os.listdir(self.dir):
            self.assertEqual(stat.S_IMODE(os.stat(self.dir / name).st_mode), 0o600, name)

    def test_only_recorded_unrevoked_certificates_pass(self):
        d = Device()
        self.assertIn("not in the device registry", self.registry.check(d.der, d.id, 0))
        self.registry.record_cert(d.cert, "test")
        self.assertIsNone(self.registry.check(d.der, d.id, 0))
        self.assertTrue(self.registry.revoke(d.id, 123.0))
        self.assertFalse(self.registry.revoke(d.id, 456.0))
        self.assertEqual(self.registry.check(d.der, d.id, 0), "device revoked")
        self.assertEqual(self.registry.revoked_at(d.id), 123.0)

    def test_legacy_certificates_accepted_and_recorded_only_with_the_flag(self):
        d = Device()
        legacy = DeviceRegistry(self.path, legacy=True)
        self.addCleanup(legacy.close)
        self.assertIsNone(legacy.check(d.der, d.id, 0))
        (row,) = legacy.certificates()
        self.assertEqual((row["device_id"], row["via"]), (d.id, "legacy: first Connect"))
        # Recorded, so revocable like any other.
        legacy.revoke(d.id, 1.0)
        self.assertEqual(legacy.check(d.der, d.id, 0), "device revoked")

    def test_revocation_by_another_process_seen_on_poll(self):
        d = Device()
        self.registry.record_cert(d.cert, "test")
        other = DeviceRegistry(self.path)  # what pushctl opens
        self.addCleanup(other.close)
        self.assertEqual(self.registry.poll(), [])
        other.revoke(d.id, 5.0)
        self.assertIsNone(self.registry.revoked_at(d.id))
        self.assertEqual(self.registry.poll(), [d.id])
        self.assertEqual(self.registry.poll(), [])
        self.assertEqual(self.registry.revoked_at(d.id), 5.0)
        self.assertEqual(self.registry.check(d.der, d.id, 0), "device revoked")

    def test_listing_is_bounded(self):
        for _ in range(5):
            self.registry.record_cert(Device().cert, "test")
        self.assertEqual(len(self.registry.certificates(3)), 3)
        self.assertEqual(len(self.registry.certificates(10 * MAX_LIST)), 5)

    def test_pushctl_device_list_and_revoke(self):
        d = Device()
        self.registry.record_cert(d.cert, "enrol from 192.0.2.1")
        out = io.StringIO()
        with redirect_stdout(out):
            self.assertEqual(ctl.main(["device", "list", "-d", str(self.dir), "--json"]), 0)
        (row,) = json.loads(out.getvalue())
        self.assertEqual((row["device_id"], row["revoked_at"]), (d.id, None))
        with redirect_stdout(out):
            self.assertEqual(ctl.main(["device", "revoke", "-d", str(self.dir), d.id]), 0)
            self.assertEqual(ctl.main(["device", "list", "-d", str(self.dir)]), 0)
        self.assertIn(f"device {d.id} revoked", out.getvalue())
        self.assertEqual(self.registry.poll(), [d.id])
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            self.assertEqual(ctl.main(["device", "revoke", "-d", str(self.dir), "not-an-id"]), 2)
            self.assertEqual(ctl.main(["device", "list", "-d", str(self.dir / "nowhere")]), 2)


class CourierRegistryTests(unittest.TestCase):
    def setUp(self):
        self.gw = Gateway()
        path = Path(self.mktemp())
        path.mkdir()
        self.registry = DeviceRegistry(path / "devices.sqlite3")
        self.addCleanup(self.registry.close)
        self.gw.factory.registry = self.registry
        self.gw.router.registry = self.registry

    def test_unregistered_certificate_refused(self):
        proto, transport, ack = self.gw.connected(Device())
        self.assertEqual(ack.status, wire.STATUS_ERROR)
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(proto.device_id)

    def test_revoked_device_session_closed_connect_refused_pushes_410(self):
        d = Device()
        self.registry.record_cert(d.cert, "test")
        proto, transport, ack = self.gw.connected(d)
        self.assertEqual(ack.status, wire.STATUS_OK)
        self.assertIs(self.gw.router.sessions[d.id], proto.session)

        self.registry.revoke(d.id, self.gw.clock.seconds())
        self.gw.router.revoked([d.id])
        self.assertTrue(transport.disconnecting)

        proto2, transport2, ack2 = self.gw.connected(d)
        self.assertEqual(ack2.status, wire.STATUS_ERROR)
        self.assertTrue(transport2.disconnecting)

        token = self.gw.tokens.scoped_token(d.id, wire.topic_hash("com.example.app"))
        f = self.failureResultOf(self.gw.router.accept(token, "com.example.app", b"{}", b"\0" * 16, expiry=0))
        f.trap(Unregistered)
        self.assertEqual(f.value.since, self.gw.clock.seconds())
