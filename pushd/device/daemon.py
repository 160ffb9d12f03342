"""
The device daemon's logic: one courier connection serving every registered app.
It hears the courier (ICourierListener) and the apps (AMP on a UNIX socket).
"""

from __future__ import annotations

import json
import os
import socket
import struct

from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols import amp
from zope.interface import implementer

from pushd import wire
from pushd.throttle import LogThrottle
from pushd.device import amp as cmds
from pushd.device.courier import ICourierListener
from pushd.device.held import HeldQueue

MAX_TOPIC = 255
HELD_PER_TOPIC = 100
#: Past this a topic's pushes are declined (see DeviceDaemon); above any gateway's window.
HARD_LIMIT = 4 * HELD_PER_TOPIC


@implementer(ICourierListener)
class DeviceDaemon:
    """
    Each topic has one ordered queue between the courier and its app. A push is acked to
    the gateway once it is in that queue; the queue drains to the app in order, one
    Deliver at a time. A queue that reaches HELD_PER_TOPIC (its app away or slow) takes its
    topic out of the Filter; the gateway then sends no more of it, so the queue holds at most
    that plus what was in flight (the gateway's window). It is enabled again at half.
    Declining (a non-zero ack: the gateway keeps the push) is the guard against a gateway
    that ignores the Filter; it is never needed with pushd's, and would break order.
    """

    log = Logger()

    def __init__(self, identity, clock, environment="production", default_uid=None):
        self.identity = identity
        # Topics registered before owners were kept: only the daemon's own user could reach
        # its 0600 socket then, so they are that user's.
        self.default_uid = os.geteuid() if default_uid is None else default_uid
        # Any local user can cause these: at most a line a second of each.
        self.refusals = LogThrottle(clock, _log_refused)
        self.takeovers = LogThrottle(clock, _log_takeover)
        self.environment = environment
        self.clock = clock
        self.factory = None  # the CourierClientFactory, set by the service
        self.proto = None
        self.apps: dict = {}  # topic -> AppProtocol
        self.held = HeldQueue(identity.state_dir / "held.sqlite3")
        self._full = {t for t in identity.apps if self.held.count(t) >= HELD_PER_TOPIC}
        self._draining: set = set()  # topics with a Deliver outstanding
        self._token_waiters: dict = {}  # topic -> [Deferred]
        self.started = clock.seconds()
        self.connected_at = None
        self.last_ka_request = None
        self.last_ka_response = None
        self.received = 0
        self.duplicates = 0
        self._filter_sent = None

    def close(self):
        """Log the refusals still counted, leave no timer, close the queue."""
        self.refusals.stop()
        self.takeovers.stop()
        self.held.close()

    def _topics(self):
        return {wire.topic_hash(t): t for t in self.identity.apps}

    # --- courier events --------------------------------------------------------------

    def connected(self, proto, base_token):
        self.proto = proto
        self._filter_sent = None
        self.connected_at = self.clock.seconds()
        if base_token != self.identity.base_token:
            self.identity.base_token = base_token
            self.identity.save()
        self.log.info("connected as device {device}", device=self.identity.device_id)
        self._sync_topics()

    def disconnected(self, reason):
        self.proto = None
        self.connected_at = None
        self.log.info("courier connection lost: {why}", why=reason.getErrorMessage())

    def _sync_topics(self):
        """Send the Filter if the enabled set changed, and ask for missing tokens."""
        if self.proto is None:
            return
        enabled = sorted(h for h, t in self._topics().items() if t not in self._full)
        if enabled != self._filter_sent:
            self._filter_sent = enabled
            self.proto.send(wire.Filter(token=self.identity.base_token, enabled=enabled))
        for topic in self.identity.apps:
            if topic not in self.identity.tokens:
                self.proto.send(wire.ScopedToken(token=self.identity.base_token, topic=wire.topic_hash(topic)))
        if self.identity.unregistered and getattr(self.factory, "gateway_is_pushd", False):
            for topic, token in self.identity.unregistered.items():
                self.proto.send(wire.Unregister(token=token, topic=wire.topic_hash(topic)))
            self.identity.unregistered.clear()
            self.identity.save()

    def tokenReceived(self, topic_hash, token):
        topic = self._topics().get(topic_hash)
        if topic is None:
            return
        self.identity.tokens[topic] = token
        self.identity.save()
        for d in self._token_waiters.pop(topic, []):
            d.callback(token)

    def keepaliveSent(self):
        self.last_ka_request = self.clock.seconds()

    def keepaliveAnswered(self):
        self.last_ka_response = self.clock.seconds()

    def notificationReceived(self, msg):
        self.received += 1
        if self.held.seen(msg.message_id):
            self.duplicates += 1
            return wire.STATUS_OK
        topic = self._topics().get(msg.topic)
        if topic is None:
            self.log.info("notification for a topic no app registered; acked and dropped")
            return wire.STATUS_OK
        if self.held.count(topic) >= HARD_LIMIT:
            # Declined: the gateway keeps it and offers it again after our next Filter.
            return wire.STATUS_ERROR
        self.held.append(topic, msg.payload, msg.message_id)
        if self.held.count(topic) >= HELD_PER_TOPIC:
            self._full.add(topic)
            self._sync_topics()
        self._drain(topic)
        return wire.STATUS_OK

    def _drain(self, topic):
        """Hand the oldest queued push to the app, then the next, in order."""
        app = self.apps.get(topic)
        if app is None or topic in self._draining:
            return
        head = self.held.head(topic)
        if head is None:
            return
        self._draining.add(topic)
        payload, mid = head
        d = app.callRemote(cmds.Deliver, topic=topic, payload=payload, message_id=mid)

        def delivered(_):
            self._draining.discard(topic)
            self.held.remove(topic, mid)
            if topic in self._full and self.held.count(topic) <= HELD_PER_TOPIC // 2:
                self._full.discard(topic)
                self._sync_topics()
            self._drain(topic)

        def failed(f):
            self._draining.discard(topic)
            self.log.info("app for {topic} did not take a push: {why}", topic=topic, why=f.getErrorMessage())

        d.addCallbacks(delivered, failed)

    # --- app events ---------------------------------------------------------------------

    def owner(self, topic: str):
        """The uid a registered topic belongs to (None if nobody registered it)."""
        info = self.identity.apps.get(topic)
        return None if info is None else info.get("uid", self.default_uid)

    def _check_owner(self, topic: str, app, action: str):
        """Only the user who registered a topic may register (take over) or unregister it."""
        uid = getattr(app, "uid", None)
        owner = self.owner(topic)
        if uid is not None and owner in (None, uid):
            return uid
        self.refusals.note("refused", action=action, topic=topic, process=getattr(app, "process", None),
                           uid=uid, owner=owner)
        if uid is None:
            raise cmds.TopicOwned("the daemon cannot tell which user is asking (no SO_PEERCRED)")
        raise cmds.TopicOwned(f"{topic} is registered by another user (uid {owner}) on this device")

    def register(self, topic: str, app):
        if not topic or len(topic.encode("utf-8")) > MAX_TOPIC:
            raise ValueError("topic must be 1 to 255 bytes")
        uid = self._check_owner(topic, app, "register")
        info = self.identity.apps.get(topic)
        if info is None:
            self.identity.apps[topic] = {"created": self.clock.seconds(), "uid": uid}
            self.identity.save()
            self._sync_topics()
        elif info.get("uid") != uid:
            info["uid"] = uid  # kept from before owners were recorded: now explicit
            self.identity.save()
        old = self.apps.get(topic)
        if old is not None and old is not app:
            self.takeovers.note("takeover", topic=topic, uid=uid, process=getattr(app, "process", None),
                                old=getattr(old, "process", None))
            old.transport.loseConnection()
        self.apps[topic] = app
        app.topics.add(topic)
        self.clock.callLater(0, self._drain, topic)
        token = self.identity.tokens.get(topic)
        if token is not None:
            return defer.succeed(token)
        d = defer.Deferred()
        self._token_waiters.setdefault(topic, []).append(d)
        return d

    def unregister(self, topic: str, app=None) -> bool:
        """The app is uninstalled: forget the topic; the gateway answers its token 410.
        ``app`` (the asking connection) must be of the topic's owner."""
        if topic not in self.identity.apps:
            return False
        if app is not None:
            self._check_owner(topic, app, "unregister")
        del self.identity.apps[topic]
        token = self.identity.tokens.pop(topic, None)
        if token is not None:
            self.identity.unregistered[topic] = token
        self.identity.save()
        while (head := self.held.head(topic)) is not None:
            self.held.remove(topic, head[1])
        self._full.discard(topic)
        app = self.apps.pop(topic, None)
        if app is not None:
            app.topics.discard(topic)
        self._sync_topics()
        return True

    def app_gone(self, app):
        for topic in app.topics:
            if self.apps.get(topic) is app:
                del self.apps[topic]

    # --- the report -------------------------------------------------------------------------

    def status(self) -> dict:
        """The report ``pushctl status`` prints, in the spirit of ``apsctl status``."""
        f = self.factory
        connected = self.proto is not None
        if connected:
            courier = "Connected"
        elif f is not None and f.continueTrying:
            courier = "Will reattempt to reconnect"
        else:
            courier = "Disabled"
        transport = f.current if f is not None else None
        return {
            "daemon status": "Running",
            "startup time": self.started,
            "status counters last reset": self.started,
            "certificate status": "Provisioned, using new certificate"
            if self.identity.provisioned_now
            else "Provisioned, using existing certificate",
            "device id": self.identity.device_id,
            "base token": self.identity.base_token.hex() if self.identity.base_token else None,
            "connection environment": self.environment,
            "courier": {
                "courier status": courier,
                "enabled": bool(f is not None and f.continueTrying),
                "stream connected": connected,
                "connected to service": connected,
                "connected to server hostname": getattr(transport, "host", None),
                "connected to server port": getattr(transport, "port", None),
                "connection time": self.connected_at,
                "successful connections": f.successes if f else 0,
                "consecutive connection failures": f.failures if f else 0,
                "last connection attempt": f.last_attempt if f else None,
                "last keepalive request time": self.last_ka_request,
                "last keepalive response time": self.last_ka_response,
                "keepalive interval": round(f.keepalive_interval, 1) if f else None,
                "notifications received": self.received,
                "duplicates dropped": self.duplicates,
            },
            "apps": [
                {
                    "application port name": topic,
                    "process": getattr(self.apps.get(topic), "process", None),
                    "persistent connection status": "Waiting for push notifications"
                    if connected
                    else "Not connected to service",
                    "persistent connection created": info.get("created"),
                    "token": self.identity.tokens[topic].hex() if topic in self.identity.tokens else None,
                    "pushes held for the app": self.held.count(topic),
                }
                for topic, info in sorted(self.identity.apps.items())
            ],
        }


def _more(total: int, what: str) -> str:
    return f" ({total} {what} since the last line, the last shown)" if total > 1 else ""


def _log_refused(counts, total, sample):
    DeviceDaemon.log.warn("refused to {action} {topic} for {process} (uid {uid}): it belongs to uid {owner}{more}",
                          total=total, more=_more(total, "refusals"), **sample)


def _log_takeover(counts, total, sample):
    DeviceDaemon.log.info("{topic} taken over by {process} from {old} (both uid {uid}){more}",
                          total=total, more=_more(total, "takeovers"), **sample)


def peer_credentials(transport):
    """(pid, uid, gid) of the process at the other end of a UNIX socket (Linux SO_PEERCRED), or None."""
    try:
        sock = transport.getHandle()
        return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except (AttributeError, OSError, struct.error):
        return None


def process_name(pid: int):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f"{f.read().strip()}[{pid}]"
    except OSError:
        return None


def peer_process(transport):
    """``name[pid]`` of the process at the other end of a UNIX socket (Linux SO_PEERCRED)."""
    cred = peer_credentials(transport)
    return process_name(cred[0]) if cred else None


class AppProtocol(amp.AMP):
    """One app (or pushctl) on the local socket."""

    def __init__(self, daemon):
        super().__init__()
        self.daemon = daemon
        self.topics = set()
        self.process = None
        self.uid = None  # the app's user: who may take its topics over

    def connectionMade(self):
        super().connectionMade()
        cred = peer_credentials(self.transport)
        if cred is not None:
            self.uid = cred[1]
            self.process = process_name(cred[0])

    @cmds.Register.responder
    def register(self, topic):
        d = self.daemon.register(topic, self)
        return d.addCallback(lambda token: {"token": token.hex()})

    @cmds.Unregister.responder
    def unregister(self, topic):
        return {"known": self.daemon.unregister(topic, self)}

    @cmds.Reconnect.responder
    def reconnect(self):
        self.daemon.factory.reconnect_now("pushctl reconnect")
        return {}

    @cmds.Status.responder
    def status(self):
        return {"report": json.dumps(self.daemon.status())}

    def connectionLost(self, reason):
        self.daemon.app_gone(self)
        super().connectionLost(reason)
