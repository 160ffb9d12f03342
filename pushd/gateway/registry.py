"""
The registry of issued device certificates and revoked devices: ``STATE-DIR/devices.sqlite3``.

One SQLite file (0600, WAL, synchronous=FULL: a certificate recorded before its enrolment is
answered survives a crash), shared by the gateway and ``pushctl device``. The gateway reads it on
every Connect (one indexed lookup) and holds the revoked devices in memory for the provider path;
``poll`` (once a second) picks up what ``pushctl device revoke`` wrote.
"""

from __future__ import annotations

import enum
import os
import sqlite3
from pathlib import Path

from cryptography import x509
from twisted.logger import Logger
from zope.interface import implementer

from pushd import tls
from pushd.store.interfaces import IDeviceRegistry

#: Most rows ``certificates`` returns, whatever the caller asks for.
MAX_LIST = 100_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS certs (
    fingerprint TEXT PRIMARY KEY,      -- SHA-256 of the certificate's DER
    serial TEXT NOT NULL,              -- hex
    device_id TEXT NOT NULL,
    key_fingerprint TEXT NOT NULL,     -- SHA-256 of the SubjectPublicKeyInfo
    issued_at REAL NOT NULL,
    not_after REAL NOT NULL,
    via TEXT NOT NULL,                 -- which enrolment or renewal issued it
    retired_until REAL                 -- set when a renewal replaced it
);
CREATE INDEX IF NOT EXISTS certs_device ON certs(device_id);
CREATE INDEX IF NOT EXISTS certs_key ON certs(key_fingerprint);
CREATE TABLE IF NOT EXISTS revoked (device_id TEXT PRIMARY KEY, at REAL NOT NULL);
"""


class Refusal(enum.StrEnum):
    """Why ``check`` refuses a certificate; its value is the text for the log."""

    REVOKED = "device revoked"
    UNKNOWN = "certificate not in the device registry (enrol again, or --legacy-certs)"
    OTHER_DEVICE = "certificate registered for another device"
    RETIRED = "certificate replaced by a renewal"
    UNAVAILABLE = "device registry unavailable"


class RegistryError(Exception):
    """The registry file cannot be opened or read."""


@implementer(IDeviceRegistry)
class DeviceRegistry:
    """
    ``legacy``: certificates of this CA issued before the registry existed (not in it) are
    accepted and recorded on their first Connect (so they become revocable); without it they
    are refused and their devices must enrol again.
    """

    log = Logger()

    def __init__(self, path: Path, legacy: bool = False):
        self.path = Path(path)
        self.legacy = legacy
        try:
            # Created 0600 before SQLite opens it: its -wal and -shm files take the same mode.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            # A short busy timeout: the gateway asks on its reactor thread; writers (an
            # enrolment, pushctl) hold the lock for one small transaction.
            self.db = sqlite3.connect(str(self.path), timeout=1.0, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
            self._version = self._data_version()
            self._revoked = dict(self.db.execute("SELECT device_id, at FROM revoked"))
        except (OSError, sqlite3.Error) as e:
            raise RegistryError(f"device registry {self.path}: {e}") from None

    def close(self):
        self.db.close()

    def _data_version(self):
        return self.db.execute("PRAGMA data_version").fetchone()[0]

    # --- writes ----------------------------------------------------------------

    def record(self, fingerprint, serial, device_id, key_fingerprint, issued_at, not_after, via):
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO certs VALUES (?, ?, ?, ?, ?, ?, ?, NULL)",
                (fingerprint, serial, device_id, key_fingerprint, issued_at, not_after, via),
            )

    def record_cert(self, cert: x509.Certificate, via: str, issued_at: float | None = None) -> None:
        self.record(*self._row(cert, via, issued_at))

    def record_certs(self, certs, via: str) -> None:
        """Certificates issued elsewhere (a bulk import), in one transaction: one fsync, not one each."""
        rows = [self._row(c, via, None) for c in certs]
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO certs VALUES (?, ?, ?, ?, ?, ?, ?, NULL)", rows)

    @staticmethod
    def _row(cert: x509.Certificate, via: str, issued_at: float | None) -> tuple:
        from cryptography.hazmat.primitives import serialization

        der = cert.public_bytes(serialization.Encoding.DER)
        return (
            tls.cert_fingerprint(der), f"{cert.serial_number:x}", tls.device_id_of(cert),
            tls.key_fingerprint(cert.public_key()),
            cert.not_valid_before_utc.timestamp() if issued_at is None else issued_at,
            cert.not_valid_after_utc.timestamp(), via,
        )

    def retire(self, fingerprint, until):
        with self.db:
            self.db.execute(
                "UPDATE certs SET retired_until = MIN(COALESCE(retired_until, ?), ?) WHERE fingerprint = ?",
                (until, until, fingerprint),
            )

    def revoke(self, device_id, when) -> bool:
        with self.db:
            new = self.db.execute("INSERT OR IGNORE INTO revoked VALUES (?, ?)", (device_id, when)).rowcount == 1
        if new:
            self._revoked[device_id] = when
        return new

    # --- reads -----------------------------------------------------------------

    def check(self, cert_der: bytes, device_id: str, now: float):
        """None if this certificate may Connect, else why not (a Refusal)."""
        if device_id in self._revoked:
            return Refusal.REVOKED
        fp = tls.cert_fingerprint(cert_der)
        try:
            row = self.db.execute(
                "SELECT device_id, retired_until FROM certs WHERE fingerprint = ?", (fp,)
            ).fetchone()
            if row is None:
                if not self.legacy:
                    return Refusal.UNKNOWN
                self.record_cert(x509.load_der_x509_certificate(cert_der), "legacy: first Connect")
                self.log.info("legacy certificate of device {device} recorded in the registry", device=device_id)
                return None
        except sqlite3.Error as e:
            self.log.error("device registry unreadable: {why}", why=str(e))
            return Refusal.UNAVAILABLE
        if row[0] != device_id:
            return Refusal.OTHER_DEVICE
        if row[1] is not None and now > row[1]:
            return Refusal.RETIRED
        return None

    def retired(self, cert_der: bytes) -> bool:
        """True if a renewal replaced this certificate (it may still Connect during the overlap)."""
        row = self.db.execute(
            "SELECT retired_until FROM certs WHERE fingerprint = ?", (tls.cert_fingerprint(cert_der),)
        ).fetchone()
        return row is not None and row[0] is not None

    def current_key(self, device_id, key_fingerprint) -> bool:
        """True if this key is the key of one of the device's certificates no renewal replaced."""
        return self.db.execute(
            "SELECT 1 FROM certs WHERE device_id = ? AND key_fingerprint = ? AND retired_until IS NULL LIMIT 1",
            (device_id, key_fingerprint),
        ).fetchone() is not None

    def revoked_at(self, device_id):
        return self._revoked.get(device_id)

    def key_known(self, key_fingerprint) -> bool:
        return self.db.execute(
            "SELECT 1 FROM certs WHERE key_fingerprint = ? LIMIT 1", (key_fingerprint,)
        ).fetchone() is not None

    def device_known(self, device_id) -> bool:
        return self.db.execute("SELECT 1 FROM certs WHERE device_id = ? LIMIT 1", (device_id,)).fetchone() is not None

    def certificates(self, limit=1000) -> list:
        rows = self.db.execute(
            "SELECT c.device_id, c.serial, c.issued_at, c.not_after, c.via, c.retired_until, r.at"
            " FROM certs c LEFT JOIN revoked r ON r.device_id = c.device_id"
            " ORDER BY c.issued_at DESC LIMIT ?",
            (max(0, min(int(limit), MAX_LIST)),),
        )
        keys = ("device_id", "serial", "issued_at", "not_after", "via", "retired_until", "revoked_at")
        return [dict(zip(keys, r)) for r in rows]

    def poll(self) -> list:
        """Newly revoked device ids, if another process (pushctl) changed the file."""
        try:
            version = self._data_version()
            if version == self._version:
                return []
            revoked = dict(self.db.execute("SELECT device_id, at FROM revoked"))
        except sqlite3.Error as e:
            self.log.error("device registry unreadable: {why}", why=str(e))
            return []
        self._version = version
        new = sorted(set(revoked) - set(self._revoked))
        self._revoked = revoked
        return new
