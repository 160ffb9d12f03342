"""
Local isolation: state is the owner's only (directories 0700, files 0600, whatever the
umask), and an app's topic belongs to the uid that registered it, read by SO_PEERCRED
over the daemon's real UNIX socket, from a process that really runs as another user.
"""

from __future__ import annotations

import os
import socket
import stat
import tempfile
import shutil
from pathlib import Path

from twisted.internet import defer, endpoints, protocol, reactor, threads
from twisted.logger import globalLogPublisher
from twisted.protocols import amp
from twisted.trial import unittest

from pushd import private as private_module
from pushd import tls, wire
from pushd.device import amp as cmds
from pushd.device import client
from pushd.device.daemon import AppProtocol, DeviceDaemon
from pushd.device.identity import Identity
from pushd.gateway.auth import ProviderKeys
from pushd.store.sqlite import SQLiteStore

from . import stack
from .helpers import CA_CERT, Device
from .store_contract import msg

NOBODY = 65534


def modes(directory: Path) -> dict:
    """Mode of the directory ('.') and of everything in it but symlinks (Twisted's lock file)."""
    found = {".": stat.S_IMODE(directory.stat().st_mode)}
    for p in directory.iterdir():
        st = os.lstat(p)
        if not stat.S_ISLNK(st.st_mode):
            found[p.name] = stat.S_IMODE(st.st_mode)
    return found


def private(names) -> dict:
    return {".": 0o700, **{n: 0o600 for n in names}}


class Umask022:
    def setUp(self):
        old = os.umask(0o022)
        self.addCleanup(os.umask, old)
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def tightened(self):
        return sorted(Path(e["path"]).name for e in self.logged if "open to other users" in e.get("log_format", ""))

    def loosen(self, directory: Path):
        """Make the dir 0755 and what is in it 0644; return their names."""
        directory.chmod(0o755)
        for p in directory.iterdir():
            p.chmod(0o644)
        return sorted([directory.name, *(p.name for p in directory.iterdir())])


class GatewayStateTests(Umask022, unittest.TestCase):
    GATEWAY_FILES = ["ca.key", "ca.pem", "server.key", "server.pem", "enrol.secret", "provider.key",
                     "token.secret", "providers.json", "pushd.sqlite3", "pushd.sqlite3-wal", "pushd.sqlite3-shm"]

    @defer.inlineCallbacks
    def start(self, state: Path):
        """What the gateway's makeService creates in its state dir, with a push stored."""
        tls.load_or_create_pki(state, ["localhost"])
        tls.secret_file(state / "token.secret")
        ProviderKeys().save(state / "providers.json")
        store = SQLiteStore(state / "pushd.sqlite3")
        yield store.enqueue(msg(b"a payload"))
        return store

    @defer.inlineCallbacks
    def test_created_private_whatever_the_umask(self):
        state = Path(self.mktemp())
        store = yield self.start(state)
        self.assertEqual(modes(state), private(self.GATEWAY_FILES))
        yield store.close()
        self.assertEqual(self.tightened(), [])

    @defer.inlineCallbacks
    def test_looser_state_tightened_at_start_with_a_log_line(self):
        state = Path(self.mktemp())
        yield (yield self.start(state)).close()
        loosened = self.loosen(state)
        store = yield self.start(state)
        self.assertEqual(modes(state), private(self.GATEWAY_FILES))
        yield store.close()
        self.assertEqual(self.tightened(), loosened, "one line per path tightened")


class PrivateWriteTests(Umask022, unittest.TestCase):
    def test_a_loose_temporary_file_left_by_a_crash_does_not_leak_its_mode(self):
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(b"left behind")
        tmp.chmod(0o666)
        private_module.write(path, b"secret")
        self.assertEqual((path.read_bytes(), stat.S_IMODE(path.stat().st_mode)), (b"secret", 0o600))


    def test_root_writing_keeps_the_daemons_ownership(self):
        """sudo pushctl keys ... for a gateway running as its own user: it must still read the file."""
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root")
        state = Path(self.mktemp())
        state.mkdir(parents=True)
        os.chown(state, NOBODY, NOBODY)
        private_module.write(state / "providers.json", b"{}")
        st = (state / "providers.json").stat()
        self.assertEqual((st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)), (NOBODY, NOBODY, 0o600))


class DeviceStateTests(Umask022, unittest.TestCase):
    DEVICE_FILES = ["device.key", "device.pem", "ca.pem", "state.json",
                    "held.sqlite3", "held.sqlite3-wal", "held.sqlite3-shm"]

    def start(self, state: Path, create: bool):
        dev = Device()
        ident = (Identity.create(state, dev.key, dev.cert, tls.cert_pem(CA_CERT)) if create
                 else Identity.load(state))
        daemon = DeviceDaemon(ident, reactor)
        app = type("App", (), {"uid": 1000, "process": None, "topics": set()})()
        daemon.register("com.example.app", app)
        daemon.app_gone(app)
        daemon.notificationReceived(wire.Notification(token=b"T" * 32, topic=wire.topic_hash("com.example.app"),
                                                      payload=b"{}", message_id=os.urandom(16)))
        return daemon

    def test_created_private_whatever_the_umask(self):
        state = Path(self.mktemp())
        daemon = self.start(state, create=True)
        self.addCleanup(daemon.held.close)
        self.assertEqual(modes(state), private(self.DEVICE_FILES))

    def test_looser_state_tightened_at_start_with_a_log_line(self):
        state = Path(self.mktemp())
        self.start(state, create=True).held.close()
        loosened = self.loosen(state)
        daemon = self.start(state, create=False)
        self.addCleanup(daemon.held.close)
        self.assertEqual(modes(state), private(self.DEVICE_FILES))
        self.assertEqual(self.tightened(), loosened, "one line per path tightened")


class ProcessesTests(unittest.TestCase):
    """The real gateway and device daemon, started under umask 022, leave nothing readable by others."""

    @defer.inlineCallbacks
    def test_gateway_and_device_state_after_a_push(self):
        old = os.umask(0o022)
        self.addCleanup(os.umask, old)
        s = stack.Stack(self)
        yield s.start_gateway()
        yield s.start_device()
        app = s.listen(count=1)
        token = (yield app.wait_for(r"token ([0-9a-f]+)")).group(1)
        out, err, code = yield s.send(token, {"aps": {"alert": "private"}})
        self.assertEqual(code, 0, err)
        yield app.wait_for(r"private")
        gw = modes(s.gw_state)
        self.assertEqual(gw, {name: (0o700 if name == "." else 0o600) for name in gw})
        self.assertTrue({"ca.key", "enrol.secret", "pushd.sqlite3", "pushd.sqlite3-wal"} <= set(gw), gw)
        dev = modes(s.dev_state)
        self.assertEqual(dev, {name: (0o700 if name == "." else 0o600) for name in dev})
        self.assertTrue({"device.key", "state.json", "held.sqlite3", "held.sqlite3-wal", "pushd.sock"} <= set(dev), dev)


def _ask_as(uid: int, path: str, topic: str) -> dict:
    """
    Fork a child that becomes ``uid``, sends one AMP Register over the socket at ``path`` and
    hands back the answer box. Runs in a thread: the reactor serves the daemon meanwhile.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only system calls, then _exit
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(path)
            s.sendall(amp.AmpBox(_ask=b"1", _command=b"Register", topic=topic.encode()).serialize())
            data = b""
            while not _box_complete(data):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            os.write(w, data)
        except BaseException as e:  # noqa: B036 - anything at all goes back to the test
            os.write(w, b"\xff" + repr(e).encode())
        finally:
            os._exit(0)
    os.close(w)
    out = b""
    while chunk := os.read(r, 65536):
        out += chunk
    os.close(r)
    os.waitpid(pid, 0)
    if out.startswith(b"\xff"):
        raise AssertionError(f"child as uid {uid}: {out[1:].decode()}")
    (box,) = amp.parseString(out)
    return {k.decode(): v.decode() for k, v in box.items()}


def _box_complete(data: bytes) -> bool:
    i = 0
    while i + 2 <= len(data):
        n = int.from_bytes(data[i:i + 2], "big")
        if n == 0:
            return True
        i += 2 + n
        if i + 2 > len(data):
            return False
        i += 2 + int.from_bytes(data[i:i + 2], "big")
    return False


class PeerCredentialTests(unittest.TestCase):
    """Two real users on one daemon socket (opened to every user, as a system-wide daemon's would be)."""

    def setUp(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("becoming another uid needs root")
        dev = Device()
        self.ident = Identity.create(Path(self.mktemp()), dev.key, dev.cert, tls.cert_pem(CA_CERT))
        for topic in ("com.root.app", "com.nobody.app"):
            self.ident.tokens[topic] = os.urandom(32)  # known tokens: Register answers at once
        self.daemon = DeviceDaemon(self.ident, reactor)
        self.addCleanup(self.daemon.close)
        sockdir = tempfile.mkdtemp(prefix="pushd-uid-")
        os.chmod(sockdir, 0o755)
        self.addCleanup(shutil.rmtree, sockdir, True)
        self.path = os.path.join(sockdir, "pushd.sock")
        ep = endpoints.UNIXServerEndpoint(reactor, self.path, mode=0o666)
        factory = protocol.Factory.forProtocol(lambda: AppProtocol(self.daemon))
        return ep.listen(factory).addCallback(lambda port: self.addCleanup(port.stopListening))

    @defer.inlineCallbacks
    def connect(self):
        c = yield client.connect(reactor, self.path)
        self.addCleanup(lambda: c.closed.called or c.transport.loseConnection() or c.closed)
        return c

    @defer.inlineCallbacks
    def test_a_topic_belongs_to_the_uid_that_registered_it(self):
        root = yield self.connect()
        token = yield root.register("com.root.app")
        self.assertEqual(token, self.ident.tokens["com.root.app"])

        # nobody cannot take root's topic: a clear error, and root keeps it.
        answer = yield threads.deferToThread(_ask_as, NOBODY, self.path, "com.root.app")
        self.assertEqual(answer["_error_code"], "TOPIC_OWNED")
        self.assertIn("registered by another user (uid 0)", answer["_error_description"])
        self.assertFalse(root.transport.disconnecting)

        # nobody registers its own topic; then root cannot take that one (the client raises TopicOwned).
        answer = yield threads.deferToThread(_ask_as, NOBODY, self.path, "com.nobody.app")
        self.assertEqual(answer["token"], self.ident.tokens["com.nobody.app"].hex())
        err = yield self.assertFailure(root.register("com.nobody.app"), cmds.TopicOwned)
        self.assertIn("uid 65534", str(err))
        self.assertEqual({t: Identity.load(self.ident.state_dir).apps[t]["uid"] for t in self.ident.apps},
                         {"com.root.app": 0, "com.nobody.app": NOBODY})

    @defer.inlineCallbacks
    def test_same_uid_takes_over(self):
        first = yield self.connect()
        yield first.register("com.root.app")
        second = yield self.connect()
        yield second.register("com.root.app")
        yield first.closed  # the daemon closed the first registrant's connection
        self.assertEqual(self.daemon.apps["com.root.app"].uid, 0)
