"""
Store and forward that loses nothing, with real processes: notifications to offline
devices while the gateway is killed with SIGKILL (and, with Redis, Redis too), then the
devices come online. Every notification that got 200 reaches its app exactly once; none
that expired does.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
import uuid
from io import BytesIO

from twisted.internet import defer, reactor, ssl, task
from twisted.trial import unittest
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from .redis_server import RedisServer
from .stack import TOPIC, Stack

DEVICES = 3
PER_DEVICE = 120  # past the device's held-queue bound, so the decline path runs too
EXPIRING = 10  # per device, sent first with a short apns-expiration
CONCURRENCY = 8
TRIES = 8


class Provider:
    """An app server with retries: a failed or 503 request is sent again with the same apns-id."""

    def __init__(self, stack, up):
        self.stack = stack
        self.up = up  # a callable returning a Deferred that fires when the gateway is usable
        ca = ssl.Certificate.loadPEM((stack.gw_state / "ca.pem").read_bytes())
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = CONCURRENCY
        self.agent = Agent(reactor, BrowserLikePolicyForHTTPS(trustRoot=ca), pool=self.pool)
        self.key = (stack.gw_state / "provider.key").read_text().strip()
        self.url = f"https://localhost:{stack.provider_port}/3/device/"
        self.accepted: set = set()
        self.gave_up: set = set()
        self.attempts = 0
        self.failures = 0
        self.on_accept = []

    @defer.inlineCallbacks
    def send(self, token, payload, expiry=None):
        apns_id = str(uuid.uuid4())
        headers = {"authorization": [f"bearer {self.key}"], "apns-topic": [TOPIC], "apns-id": [apns_id]}
        if expiry is not None:
            headers["apns-expiration"] = [str(expiry)]
        for _ in range(TRIES):
            self.attempts += 1
            try:
                resp = yield self.agent.request(
                    b"POST", (self.url + token).encode(), Headers(headers),
                    FileBodyProducer(BytesIO(json.dumps(payload).encode())),
                )
                yield readBody(resp)
                if resp.code == 200:
                    self.accepted.add(payload["id"])
                    for f in self.on_accept:
                        f()
                    return
                if resp.code != 503:
                    raise AssertionError(f"unexpected {resp.code} for {payload}")
            except AssertionError:
                raise
            except Exception:
                pass
            self.failures += 1
            yield self.up()
            yield task.deferLater(reactor, 0.05, lambda: None)  # a provider's pause before a retry
        self.gave_up.add(payload["id"])


class CrashTestMixin:
    timeout = 300
    #: Bursts of pushes to one token are the point here, not the rate limit.
    gateway_args: tuple = ("--token-burst", "100000")

    def startBackend(self):
        return defer.succeed(None)

    def backendChaos(self, provider, outage):
        """Extra faults while sending (a Redis crash); fire when recovered. ``outage()``
        returns a Deferred to fire once the fault is over (retries wait for it)."""
        return defer.succeed(None)

    @defer.inlineCallbacks
    def test_nothing_accepted_is_lost(self):
        yield self.startBackend()
        s = Stack(self, *self.gateway_args)
        yield s.start_gateway()
        names = [f"dev{i}" for i in range(DEVICES)]

        # Enrol the devices and register their apps, then take them offline.
        tokens = {}
        for name in names:
            yield s.start_device(name)
            app = s.listen(device=name)
            tokens[name] = (yield app.wait_for(r"^token ([0-9a-f]{64})$")).group(1)
            yield app.stop()
            yield s.devices[name].stop()

        outages = []

        def outage():
            d = defer.Deferred()
            outages.append(d)
            d.addBoth(lambda r: outages.remove(d) or r)
            return d

        provider = Provider(s, lambda: defer.gatherResults(list(outages)))
        self.addCleanup(provider.pool.closeCachedConnections)

        # SIGKILL the gateway once a random share of the sends has been accepted.
        total = DEVICES * PER_DEVICE
        kill_at = random.randint(total // 5, total * 3 // 5)
        restarted = defer.Deferred()

        def maybe_kill():
            if len(provider.accepted) == kill_at and not restarted.called:
                back = outage()
                d = s.gateway.signal(signal.SIGKILL)
                d.addCallback(lambda _: s.start_gateway())
                d.addCallback(back.callback)
                d.chainDeferred(restarted)

        provider.on_accept.append(maybe_kill)

        expires = int(time.time()) + 3
        sem = defer.DeferredSemaphore(CONCURRENCY)
        sends = []
        for name in names:
            for n in range(EXPIRING):
                sends.append(sem.run(provider.send, tokens[name], {"id": f"{name}/x{n}"}, expires))
        for n in range(PER_DEVICE - EXPIRING):
            for name in names:
                sends.append(sem.run(provider.send, tokens[name], {"id": f"{name}/{n}"}))
        chaos = self.backendChaos(provider, outage)
        yield defer.gatherResults(sends)
        yield restarted
        yield chaos

        # Let the short-lived ones expire, then bring the devices and their apps online.
        wait = expires + 1.5 - time.time()
        if wait > 0:
            yield task.deferLater(reactor, wait, lambda: None)
        apps = {}
        for name in names:
            yield s.start_device(name)
            apps[name] = s.listen(device=name)
        # A last marker per device: delivery is in order, so once it arrives everything
        # stored before it has arrived (and any duplicate would have, too).
        for name in names:
            yield apps[name].wait_for(r"^token ")
            yield provider.send(tokens[name], {"id": f"{name}/marker"})
        for name in names:
            yield apps[name].wait_for(r'"id": "%s/marker"' % name, timeout=120)

        delivered = []
        for name in names:
            delivered += [json.loads(line)["id"] for line in apps[name].lines if line.startswith("{")]
        got = set(delivered)
        accepted = provider.accepted
        expired_sent = {f"{name}/x{n}" for name in names for n in range(EXPIRING)}
        summary = (
            f"{self.__class__.__name__}: sent {total} (+{DEVICES} markers) to {DEVICES} offline devices, "
            f"gateway SIGKILLed after {kill_at} accepted"
            + (f", Redis SIGKILLed after {self.redis_killed_at}" if hasattr(self, "redis_killed_at") else "")
            + f"; {provider.attempts} requests, "
            f"{provider.failures} failed or 503 and retried, {len(accepted)} accepted (200), "
            f"{len(provider.gave_up)} given up; delivered {len(delivered)} "
            f"({len(delivered) - len(got)} duplicates), accepted but missing {len(accepted - expired_sent - got)}, "
            f"expired delivered {len(got & expired_sent)}"
        )
        print("\n" + summary)
        if os.environ.get("PUSHD_CRASH_DEBUG"):  # a file to write the logs to
            with open(os.environ["PUSHD_CRASH_DEBUG"], "w") as f:
                f.write("missing " + " ".join(sorted(accepted - expired_sent - got)) + "\n")
                for name in names:
                    f.write(s.devices[name].log() + "\n" + apps[name].log() + "\n")
                f.write(s.gateway.log())
        self.assertEqual(accepted - expired_sent - got, set(), summary)
        self.assertEqual(len(delivered), len(got), "duplicates: " + summary)
        self.assertEqual(got & expired_sent, set(), summary)
        self.assertEqual(got - accepted, set(), "delivered what was never sent: " + summary)
        self.assertEqual(provider.gave_up, set(), summary)
        self.assertGreater(provider.failures, 0, "the kill hit no request: " + summary)


class SQLiteCrashTests(CrashTestMixin, unittest.TestCase):
    gateway_args = CrashTestMixin.gateway_args + ("--store", "sqlite")


class RedisCrashTests(CrashTestMixin, unittest.TestCase):
    """The same with the Redis store, and Redis itself SIGKILLed and restarted mid-send."""

    @defer.inlineCallbacks
    def startBackend(self):
        self.redis = RedisServer(self)
        yield self.redis.start()
        self.gateway_args = CrashTestMixin.gateway_args + ("--store", self.redis.url)

    def backendChaos(self, provider, outage):
        total = DEVICES * PER_DEVICE
        kill_at = random.randint(total // 2, total * 4 // 5)
        recovered = defer.Deferred()

        def maybe_kill():
            if len(provider.accepted) == kill_at and not recovered.called:
                back = outage()
                self.redis_killed_at = kill_at
                d = self.redis.kill()
                d.addCallback(lambda _: self.redis.start())
                d.addCallback(back.callback)
                d.chainDeferred(recovered)

        provider.on_accept.append(maybe_kill)
        return recovered
