"""
Pushes waiting for their app, on disk: a push acked to the gateway is the device's to keep,
so an app that is not running gets it when it comes back, even after the daemon restarted.
One small SQLite file in the device's state dir (WAL, synchronous=NORMAL: survives the
daemon crashing; a device is not a server, so its few writes run on the reactor thread).
It also remembers the last message ids seen, so a push resent by the gateway is taken once.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from pushd import private

SEEN_KEPT = 4096


class HeldQueue:
    def __init__(self, path: Path):
        private.sqlite_file(path)  # 0600, and so its -wal and -shm: they hold payloads
        self.db = sqlite3.connect(str(path), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS held (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL,
                                             payload BLOB NOT NULL, message_id BLOB NOT NULL);
            CREATE INDEX IF NOT EXISTS held_topic ON held (topic, seq);
            CREATE TABLE IF NOT EXISTS seen (seq INTEGER PRIMARY KEY, message_id BLOB UNIQUE NOT NULL);
            """
        )
        self._counts = dict(self.db.execute("SELECT topic, COUNT(*) FROM held GROUP BY topic"))

    def seen(self, message_id: bytes) -> bool:
        return self.db.execute("SELECT 1 FROM seen WHERE message_id = ?", (message_id,)).fetchone() is not None

    def append(self, topic: str, payload: bytes, message_id: bytes) -> None:
        """Keep a push (in one transaction with remembering its id)."""
        with self.db:
            self.db.execute("BEGIN")
            self.db.execute("INSERT INTO held (topic, payload, message_id) VALUES (?, ?, ?)",
                            (topic, payload, message_id))
            cur = self.db.execute("INSERT OR IGNORE INTO seen (message_id) VALUES (?)", (message_id,))
            if cur.lastrowid and cur.lastrowid % 256 == 0:
                self.db.execute("DELETE FROM seen WHERE seq <= ?", (cur.lastrowid - SEEN_KEPT,))
        self._counts[topic] = self._counts.get(topic, 0) + 1

    def head(self, topic: str):
        """The oldest push of a topic: (payload, message id), or None."""
        return self.db.execute(
            "SELECT payload, message_id FROM held WHERE topic = ? ORDER BY seq LIMIT 1", (topic,)
        ).fetchone()

    def remove(self, topic: str, message_id: bytes) -> None:
        cur = self.db.execute("DELETE FROM held WHERE topic = ? AND message_id = ?", (topic, message_id))
        if cur.rowcount:
            self._counts[topic] -= cur.rowcount

    def count(self, topic: str) -> int:
        return self._counts.get(topic, 0)

    def items(self, topic: str) -> list:
        return self.db.execute(
            "SELECT payload, message_id FROM held WHERE topic = ? ORDER BY seq", (topic,)
        ).fetchall()

    def close(self) -> None:
        self.db.close()
