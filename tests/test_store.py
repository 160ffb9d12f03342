"""The store contract, run against every provider."""

import os
import stat
from pathlib import Path

from twisted.internet import defer
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from pushd.store.interfaces import StoreUnavailable
from pushd.store.memory import MemoryStore
from pushd.store.sqlite import SQLiteStore

from .store_contract import DurableStoreContract, StoreContract, msg


class MemoryStoreTests(StoreContract, unittest.TestCase):
    def makeStore(self, per_topic):
        return defer.succeed(MemoryStore(per_topic=per_topic))


class SQLiteStoreTests(StoreContract, DurableStoreContract, unittest.TestCase):
    def makeStore(self, per_topic):
        self.path = Path(self.mktemp())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        store = SQLiteStore(self.path, per_topic=per_topic)
        self.addCleanup(lambda: self.store.close())
        return defer.succeed(store)

    @defer.inlineCallbacks
    def reopen(self, store):
        yield store.close()
        return SQLiteStore(self.path, per_topic=store.per_topic)

    @defer.inlineCallbacks
    def test_group_commit(self):
        """Operations queued together commit together, and each gets its own answer."""
        ds = [self.store.enqueue(msg(b"%d" % i)) for i in range(50)]
        ds.append(self.store.ack("nobody", b"x"))
        results = yield defer.gatherResults(ds)
        self.assertEqual(results[-1], False)
        c = yield self.store.counters()
        self.assertEqual(c["pending"], self.per_topic)

    @defer.inlineCallbacks
    def test_one_failing_operation_does_not_undo_others(self):
        bad = msg(b"bad")
        bad.payload = None  # NOT NULL violation
        d1 = self.store.enqueue(msg(b"good"))
        d2 = self.store.enqueue(bad)
        yield d1
        yield self.assertFailure(d2, Exception)
        c = yield self.store.counters()
        self.assertEqual(c["pending"], 1)

    def test_bounded_queue(self):
        self.store.max_queue = 2
        ds = [self.store.enqueue(msg()) for _ in range(3)]
        self.failureResultOf(ds[2], StoreUnavailable)
        return defer.gatherResults(ds[:2])

    def test_bad_path_fails_loudly(self):
        with self.assertRaisesRegex(StoreUnavailable, "cannot open SQLite store"):
            SQLiteStore("/nonexistent/dir/pushd.sqlite3")

    def test_closed_store_refuses(self):
        d = self.store.close()
        self.failureResultOf(self.store.enqueue(msg()), StoreUnavailable)
        return d

    @defer.inlineCallbacks
    def test_files_are_0600_whatever_the_umask(self):
        """The database and its -wal and -shm hold payloads: owner only."""
        old = os.umask(0o022)
        self.addCleanup(os.umask, old)
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        store = SQLiteStore(path)
        yield store.enqueue(msg(b"secret"))
        files = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
        self.assertEqual({f.name: stat.S_IMODE(f.stat().st_mode) for f in files},
                         {f.name: 0o600 for f in files})
        yield store.close()

    @defer.inlineCallbacks
    def test_looser_files_are_tightened_at_start_and_logged(self):
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        store = SQLiteStore(path)
        yield store.enqueue(msg(b"secret"))
        yield store.close()
        files = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
        for f in files:
            if not f.exists():
                f.write_bytes(b"")
            f.chmod(0o644)
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        store = SQLiteStore(path)
        # (SQLite may remove an empty -wal and -shm when a connection closes, at any moment:
        # each file is looked at once.)
        modes = []
        for f in files:
            try:
                modes.append(stat.S_IMODE(f.stat().st_mode))
            except FileNotFoundError:
                continue
        self.assertTrue(modes)
        self.assertEqual(modes, [0o600] * len(modes))
        self.assertEqual(sorted(e["path"] for e in logged if e.get("old") == "0644"), sorted(map(str, files)))
        yield store.close()
