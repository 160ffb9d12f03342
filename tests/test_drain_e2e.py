"""
SIGTERM drains a real gateway process (SQLite store) while a provider sends: pushes
accepted around the SIGTERM all reach the app after the device reconnects to the
restarted gateway (same state dir: SQLite is not shared by two live processes), a request
arriving on a busy HTTP/2 connection after the drain began is answered 503 Shutdown, the device reconnects
within the announced window (GoAway), not after a backoff, and the gateway exits by itself.
"""

from __future__ import annotations

import json
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

        # An HTTP/2 provider connection, authenticated before the SIGTERM, with a request
        # whose body has not come yet: the connection is busy when the drain begins, so it
        # stays open (no GOAWAY) until that request is answered.
        h2 = yield h2client.connect(s.provider_port, (s.gw_state / "ca.pem").read_bytes())
        first = yield h2.request(f"/3/device/{token}", auth, json.dumps({"id": "h2-first"}).encode())
        self.assertEqual(first.status, 200, first.body)
        body = json.dumps({"id": "h2-open"}).encode()
        held = h2.request(f"/3/device/{token}", auth + [("content-length", str(len(body)))], end=False)
        late = defer.Deferred()

        def drain_began(_):
            # A request arriving after the drain began: 503 Shutdown. Then the held one ends.
            body = json.dumps({"id": "after-drain"}).encode()
            h2.request(f"/3/device/{token}", auth, body).chainDeferred(late)
            h2.conn.send_data(held.stream_id, json.dumps({"id": "h2-open"}).encode(), end_stream=True)
            h2.flush()

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
                gateway.wait_for(r"draining: at most").addCallback(drain_began)
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

        # HTTP/2: 503 Shutdown for the request that came after the drain began, and for the
        # one whose body completed then (not dispatched before); then GOAWAY NO_ERROR.
        for r in ((yield late), (yield held)):
            self.assertEqual((r.status, r.json), (503, {"reason": "Shutdown"}), r.body)
        yield h2.closed
        self.assertEqual(h2.terminated.error_code, 0)
        self.assertEqual(h2.terminated.additional_data, b'{"reason":"Shutdown"}')

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
        self.assertEqual({"after-drain", "h2-open"} & set(got), set())
        self.assertEqual(provider.gave_up, set(), summary)
