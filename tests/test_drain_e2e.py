"""
SIGTERM drains a real gateway process (SQLite store) while a provider sends: pushes
accepted around the SIGTERM all reach the app after the device reconnects to the
restarted gateway (same state dir: SQLite is not shared by two live processes), a request
arriving on HTTP/2 after the drain began is answered 503 Shutdown, the device reconnects
within the announced window (GoAway), not after a backoff, and the gateway exits by itself.
"""

from __future__ import annotations

import json
import re
import signal
import uuid

from twisted.internet import defer, reactor
from twisted.trial import unittest

from . import h2client
from .stack import TOPIC, Stack
from .test_crash import CONCURRENCY, Provider

SENDS = 120
WINDOW = 0.5  # --drain-window
TIMEOUT = 5.0  # --drain-timeout


class Stubborn(h2client.H2Client):
    """An HTTP/2 client that has not read the server's GOAWAY yet: its requests still go
    (a raw frame parser keeps GOAWAY frames from h2, which would refuse to send)."""

    def __init__(self, on_goaway):
        super().__init__()
        self.raw = b""
        self.goaways = []  # (last stream id, error code, debug data)
        self.on_goaway = on_goaway

    def dataReceived(self, data):
        self.raw += data
        keep, fresh = b"", []
        while len(self.raw) >= 9:
            size = int.from_bytes(self.raw[:3], "big")
            if len(self.raw) < 9 + size:
                break
            frame, self.raw = self.raw[:9 + size], self.raw[9 + size:]
            if frame[3] == 0x7:
                body = frame[9:]
                fresh.append((int.from_bytes(body[:4], "big") & 0x7FFFFFFF,
                              int.from_bytes(body[4:8], "big"), body[8:]))
            else:
                keep += frame
        if keep:
            super().dataReceived(keep)
        for g in fresh:
            self.goaways.append(g)
            self.on_goaway(g)


class DrainE2ETests(unittest.TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def test_sigterm_drains_and_loses_nothing(self):
        s = Stack(self, "--store", "sqlite", "--token-burst", "100000",
                  "--drain-window", str(WINDOW), "--drain-timeout", str(TIMEOUT))
        yield s.start_gateway()
        yield s.start_device("dev")
        app = s.listen(device="dev")
        token = (yield app.wait_for(r"^token ([0-9a-f]{64})$")).group(1)
        key = (s.gw_state / "provider.key").read_text().strip()
        auth = [("authorization", f"bearer {key}"), ("apns-topic", TOPIC)]

        # An HTTP/2 provider connection, authenticated before the SIGTERM.
        late = defer.Deferred()

        def goaway(g):
            # At the first GOAWAY the drain has begun: a request sent now is one arriving
            # after it (the client has not "read" the GOAWAY: it sends anyway).
            if len(stubborn.goaways) == 1:
                body = json.dumps({"id": "after-drain"}).encode()
                stubborn.request(f"/3/device/{token}", auth + [("apns-id", str(uuid.uuid4()))],
                                 body).chainDeferred(late)

        stubborn = Stubborn(goaway)
        yield h2client.connect(s.provider_port, (s.gw_state / "ca.pem").read_bytes(), client=stubborn)
        first = yield stubborn.request(f"/3/device/{token}", auth, json.dumps({"id": "h2-first"}).encode())
        self.assertEqual(first.status, 200, first.body)

        # A provider sending all along, retrying 503s and failures once the gateway is back.
        restarted = defer.Deferred()
        provider = Provider(s, lambda: restarted)
        self.addCleanup(provider.pool.closeCachedConnections)
        gateway = s.gateway
        term_at = SENDS // 3
        ended = []

        def maybe_term():
            if len(provider.accepted) == term_at and not ended:
                ended.append(reactor.seconds())
                gateway.signal(signal.SIGTERM).addCallback(exited)

        def exited(code):
            ended.append(reactor.seconds())
            ended.append(code)
            s.start_gateway().chainDeferred(restarted)

        provider.on_accept.append(maybe_term)
        sem = defer.DeferredSemaphore(CONCURRENCY)
        yield defer.gatherResults([sem.run(provider.send, token, {"id": f"p{n}"}) for n in range(SENDS)])
        yield restarted

        # The gateway exited by itself (twistd re-raises the SIGTERM once it has shut down:
        # no exit code), within the drain timeout (plus slack for a loaded machine).
        term, gone, code = ended
        drained = [line for line in gateway.lines if "drained in" in line]
        self.assertTrue(any("Server Shut Down." in line for line in gateway.lines), gateway.log())
        self.assertLess(gone - term, TIMEOUT + 3, gateway.log())
        self.assertEqual(len(drained), 1, gateway.log())
        self.assertIn("1 pushd devices told to reconnect", drained[0])
        self.assertNotIn("reached", drained[0])
        self.assertEqual([line for line in gateway.lines if "disconnected" in line], [],
                         "one summary line, not one per device")

        # HTTP/2: the first GOAWAY allows no new stream, 503 Shutdown to the one that came.
        r = yield late
        self.assertEqual(r.status, 503, r.body)
        self.assertEqual(r.json, {"reason": "Shutdown"})
        self.assertEqual(stubborn.goaways[0][:2], (2 ** 31 - 1, 0))
        yield stubborn.closed
        self.assertEqual(stubborn.goaways[-1][2], b'{"reason":"Shutdown"}')

        # The device was told to go, and reconnected within the window, not after a backoff.
        dev = s.devices["dev"]
        m = yield dev.wait_for(r"gateway going away: reconnecting in ([0-9.]+) s \(its window ([0-9.]+) s\)")
        self.assertLessEqual(float(m.group(1)), WINDOW)
        self.assertEqual(float(m.group(2)), WINDOW)
        yield dev.wait_for(r"connected as device", after=dev.lines.index(m.string))

        # Everything accepted reaches the app once; a marker last (delivery is in order).
        yield provider.send(token, {"id": "marker"})
        yield app.wait_for(r'"id": "marker"', timeout=60)
        got = [json.loads(line)["id"] for line in app.lines if line.startswith("{")]
        accepted = provider.accepted | {"h2-first"}
        summary = (f"{len(provider.accepted)} accepted by the provider (SIGTERM after {term_at}), "
                   f"{provider.failures} failed or 503 and retried; {len(got)} delivered; gateway gone "
                   f"{gone - term:.2f} s after SIGTERM; {drained[0].split('drained', 1)[1]}")
        print("\n" + summary)
        self.assertEqual(accepted - set(got), set(), summary)
        self.assertEqual(len(got), len(set(got)), "duplicates: " + summary)
        self.assertNotIn("after-drain", got)
        self.assertEqual(provider.gave_up, set(), summary)
        self.assertTrue(re.search(r"\d", summary))
