"""
APNs' request rules for ``POST /3/device/<hex token>`` (and pushd's enrolment endpoint),
whatever HTTP version carries them: no HTTP framing here, only the decisions.

A request is judged in two steps, so that a transport can refuse it before keeping any of
its body: ``head()`` on the method, path and headers (authorization included) gives either
a final ``Answer`` or a ``Ticket``; ``finish(ticket, body, overflow)`` gives the Answer, or a
Deferred of one once the store has the notification.
"""

from __future__ import annotations

import json
import os
import uuid
from functools import partial
from typing import NamedTuple

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from pushd import wire
from pushd.gateway import enrol
from pushd.gateway.enrol import MAX_BODY as ENROL_LIMIT
from pushd.gateway import errors

PUSH_TYPES = {
    b"alert", b"background", b"voip", b"complication", b"fileprovider",
    b"mdm", b"location", b"liveactivity", b"pushtotalk", b"widgets", b"controls",
}
#: The topic suffix a push type requires (Apple, "Sending notification requests to APNs").
TOPIC_SUFFIX = {
    b"voip": ".voip",
    b"complication": ".complication",
    b"fileprovider": ".pushkit.fileprovider",
    b"location": ".location-query",
    b"liveactivity": ".push-type.liveactivity",
    b"pushtotalk": ".voip-ptt",
    b"widgets": ".push-type.widgets",
}
_SUFFIXES = tuple(TOPIC_SUFFIX.values())  # no suffix ends another: one endswith() decides
#: Headers APNs refuses to see twice (400 DuplicateHeaders).
SINGLE_HEADERS = (b"apns-topic", b"apns-priority", b"apns-push-type", b"apns-id", b"apns-expiration",
                  b"apns-collapse-id", b"authorization")
#: An enrolment body is kept up to enrolment's own largest request (ENROL_LIMIT, enrol.MAX_BODY).
ENROL_PATH = b"/pushd/v1/enrol"
DEVICE_PREFIX = b"/3/device/"
_JSON = (b"content-type", b"application/json")


class _Ids:
    """apns-ids (random UUIDs) from one urandom read per 256: uuid4() was a tenth of a push's cost."""

    def __init__(self):
        self.buf = b""
        self.pos = 0

    def new(self) -> tuple:
        if self.pos >= len(self.buf):
            self.buf, self.pos = os.urandom(16 * 256), 0
        b = bytearray(self.buf[self.pos:self.pos + 16])
        self.pos += 16
        b[6] = b[6] & 0x0F | 0x40  # version 4
        b[8] = b[8] & 0x3F | 0x80  # RFC 4122 variant
        h = b.hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}", bytes(b)


new_apns_id = _Ids().new


class Rejected(Exception):
    """A request refused by the provider API's own rules, with its HTTP status and APNs reason."""

    def __init__(self, status: int, reason: str, **extra):
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.extra = extra


#: The domain's refusals (pushd/gateway/errors.py) as HTTP statuses, as APNs answers them.
REFUSAL_STATUS = {
    errors.ShuttingDown: 503,
    errors.StoreDown: 503,
    errors.BadToken: 400,
    errors.Unregistered: 410,
    errors.ProviderTokenRefused: 403,
    errors.TooManyProviderTokenUpdates: 429,
}


def refused(e: errors.Refusal) -> Rejected:
    """A domain refusal as the provider API answers it: status, reason, and 410's timestamp (ms)."""
    extra = dict(e.extra)
    if isinstance(e, errors.Unregistered):
        extra["timestamp"] = int(e.since * 1000)
    status = next((REFUSAL_STATUS[c] for c in type(e).__mro__ if c in REFUSAL_STATUS), 500)
    return Rejected(status, e.reason, **extra)


class Answer(NamedTuple):
    """A response, whatever HTTP version carries it."""

    status: int
    headers: list
    body: bytes


def _answer(status: int, apns_id: str, reason: str | None = None, **extra) -> Answer:
    headers = [(b"apns-id", apns_id.encode())]
    if reason is None:
        return Answer(status, headers, b"")
    headers.append(_JSON)
    return Answer(status, headers, json.dumps({"reason": reason, **extra}).encode())


def duplicated(pairs) -> bool:
    """True if one of SINGLE_HEADERS occurs twice in ``pairs`` (name, value); the slow path only."""
    seen = set()
    for name, _ in pairs:
        if name in SINGLE_HEADERS:
            if name in seen:
                return True
            seen.add(name)
    return False


class Ticket:
    """A request whose headers passed: what ``finish`` needs once the body is in."""

    __slots__ = ("kind", "apns_id", "id_bytes", "team", "token", "topic", "push_type",
                 "expiry", "priority", "collapse_id", "limit", "peer", "authenticated")

    def __init__(self, kind, limit, peer, authenticated):
        self.kind = kind
        self.limit = limit  # body bytes beyond which the answer is 413
        self.peer = peer
        self.authenticated = authenticated  # a valid provider token or operator key came with it


class Refused(NamedTuple):
    """``head``'s refusal: the answer, and whether the authorization was valid all the same."""

    answer: Answer
    authenticated: bool


class DeviceAPI:
    """``POST /3/device/<token>``: the APNs rules, in the order APNs applies them."""

    log = Logger()

    def __init__(self, router, auth, token_limit=None, team_limit=None, verify_limit=None):
        self.router = router
        self.auth = auth
        self.token_limit = token_limit
        self.team_limit = team_limit
        #: Buckets of provider-token verifications per source address (cache misses only):
        #: one costs 0.5-1.1 ms of CPU, and anyone can send a fresh garbage token per request.
        self.verify_limit = verify_limit

    def head(self, method: bytes, path: bytes, header, dup: bool, peer: str, source=None):
        """
        A Ticket, or Refused. ``header(name)`` gives a header's value (lower-case name) or None;
        ``source`` is the address key (pushd.admission.address_key) that verify_limit counts.
        """
        if dup:
            return Refused(_answer(400, new_apns_id()[0], "DuplicateHeaders"), False)
        raw_id = header(b"apns-id")
        if raw_id is None:
            apns_id, id_bytes = new_apns_id()
        else:
            try:
                given = uuid.UUID(raw_id.decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                return Refused(_answer(400, new_apns_id()[0], "BadMessageId"), False)
            apns_id, id_bytes = str(given), given.bytes
        if method != b"POST":
            return Refused(_answer(405, apns_id, "MethodNotAllowed"), False)
        authenticated = False
        try:
            try:
                if self.verify_limit is None or source is None:
                    team = self.auth.authenticate(header(b"authorization"))
                else:
                    team = self.auth.authenticate(header(b"authorization"), partial(self.verify_limit.allow, source))
            except errors.Refusal as e:
                raise refused(e) from None
            authenticated = True
            t = Ticket("device", wire.MAX_PAYLOAD, peer, True)
            t.apns_id, t.id_bytes, t.team = apns_id, id_bytes, team
            self._headers(t, path, header)
            if not self.auth.allowed(team, t.topic):
                raise Rejected(400, "TopicDisallowed")
        except Rejected as e:
            return Refused(_answer(e.status, apns_id, e.reason, **e.extra), authenticated)
        return t

    def _headers(self, t: Ticket, path: bytes, header) -> None:
        parts = path.split(b"/")
        if len(parts) != 4 or parts[1:3] != [b"3", b"device"]:
            raise Rejected(404, "BadPath")
        try:
            token = bytes.fromhex(parts[3].decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise Rejected(400, "BadDeviceToken")
        if not token:
            raise Rejected(400, "MissingDeviceToken")
        t.token = token
        topic = header(b"apns-topic")
        if not topic:
            raise Rejected(400, "MissingTopic")
        try:
            topic = topic.decode("ascii")
        except UnicodeDecodeError:
            raise Rejected(400, "BadTopic")
        t.topic = topic
        push_type = header(b"apns-push-type") or b"alert"
        if push_type not in PUSH_TYPES:
            raise Rejected(400, "InvalidPushType")
        self._push_type_and_topic(push_type, topic)
        t.push_type = push_type
        raw = header(b"apns-expiration")
        if raw is not None:
            try:
                expiry = int(raw)
            except ValueError:
                raise Rejected(400, "BadExpirationDate")
            if expiry < 0 or expiry >= 2**32 or (expiry and push_type == b"pushtotalk"):
                raise Rejected(400, "BadExpirationDate")
            t.expiry = expiry
        elif push_type == b"pushtotalk":
            t.expiry = 0  # Apple: Push to Talk notifications are sent with apns-expiration 0
        else:
            # APNs stores a notification without apns-expiration for a while; keep 30 days.
            t.expiry = int(self.router.now()) + 30 * 86400
        raw = header(b"apns-priority")
        if raw is None:
            # APNs' default is 10; a background notification may only be sent with 5.
            t.priority = 5 if push_type == b"background" else 10
        else:
            if raw not in (b"10", b"5", b"1"):
                raise Rejected(400, "BadPriority")
            if (push_type == b"background" and raw != b"5") or (push_type == b"pushtotalk" and raw != b"10"):
                raise Rejected(400, "BadPriority")
            t.priority = int(raw)
        raw = header(b"apns-collapse-id")
        if raw is not None:
            if len(raw) > 64:
                raise Rejected(400, "BadCollapseId")
            t.collapse_id = raw.decode("utf-8", "replace")
        else:
            t.collapse_id = None
        if push_type == b"voip":
            t.limit = wire.MAX_PAYLOAD_VOIP

    @staticmethod
    def _push_type_and_topic(push_type: bytes, topic: str) -> None:
        """A push type needs its topic suffix (else BadTopic); a suffix belongs to its push type."""
        suffix = TOPIC_SUFFIX.get(push_type)
        if suffix is not None:
            if not topic.endswith(suffix):
                raise Rejected(400, "BadTopic")
        elif topic.endswith(_SUFFIXES):
            raise Rejected(400, "InvalidPushType")

    def finish(self, t: Ticket, payload: bytes, overflow: bool):
        """The Answer for a request whose headers passed, now or as a Deferred."""
        try:
            if overflow or len(payload) > t.limit:
                raise Rejected(413, "PayloadTooLarge")
            if not payload.strip():
                raise Rejected(400, "PayloadEmpty")
            try:
                if not isinstance(json.loads(payload), dict):
                    raise ValueError
            except ValueError:
                raise Rejected(400, "BadPayload")
            if self.team_limit is not None and not self.team_limit.allow(t.team):
                raise Rejected(429, "TooManyRequests")
            if self.token_limit is not None and not self.token_limit.allow(t.token):
                raise Rejected(429, "TooManyRequests")
        except Rejected as e:
            return _answer(e.status, t.apns_id, e.reason, **e.extra)
        d = self.router.accept(t.token, t.topic, payload, t.id_bytes, t.expiry, t.priority, t.collapse_id)
        apns_id = t.apns_id
        return d.addCallbacks(lambda _: _answer(200, apns_id), self._failed, errbackArgs=(apns_id,))

    def _failed(self, failure, apns_id):
        if failure.check(errors.Refusal):
            e = refused(failure.value)
            return _answer(e.status, apns_id, e.reason, **e.extra)
        self.log.failure("accepting {apns_id} failed", failure, apns_id=apns_id)
        return _answer(500, apns_id, "InternalServerError")

    def answer(self, method: bytes, path: bytes, header, payload: bytes, overflow: bool, dup=False, peer=""):
        """Both steps at once, for a request whose body is already in."""
        t = self.head(method, path, header, dup, peer)
        if type(t) is Refused:
            return t.answer
        return self.finish(t, payload, overflow)


#: Enrolment's refusals as HTTP statuses (the reason in the body is the error's name).
ENROL_STATUS = {
    enrol.BadRequest: 400, enrol.BadCSR: 400, enrol.BadKey: 400,
    enrol.RequestTooLarge: 413, enrol.TooManyRequests: 429,
    enrol.BadEnrolmentSecret: 403, enrol.StaleRequest: 403, enrol.BadCertificate: 403,
    enrol.CertificateExpired: 403, enrol.BadSignature: 403, enrol.DeviceRevoked: 403,
    enrol.UnknownCertificate: 403, enrol.CertificateReplaced: 403,
    enrol.ReplayedRequest: 409, enrol.KeyAlreadyEnrolled: 409,
    enrol.TooManyEnrolments: 503, enrol.RegistryUnavailable: 503, enrol.NonceCacheUnavailable: 503,
}


def _enrol_refused(e) -> Answer:
    return Answer(ENROL_STATUS.get(type(e), 400), [_JSON], json.dumps({"reason": e.text, **e.extra}).encode())


def _enrol_ok(out) -> Answer:
    return Answer(200, [_JSON], json.dumps(out).encode())


def _enrol_failed(failure) -> Answer:
    if failure.check(enrol.Refused):
        return _enrol_refused(failure.value)
    DeviceAPI.log.failure("enrolment failed", failure)
    return Answer(500, [_JSON], b'{"reason": "InternalServerError"}')


def enrol_answer(enrolment, body: bytes, overflow: bool, peer):
    """An enrolment or renewal request's response, or a Deferred of it (a shared nonce cache)."""
    try:
        out = enrolment.answer(body, overflow, peer)
    except enrol.Refused as e:
        return _enrol_refused(e)
    if isinstance(out, Deferred):
        return out.addCallbacks(_enrol_ok, _enrol_failed)
    return _enrol_ok(out)


class ProviderAPI:
    """Routes a request to the device API, enrolment, or APNs' 404 BadPath."""

    def __init__(self, device: DeviceAPI, enrol=None):
        self.device = device
        self.enrol = enrol

    def head(self, method: bytes, path: bytes, header, dup: bool, peer: str, source=None):
        if path.startswith(DEVICE_PREFIX):
            return self.device.head(method, path, header, dup, peer, source)
        if self.enrol is not None and path == ENROL_PATH:
            if method != b"POST":
                return Refused(Answer(405, [_JSON], b'{"reason": "MethodNotAllowed"}'), False)
            return Ticket("enrol", ENROL_LIMIT, peer, False)  # its MAC is checked on the body
        return Refused(_answer(404, new_apns_id()[0], "BadPath"), False)

    def finish(self, t: Ticket, body: bytes, overflow: bool):
        if t.kind == "device":
            return self.device.finish(t, body, overflow)
        return enrol_answer(self.enrol, body, overflow, t.peer)

    @staticmethod
    def body_late(t: Ticket) -> Answer:
        """A body not complete in time: APNs' 400 IdleTimeout ("Idle timeout" in Apple's reason table)."""
        if t.kind == "device":
            return _answer(400, t.apns_id, "IdleTimeout")
        return Answer(400, [_JSON], b'{"reason": "IdleTimeout"}')

    def answer(self, method, path, header, body, overflow, peer="", dup=False):
        """Both steps at once, for a request whose body is already in (HTTP/1.1)."""
        t = self.head(method, path, header, dup, peer)
        if type(t) is Refused:
            return t.answer
        return self.finish(t, body, overflow)
