"""
One timer for the deadlines of every courier connection: the connect deadline (absolute,
from accept: handshake and Connect) and, once connected, the silence deadline.

A per-connection ``callLater`` (what ``TimeoutMixin`` does) costs a DelayedCall, its heap
entry and a reset on every read. Here a connection only stores its deadline (a float an
authenticated connection moves forward on each read, no timer touched); the wheel files it in a one-second bucket
and looks at it again when that bucket is due: past its deadline, it is timed out;
otherwise it is filed again under its new deadline. So a connection is looked at about
once per timeout period, and one DelayedCall (for the earliest bucket) exists while any
connection is watched, none when none is.

A connection times out at or after its deadline, at most ``resolution`` seconds after.
"""

from __future__ import annotations

import math
from collections import deque


class DeadlineWheel:
    """
    Members are objects with a ``_deadline`` attribute (seconds, on ``clock``), a
    ``_wheelslot`` attribute the wheel owns, and a ``timeoutConnection()`` method called
    (once) when the deadline has passed.
    """

    #: Timeouts handled per reactor turn; the rest follow in the next turns. 3,600 pre-Connect
    #: connections from a flood expiring in one bucket were all closed in one call, which
    #: held honest pushes up to 207 ms (bench/abuse.py, "connections" from many addresses);
    #: 256 a turn still made turns of 21-31 ms (the gateway's turns timed), hence 64.
    batch = 64

    def __init__(self, clock, resolution: float = 1.0):
        self.clock = clock
        self.resolution = resolution
        self._buckets: dict = {}
        self._call = None
        #: Members past their deadline, not yet timed out (at most ``batch`` a turn).
        self._expiring: deque = deque()
        self._drain_call = None

    def __len__(self):
        return sum(len(b) for b in self._buckets.values()) + len(self._expiring)

    def members(self) -> list:
        """Every member watched now (the courier's drain closes them all)."""
        out = [m for b in self._buckets.values() for m in b]
        out.extend(m for m in self._expiring if m._wheelslot is None)
        return out

    def watch(self, member) -> None:
        """File ``member`` under its current ``_deadline`` (refiling it if already watched)."""
        self._unfile(member)
        self._file(member, member._deadline)

    def unwatch(self, member) -> None:
        self._unfile(member)
        if not self._buckets and self._call is not None:
            self._call.cancel()
            self._call = None

    def stop(self) -> None:
        """Forget every member and cancel the timer."""
        for bucket in self._buckets.values():
            for member in bucket:
                member._wheelslot = None
        self._buckets.clear()
        self._expiring.clear()
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self._drain_call is not None:
            self._drain_call.cancel()
            self._drain_call = None

    # --- internals -------------------------------------------------------------

    def _file(self, member, deadline, schedule=True) -> None:
        slot = math.ceil(deadline / self.resolution)
        if slot * self.resolution < deadline:  # float rounding: never fire before the deadline
            slot += 1
        bucket = self._buckets.get(slot)
        if bucket is None:
            bucket = self._buckets[slot] = set()
            if schedule:
                self._schedule(slot * self.resolution)
        bucket.add(member)
        member._wheelslot = slot

    def _schedule(self, when) -> None:
        delay = max(0.0, when - self.clock.seconds())
        if self._call is None:
            self._call = self.clock.callLater(delay, self._due)
        elif when < self._call.getTime():
            self._call.reset(delay)

    def _unfile(self, member) -> None:
        slot = member._wheelslot
        if slot is None:
            return
        member._wheelslot = None
        bucket = self._buckets.get(slot)
        if bucket is not None:
            bucket.discard(member)
            if not bucket:
                del self._buckets[slot]

    def _due(self) -> None:
        self._call = None
        now = self.clock.seconds()
        due = sorted(s for s in self._buckets if s * self.resolution <= now)
        for slot in due:
            for member in self._buckets.pop(slot):
                member._wheelslot = None
                deadline = member._deadline
                if deadline is None:
                    continue
                if deadline <= now:
                    self._expiring.append(member)
                else:
                    self._file(member, deadline, schedule=False)
        if self._buckets:
            self._schedule(min(self._buckets) * self.resolution)
        self._drain()

    def _drain(self) -> None:
        """Time out at most ``batch`` members; the rest in the next reactor turn."""
        self._drain_call = None
        now = self.clock.seconds()
        queue, done = self._expiring, 0
        while queue and done < self.batch:
            member = queue.popleft()
            if member._wheelslot is not None:  # watched again while it waited
                continue
            deadline = member._deadline
            if deadline is None:  # unwatched (closed) while it waited
                continue
            if deadline > now:  # moved on while it waited
                self._file(member, deadline)
                continue
            member._deadline = None
            done += 1
            member.timeoutConnection()
        if queue and self._drain_call is None:
            self._drain_call = self.clock.callLater(0, self._drain)
