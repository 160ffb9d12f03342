"""
This gateway process as one node of a cluster sharing a store (docs/cluster.md).

A node has an id and a heartbeat (INodeBus.beat, every ``heartbeat`` seconds, alive for
``ttl``): the store's presence entries (device -> node, epoch) count only while their node's
heartbeat lives, so nothing is renewed per device. The router persists a push and learns the
device's owner in the same store call; if that is another node, the Outbox here PUBLISHes a
wake on that node's channel, coalesced. A device that connects here while another live node
held it has that node told (a kick, by epoch) to close its older session.

PUB/SUB is at-most-once, so nothing depends on one message arriving: when the subscription is
(re)established, or the heartbeat had lapsed, every local session re-reads its queue; a
device that connects always drains its backlog. A probe on the node's own channel each beat
finds a subscription that has stopped delivering (a half-open connection, a failover that
nobody noticed) and has it re-established.
"""

from __future__ import annotations

import os
import re
import socket
import time

from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger

#: What a node id may hold: it is part of Redis key and channel names and of presence values.
NODE_ID = re.compile(r"[A-Za-z0-9._:-]{1,100}\Z")

WAKE, KICK, ALL, PROBE = b"w", b"k", b"a", b"p"


def default_node_id(clock=None) -> str:
    """Host name, pid and start time (ms, base 36): unique across restarts and hosts."""
    now = clock.seconds() if clock is not None else time.time()
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:60] or "host"
    return f"{host}-{os.getpid()}-{_base36(int(now * 1000))}"


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if not n:
            return out


def encode(wakes=(), kicks=(), everyone=False, probe=None) -> bytes:
    """One bus message: lines of ``w id id ...``, ``k id epoch``, ``a`` (wake all), ``p n``."""
    lines = []
    if everyone:
        lines.append(ALL)
    elif wakes:
        lines.append(b" ".join([WAKE, *(d.encode("ascii") for d in wakes)]))
    lines += [b"%s %s %d" % (KICK, d.encode("ascii"), epoch) for d, epoch in kicks]
    if probe is not None:
        lines.append(b"%s %d" % (PROBE, probe))
    return b"\n".join(lines)


def decode(data: bytes):
    """-> (device ids to wake, [(device id, epoch)] to kick, wake everyone?, probe or None)."""
    wakes, kicks, everyone, probe = [], [], False, None
    for line in data.split(b"\n"):
        words = line.split()
        if not words:
            continue
        kind, args = words[0], words[1:]
        if kind == WAKE:
            wakes += [w.decode("ascii") for w in args]
        elif kind == KICK and len(args) == 2:
            kicks.append((args[0].decode("ascii"), int(args[1])))
        elif kind == ALL:
            everyone = True
        elif kind == PROBE and len(args) == 1:
            probe = int(args[0])
        else:
            raise ValueError(f"unknown bus line {line[:40]!r}")
    return wakes, kicks, everyone, probe


class _Mail:
    """What waits for one node: an ordered set of wakes, kicks by device, or "wake all"."""

    __slots__ = ("wakes", "kicks", "everyone", "sending", "retry")

    def __init__(self):
        self.wakes: dict = {}
        self.kicks: dict = {}
        self.everyone = False
        self.sending = False  # one PUBLISH in flight per node: a device is in at most one
        self.retry = None  # the delayed call after a failed PUBLISH

    def empty(self) -> bool:
        return not (self.wakes or self.kicks or self.everyone)


class Outbox:
    """
    Wakes and kicks for other nodes, coalesced: whatever is waiting for a node goes in one
    PUBLISH (up to ``max_batch`` entries), flushed on the next reactor turn; while one is in
    flight to a node, new ones wait and merge (a device is in at most one message in flight).
    At most ``max_pending`` entries wait in all: beyond, a node's wakes collapse into one
    "wake all" (lossless: its sessions re-read their queues) and a kick is dropped (the old
    session then ends by itself: its device has left it). A failed PUBLISH is retried after
    ``retry`` seconds (a duplicate wake costs one read).
    """

    log = Logger()

    def __init__(self, bus, clock, max_batch=1000, max_pending=20000, retry=1.0):
        self.bus = bus
        self.clock = clock
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.retry = retry
        self._mail: dict = {}  # node -> _Mail
        self._pending = 0  # wakes + kicks waiting, all nodes
        self._flush = None
        self.published = 0  # messages
        self.collapsed = 0  # times a node's wakes became "wake all"
        self.kicks_dropped = 0
        self.failed = 0

    @property
    def pending(self) -> int:
        return self._pending

    def wake(self, node: str, device_id: str) -> None:
        mail = self._mail_of(node)
        if mail.everyone or device_id in mail.wakes:
            return
        if self._pending >= self.max_pending:
            self._collapse(mail)
        else:
            mail.wakes[device_id] = None
            self._pending += 1
        self._schedule(mail)

    def kick(self, node: str, device_id: str, epoch: int) -> None:
        mail = self._mail_of(node)
        if device_id not in mail.kicks:
            if self._pending >= self.max_pending:
                self.kicks_dropped += 1
                self.log.warn("bus outbox full ({n} waiting): kick of {device} on {node} dropped",
                              n=self._pending, device=device_id, node=node)
                return
            self._pending += 1
        mail.kicks[device_id] = epoch
        self._schedule(mail)

    def _mail_of(self, node):
        mail = self._mail.get(node)
        if mail is None:
            mail = self._mail[node] = _Mail()
        return mail

    def _collapse(self, mail):
        self.collapsed += 1
        self._pending -= len(mail.wakes)
        mail.wakes = {}
        mail.everyone = True

    def _schedule(self, mail):
        if self._flush is None and not mail.sending and mail.retry is None:
            self._flush = self.clock.callLater(0, self.flush)

    def flush(self) -> None:
        """Send one message to each node that has mail and none in flight."""
        self._flush = None
        for node, mail in list(self._mail.items()):
            if not mail.sending and mail.retry is None and not mail.empty():
                self._send(node, mail)

    def _send(self, node, mail):
        everyone, mail.everyone = mail.everyone, False
        wakes, kicks = [], []
        room = self.max_batch
        if not everyone:
            while mail.wakes and room:
                device_id = next(iter(mail.wakes))
                del mail.wakes[device_id]
                wakes.append(device_id)
                room -= 1
        while mail.kicks and room:
            device_id = next(iter(mail.kicks))
            kicks.append((device_id, mail.kicks.pop(device_id)))
            room -= 1
        self._pending -= len(wakes) + len(kicks)
        mail.sending = True
        d = self.bus.publish(node, encode(wakes, kicks, everyone))
        d.addCallbacks(self._sent, self._failed, (node, mail), {}, (node, mail, wakes, kicks, everyone))

    def _sent(self, _, node, mail):
        self.published += 1
        mail.sending = False
        self._next(node, mail)

    def _failed(self, failure, node, mail, wakes, kicks, everyone):
        self.failed += 1
        mail.sending = False
        self.log.warn("waking devices on node {node} failed ({n} retried in {retry}s): {why}",
                      node=node, n=len(wakes) + len(kicks) + everyone, retry=self.retry,
                      why=failure.getErrorMessage())
        # Put it back, behind nothing newer: a kick of the same device queued since wins.
        if everyone:
            mail.everyone = True
        for device_id in wakes:
            self.wake(node, device_id)
        for device_id, epoch in kicks:
            if device_id not in mail.kicks:
                self.kick(node, device_id, epoch)
        mail.retry = self.clock.callLater(self.retry, self._retried, node, mail)

    def _retried(self, node, mail):
        mail.retry = None
        self._next(node, mail)

    def _next(self, node, mail):
        if mail.empty():
            if not mail.sending and mail.retry is None:
                del self._mail[node]
        elif self._flush is None:
            self._flush = self.clock.callLater(0, self.flush)

    def close(self):
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        for mail in self._mail.values():
            if mail.retry is not None:
                mail.retry.cancel()
                mail.retry = None


class Node(service.Service):
    """
    One gateway process in the cluster: its heartbeat, its subscription, its outbox. The
    router calls ``wake`` and ``kick`` (other nodes' devices); messages on the node's own
    channel call the router's ``wake_local`` and ``kicked``.
    """

    log = Logger()

    #: Sessions re-read per step when all are woken, and the pause between steps: 20,000
    #: sessions take 2 s rather than one burst of 20,000 reads at the store.
    sweep_batch = 1000
    sweep_pause = 0.1

    def __init__(self, node_id, router, bus, clock, heartbeat=3.0, ttl=9.0, outbox=None):
        if not NODE_ID.match(node_id):
            raise ValueError(f"--node-id {node_id!r}: use 1-100 letters, digits and . _ : -")
        if not 0 < heartbeat < ttl:
            raise ValueError(f"--node-heartbeat ({heartbeat}) must be positive and less than --node-ttl ({ttl})")
        self.id = node_id
        self.router = router
        self.bus = bus
        #: Other processes' nodes share the store: a device with no session here may be elsewhere.
        self.shared = bus.shared
        self.clock = clock
        self.heartbeat = heartbeat
        self.ttl = ttl
        self.outbox = outbox if outbox is not None else Outbox(bus, clock)
        self.subscribed = False
        self._beating = None
        self._beaten = False  # a first heartbeat went through
        self._probe = 0  # the last probe published (and answered)
        self._probe_seen = 0
        self._sweep: list = []
        self._sweep_call = None
        self.sweeps = 0
        self.resubscribes = 0
        router.node = node_id
        router.cluster = self

    # --- the service ----------------------------------------------------------------------

    def startService(self):
        super().startService()
        self.bus.listen(self.id, self.received, self.connected)
        self._beating = task.LoopingCall(self.beat)
        self._beating.clock = self.clock
        self._beating.start(self.heartbeat, now=True).addErrback(
            lambda f: self.log.failure("the node heartbeat stopped", f))
        self.log.info("node {node}: heartbeat every {every}s, alive for {ttl}s", node=self.id,
                      every=self.heartbeat, ttl=self.ttl)

    def stopService(self):
        super().stopService()
        if self._beating is not None and self._beating.running:
            self._beating.stop()
        if self._sweep_call is not None:
            self._sweep_call.cancel()
            self._sweep_call = None
        self.outbox.close()
        return self.bus.close()

    # --- what the router asks -------------------------------------------------------------

    def wake(self, node: str, device_id: str) -> None:
        """The device's session is on ``node``: tell it something is pending."""
        self.outbox.wake(node, device_id)

    def kick(self, node: str, device_id: str, epoch: int) -> None:
        """The device connected here; its session of ``epoch`` on ``node`` is stale."""
        self.log.info("device {device} moved here from node {node}: closing its session there",
                      device=device_id, node=node)
        self.outbox.kick(node, device_id, epoch)

    # --- the node's channel ----------------------------------------------------------------

    def received(self, data: bytes) -> None:
        try:
            wakes, kicks, everyone, probe = decode(data)
        except (ValueError, UnicodeDecodeError) as e:
            self.log.warn("node {node}: a malformed bus message ignored: {why}", node=self.id, why=str(e))
            return
        if probe is not None:
            self._probe_seen = max(self._probe_seen, probe)
        for device_id, epoch in kicks:
            self.router.kicked(device_id, epoch)
        if everyone:
            self.wake_all("another node had more wakes for this one than it buffers")
        elif wakes:
            self.router.wake_local(wakes)

    def connected(self) -> None:
        """(Re)subscribed: a wake may have been lost meanwhile; every session re-reads."""
        self.subscribed = True
        self._probe_seen = self._probe
        self.wake_all("subscribed to the node's channel")

    def wake_all(self, why: str) -> None:
        """Every local session re-reads its queue, paced (a fresh snapshot if one is under way)."""
        self._sweep = list(self.router.sessions)
        self.sweeps += 1
        if self._sweep:
            self.log.info("node {node}: waking its {n} sessions ({why})", node=self.id, n=len(self._sweep), why=why)
        if self._sweep_call is None:
            self._sweep_step()

    def _sweep_step(self):
        self._sweep_call = None
        batch, self._sweep = self._sweep[: self.sweep_batch], self._sweep[self.sweep_batch:]
        self.router.wake_local(batch)
        if self._sweep:
            self._sweep_call = self.clock.callLater(self.sweep_pause, self._sweep_step)

    # --- the heartbeat ------------------------------------------------------------------------

    def beat(self):
        """One heartbeat: the key's TTL renewed, and a probe through the node's own channel."""
        if self.subscribed and self._probe > self._probe_seen:
            # The probe of the last beat was published (Redis answered) and never came back.
            self._resubscribe(f"probe {self._probe} did not come back within {self.heartbeat:g}s")
        d = self.bus.beat(self.id, self.ttl)
        d.addCallbacks(self._beat, self._beat_failed)
        return None  # LoopingCall must not wait on Redis: the timer runs on

    def _beat(self, was_alive):
        if not was_alive and self._beaten:
            # Other nodes took this node's devices for absent meanwhile, and sent no wakes.
            self.log.warn("node {node}: the heartbeat had expired; waking every session", node=self.id)
            self.wake_all("the heartbeat had expired")
        self._beaten = True
        probe = self._probe + 1
        self.bus.publish(self.id, encode(probe=probe)).addCallbacks(self._probed, self._probe_failed, (probe,))

    def _probed(self, listeners, probe):
        if listeners == 0 and self.subscribed:
            self._resubscribe("the node's channel has no subscriber")
        elif self.subscribed:
            self._probe = max(self._probe, probe)

    def _probe_failed(self, failure):
        self.log.debug("node {node}: probe not published: {why}", node=self.id, why=failure.getErrorMessage())

    def _beat_failed(self, failure):
        self.log.warn("node {node}: heartbeat failed: {why}", node=self.id, why=failure.getErrorMessage())

    def _resubscribe(self, why):
        self.resubscribes += 1
        self.log.warn("node {node}: {why}; subscribing again", node=self.id, why=why)
        self.subscribed = False
        self._probe_seen = self._probe
        self.bus.reconnect()
