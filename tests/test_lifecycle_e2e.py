"""
Device lifecycle end to end, real processes and real TLS: pushctl device revoke against a running
gateway (live session closed, Connect refused, pushes 410), and certificate renewal by the device
daemon across a restart of it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from cryptography import x509
from twisted.internet import defer, threads
from twisted.trial import unittest

from pushd import tls
from pushd.device import identity as identity_mod
from pushd.device.identity import EnrolError, Identity

from . import procs
from .stack import Stack


class RevokeTests(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_revoke_closes_session_refuses_connect_and_pushes_410(self):
        s = Stack(self)
        yield s.start_gateway()
        yield s.start_device()
        device_id = (yield s.device.wait_for(r"connected as device ([0-9a-f]{32})")).group(1)
        app = s.listen(1)
        token = (yield app.wait_for(r"^token ([0-9a-f]{64})$")).group(1)
        out, err, code = yield s.send(token, {"n": 1})
        self.assertTrue(out.startswith(b"200 "), out + err)
        yield app.wait_for(r'"n": 1')

        out, err, code = yield procs.run(procs.PUSHCTL + ["device", "list", "-d", str(s.gw_state), "--json"], s.dir)
        self.assertEqual(code, 0, err)
        (row,) = json.loads(out)
        self.assertEqual((row["device_id"], row["revoked_at"]), (device_id, None))
        self.assertRegex(row["via"], r"^enrol from 127\.0\.0\.1 nonce [0-9a-f]{8}$")

        gw_mark, dev_mark = len(s.gateway.lines), len(s.device.lines)
        out, err, code = yield procs.run(procs.PUSHCTL + ["device", "revoke", "-d", str(s.gw_state), device_id], s.dir)
        self.assertEqual((code, out.decode().strip()), (0, f"device {device_id} revoked"), err)
        # The running gateway notices within about a second and closes the live session...
        yield s.gateway.wait_for(rf"device {device_id} revoked: closing its session", timeout=5, after=gw_mark)
        yield s.device.wait_for(r"courier connection lost", timeout=5, after=dev_mark)
        # ...refuses its Connect from then on (the daemon keeps retrying with backoff)...
        yield s.gateway.wait_for(rf"Connect refused: device {device_id}: device revoked", timeout=10, after=gw_mark)
        yield s.device.wait_for(r"gateway refused Connect", timeout=10, after=dev_mark)
        # ...and its tokens answer providers 410 Unregistered.
        out, err, code = yield s.send(token, {"n": 2})
        self.assertRegex(out.decode(), r'^410 apns-id: \S+ \{"reason": "Unregistered", "timestamp": \d{13}\}')

        # A restarted gateway still refuses it (the registry is on disk).
        yield s.gateway.stop()
        yield s.start_gateway()
        yield s.gateway.wait_for(rf"Connect refused: device {device_id}: device revoked", timeout=15)
        self.assertEqual(s.device.count(r"connected as device"), 1, s.device.log())


class RenewalTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_renewal_keeps_device_id_and_tokens_and_survives_daemon_restart(self):
        # Certificates of 43 s, renewed at a tenth of their life (about every 4 s).
        s = Stack(self, "--cert-days", "0.0005")
        yield s.start_gateway()
        yield s.start_device("device", "--renew-at", "0.1")
        device_id = (yield s.device.wait_for(r"connected as device ([0-9a-f]{32})")).group(1)
        first = x509.load_pem_x509_certificate((s.dev_state / "device.pem").read_bytes())
        first_key = tls.load_key((s.dev_state / "device.key").read_bytes())
        life = (first.not_valid_after_utc - first.not_valid_before_utc).total_seconds()
        self.assertLess(abs(life - 43.2), 1.0)
        app = s.listen(1)
        token = (yield app.wait_for(r"^token ([0-9a-f]{64})$")).group(1)

        m = yield s.device.wait_for(r"renewed certificate: serial ([0-9a-f]+) -> ([0-9a-f]+)", timeout=30)
        self.assertEqual(int(m.group(1), 16), first.serial_number)
        yield s.gateway.wait_for(rf"renewed device {device_id}'s certificate")
        # The replaced certificate's key (as if leaked) renews no more, over the real HTTPS API.
        leaked = Identity(Path(self.mktemp()), first_key, first, (s.dev_state / "ca.pem").read_bytes())
        leaked.state_dir.mkdir()
        with self.assertRaises(EnrolError) as e:
            yield threads.deferToThread(identity_mod.renew, f"https://127.0.0.1:{s.provider_port}", leaked)
        self.assertEqual((e.exception.status, e.exception.reason), (403, "CertificateReplaced"))
        yield s.device.stop()
        renewed = [re.search(r"-> ([0-9a-f]+)", line).group(1) for line in s.device.lines
                   if "renewed certificate" in line]
        on_disk = x509.load_pem_x509_certificate((s.dev_state / "device.pem").read_bytes())
        self.assertEqual(f"{on_disk.serial_number:x}", renewed[-1])
        self.assertFalse((s.dev_state / "renewal.pem").exists())
        key = tls.load_key((s.dev_state / "device.key").read_bytes())
        self.assertEqual(tls.key_fingerprint(key.public_key()), tls.key_fingerprint(on_disk.public_key()))
        self.assertNotEqual(tls.key_fingerprint(key.public_key()), tls.key_fingerprint(first.public_key()))

        # The restarted daemon connects with the renewed certificate: same device, same tokens.
        gw_mark = len(s.gateway.lines)
        yield s.start_device("device", "--renew-at", "0.1")
        self.assertEqual((yield s.device.wait_for(r"connected as device ([0-9a-f]{32})")).group(1), device_id)
        yield s.gateway.wait_for(rf"device {device_id} connected from", after=gw_mark)
        app = s.listen(1)
        self.assertEqual((yield app.wait_for(r"^token ([0-9a-f]{64})$")).group(1), token)
        out, err, code = yield s.send(token, {"after": "renewal"})
        self.assertTrue(out.startswith(b"200 "), out + err)
        yield app.wait_for(r'"after": "renewal"')

        out, err, code = yield procs.run(procs.PUSHCTL + ["device", "list", "-d", str(s.gw_state), "--json"], s.dir)
        rows = json.loads(out)
        self.assertGreaterEqual(len(rows), 2)
        self.assertEqual({r["device_id"] for r in rows}, {device_id})
        self.assertIn(f"renewal of {first.serial_number:x}", [r["via"] for r in rows])
