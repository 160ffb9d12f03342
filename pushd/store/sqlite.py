"""
The embedded default store: one SQLite file in WAL mode, written by one thread.

Operations queue to the writer thread, which takes every operation waiting (up to a batch)
into one transaction and commits once: a group commit, so many accepted notifications
share one fsync and the reactor never waits on the disk. Each operation runs in its own
savepoint, so one failing does not undo the others.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
import uuid
from pathlib import Path

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pushd import private
from pushd.store.interfaces import (
    Enqueued,
    IMessageStore,
    IPresence,
    ITokenRegistry,
    Owner,
    StoredMessage,
    StoreUnavailable,
    topic_scoped_id,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    message_id BLOB NOT NULL,
    device_id TEXT NOT NULL,
    token BLOB NOT NULL,
    topic TEXT NOT NULL,
    topic_hash BLOB NOT NULL,
    payload BLOB NOT NULL,
    expiry INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    collapse_id TEXT,
    received REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_id ON messages (device_id, message_id);
CREATE INDEX IF NOT EXISTS messages_device ON messages (device_id, seq);
CREATE INDEX IF NOT EXISTS messages_topic ON messages (device_id, topic_hash, seq);
CREATE INDEX IF NOT EXISTS messages_expiry ON messages (expiry) WHERE expiry > 0;
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters VALUES ('dropped', 0);
CREATE TABLE IF NOT EXISTS invalid_tokens (token BLOB PRIMARY KEY, since REAL NOT NULL);
DROP TABLE IF EXISTS presence;
CREATE TABLE IF NOT EXISTS owners (device_id TEXT PRIMARY KEY, node TEXT NOT NULL, epoch INTEGER NOT NULL);
"""

COLUMNS = "message_id, device_id, token, topic, topic_hash, payload, expiry, priority, collapse_id, received"
SYNC_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")


def _open(path: str, synchronous: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.execute("PRAGMA busy_timeout=5000")
    db.executescript(SCHEMA)
    return db


@implementer(IMessageStore, ITokenRegistry, IPresence)
class SQLiteStore:
    log = Logger()

    def __init__(self, path, per_topic=1000, synchronous="FULL", reactor=None, max_queue=20000, batch=512):
        if reactor is None:
            from twisted.internet import reactor
        synchronous = synchronous.upper()
        if synchronous not in SYNC_MODES:
            raise ValueError(f"synchronous must be one of {', '.join(SYNC_MODES)}")
        self.path = str(Path(path))
        self.per_topic = per_topic
        self.reactor = reactor
        self.max_queue = max_queue
        self.batch = batch
        # Open once here so that a bad path or a corrupt file fails at start-up, loudly.
        try:
            private.sqlite_file(self.path)  # 0600, and so its -wal and -shm: they hold payloads
            _open(self.path, synchronous).close()
        except (sqlite3.Error, OSError) as e:
            raise StoreUnavailable(f"cannot open SQLite store {self.path}: {e}")
        self._synchronous = synchronous
        self._queue: queue.Queue = queue.Queue()
        self._queued = 0
        self._closing = False
        self._closed = defer.Deferred()
        self._thread = threading.Thread(target=self._run, name="pushd-sqlite-writer", daemon=True)
        self._thread.start()

    # --- the writer thread -------------------------------------------------------------

    def _submit(self, fn, *args):
        if self._closing:
            return defer.fail(StoreUnavailable("store is closed"))
        if self._queued >= self.max_queue:
            return defer.fail(StoreUnavailable(f"store queue full ({self.max_queue} operations)"))
        d = defer.Deferred()
        self._queued += 1
        self._queue.put((fn, args, d))
        return d

    def _run(self):
        db = _open(self.path, self._synchronous)
        stop = False
        while not stop:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < self.batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self.reactor.callFromThread(self._deliver, self._transaction(db, batch))
        db.close()
        self.reactor.callFromThread(self._closed.callback, None)

    def _transaction(self, db, batch):
        results = []
        try:
            db.execute("BEGIN IMMEDIATE")
            for fn, args, d in batch:
                db.execute("SAVEPOINT op")
                try:
                    results.append((d, fn(db, *args)))
                    db.execute("RELEASE op")
                except Exception:
                    results.append((d, Failure()))
                    db.execute("ROLLBACK TO op")
                    db.execute("RELEASE op")
            db.execute("COMMIT")
        except sqlite3.Error as e:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            f = Failure(StoreUnavailable(f"SQLite commit failed: {e}"))
            results = [(d, f) for _, _, d in batch]
        return results

    def _deliver(self, results):
        self._queued -= len(results)
        for d, result in results:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def close(self):
        if not self._closing:
            self._closing = True
            self._queue.put(None)
        return self._closed

    # --- messages (these run on the writer thread) -------------------------------------

    def enqueue(self, m):
        return self._submit(self._enqueue, m)

    def _enqueue(self, db, m):
        row = db.execute("SELECT since FROM invalid_tokens WHERE token = ?", (m.token,)).fetchone()
        if row is not None:
            return Enqueued(invalidated=row[0])
        # Replace by id only within the topic (IMessageStore.enqueue).
        mid, scoped = m.message_id, topic_scoped_id(m.message_id, m.topic_hash)
        db.execute("DELETE FROM messages WHERE device_id = ? AND message_id IN (?, ?) AND topic_hash = ?",
                   (m.device_id, mid, scoped, m.topic_hash))
        taken = {row[0] for row in db.execute(
            "SELECT message_id FROM messages WHERE device_id = ? AND message_id IN (?, ?)",
            (m.device_id, mid, scoped))}
        if mid in taken:
            mid = scoped if scoped not in taken else uuid.uuid4().bytes
        if m.collapse_id is not None:
            db.execute(
                "DELETE FROM messages WHERE device_id = ? AND topic_hash = ? AND collapse_id = ?",
                (m.device_id, m.topic_hash, m.collapse_id),
            )
        db.execute(
            f"INSERT INTO messages ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (mid, m.device_id, m.token, m.topic, m.topic_hash, m.payload,
             m.expiry, m.priority, m.collapse_id, m.received),
        )
        (count,) = db.execute(
            "SELECT COUNT(*) FROM messages WHERE device_id = ? AND topic_hash = ?", (m.device_id, m.topic_hash)
        ).fetchone()
        over = count - self.per_topic
        if over > 0:
            db.execute(
                "DELETE FROM messages WHERE seq IN (SELECT seq FROM messages WHERE device_id = ?"
                " AND topic_hash = ? ORDER BY seq LIMIT ?)",
                (m.device_id, m.topic_hash, over),
            )
            db.execute("UPDATE counters SET value = value + ? WHERE name = 'dropped'", (over,))
        # One node: no owner to name, the router wakes its own session.
        return Enqueued()

    def pending(self, device_id, topic_hashes, limit, now):
        return self._submit(self._pending, device_id, list(topic_hashes), limit, now)

    @staticmethod
    def _pending(db, device_id, topic_hashes, limit, now):
        if not topic_hashes:
            return []
        marks = ",".join("?" * len(topic_hashes))
        rows = db.execute(
            f"SELECT {COLUMNS} FROM messages WHERE device_id = ? AND topic_hash IN ({marks})"
            " AND (expiry = 0 OR expiry >= ?) ORDER BY seq LIMIT ?",
            (device_id, *topic_hashes, now, limit),
        ).fetchall()
        return [StoredMessage(*row) for row in rows]

    def ack(self, device_id, message_id):
        return self._submit(self._ack, device_id, message_id)

    @staticmethod
    def _ack(db, device_id, message_id):
        cur = db.execute("DELETE FROM messages WHERE device_id = ? AND message_id = ?", (device_id, message_id))
        return cur.rowcount > 0

    def ack_many(self, device_id, message_ids):
        return self._submit(self._ack_many, device_id, list(message_ids))

    @staticmethod
    def _ack_many(db, device_id, message_ids):
        cur = db.executemany(
            "DELETE FROM messages WHERE device_id = ? AND message_id = ?", [(device_id, m) for m in message_ids]
        )
        return cur.rowcount

    def expire(self, now):
        return self._submit(self._expire, now)

    @staticmethod
    def _expire(db, now):
        return db.execute("DELETE FROM messages WHERE expiry > 0 AND expiry < ?", (now,)).rowcount

    def counters(self):
        return self._submit(self._counters)

    @staticmethod
    def _counters(db):
        (pending,) = db.execute("SELECT COUNT(*) FROM messages").fetchone()
        (dropped,) = db.execute("SELECT value FROM counters WHERE name = 'dropped'").fetchone()
        return {"pending": pending, "dropped": dropped}

    # --- tokens and presence ---------------------------------------------------------------

    def invalidate(self, token, when):
        return self._submit(
            lambda db: db.execute("INSERT OR REPLACE INTO invalid_tokens VALUES (?, ?)", (token, when)) and None
        )

    def invalidated(self, token):
        def q(db):
            row = db.execute("SELECT since FROM invalid_tokens WHERE token = ?", (token,)).fetchone()
            return row[0] if row else None

        return self._submit(q)

    def revalidate(self, token):
        return self._submit(
            lambda db: db.execute("DELETE FROM invalid_tokens WHERE token = ?", (token,)) and None
        )

    def claim(self, device_id, node, epoch):
        def q(db):
            row = db.execute("SELECT node, epoch FROM owners WHERE device_id = ?", (device_id,)).fetchone()
            db.execute("INSERT OR REPLACE INTO owners VALUES (?, ?, ?)", (device_id, node, epoch))
            before = Owner(*row) if row else None
            return before if before != Owner(node, epoch) else None

        return self._submit(q)

    def release(self, device_id, node, epoch):
        return self._submit(
            lambda db: db.execute("DELETE FROM owners WHERE device_id = ? AND node = ? AND epoch = ?",
                                  (device_id, node, epoch)) and None
        )

    def release_all(self, node, device_ids=()):
        return self._submit(
            lambda db: db.execute("DELETE FROM owners WHERE node = ?", (node,)).rowcount
        )

    def where(self, device_id):
        def q(db):
            row = db.execute("SELECT node, epoch FROM owners WHERE device_id = ?", (device_id,)).fetchone()
            return Owner(*row) if row else None

        return self._submit(q)
