"""
The courier frame codec: APNs courier framing, no I/O.

A frame is ``u8 command | u32 length | fields``; a field is ``u8 id | u16 length | value``.
Field ids may repeat (lists); unknown fields are kept but ignored by the typed messages.
The normative description is ``docs/protocol.md``.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field, fields as dc_fields
from typing import ClassVar, Iterator, Optional

HEADER = struct.Struct(">BI")
FIELD_HEADER = struct.Struct(">BH")

#: The largest frame either side accepts by default. A Connect with a 4 KiB
#: certificate chain fits; a Notification carries at most MAX_PAYLOAD.
MAX_FRAME = 32 * 1024
#: Payload bytes in one Notification, as APNs limits them.
MAX_PAYLOAD = 4096
MAX_PAYLOAD_VOIP = 5120
MAX_FIELD = 0xFFFF

# Commands
CONNECT = 7
CONNECT_ACK = 8
FILTER = 9
NOTIFICATION = 10
NOTIFICATION_ACK = 11
KEEPALIVE = 12
KEEPALIVE_ACK = 13
NO_STORAGE = 14
SCOPED_TOKEN = 17
SCOPED_TOKEN_ACK = 18
SET_STATE = 20
#: pushd's own commands start at 32; sent only to a gateway that is pushd (ConnectAck
#: field 32 present), so a plain APNs server never sees them.
UNREGISTER = 32
#: pushd, gateway to device: this gateway is going away (draining); reconnect now, at a
#: random moment within the window it announces, not after a backoff. Sent only to pushd
#: devices (Connect field 32); an older device ignores it (unknown command) and just sees
#: the close that follows.
GOAWAY = 33

#: GoAway field 1 absent: the window a device spreads its reconnect over (ms).
GOAWAY_DEFAULT_WINDOW_MS = 1000

# Status codes (u8) in ConnectAck, NotificationAck and ScopedTokenAck.
STATUS_OK = 0
STATUS_ERROR = 2
STATUS_BAD_TOKEN = 3
STATUS_NOT_ALLOWED = 4

# Signature field prefixes (Connect field 14).
SIG_RSA_PKCS1_SHA1 = b"\x01\x01"
SIG_ECDSA_SHA256 = b"\x01\x02"

#: Connect field 33 (pushd): what the signature covers besides the nonce. Absent: the
#: nonce alone (APNs clients). 1: nonce || the connection's TLS exporter (docs/protocol.md).
BINDING_TLS_EXPORTER = 1


class WireError(Exception):
    """Bytes that are not a valid courier frame; the connection must close."""


def topic_hash(topic: str | bytes) -> bytes:
    if isinstance(topic, str):
        topic = topic.encode("utf-8")
    return hashlib.sha1(topic).digest()


@dataclass(frozen=True)
class Frame:
    command: int
    fields: tuple = ()

    def get(self, fid: int) -> Optional[bytes]:
        for i, v in self.fields:
            if i == fid:
                return v
        return None

    def get_all(self, fid: int) -> list:
        return [v for i, v in self.fields if i == fid]


def encode_frame(frame: Frame) -> bytes:
    return _encode(frame.command, frame.fields)


def _encode(command: int, pairs) -> bytes:
    parts = [b""]
    pack = FIELD_HEADER.pack
    for fid, value in pairs:
        if not 0 <= fid <= 255:
            raise WireError(f"field id {fid} out of range")
        n = len(value)
        if n > MAX_FIELD:
            raise WireError(f"field {fid} is {n} bytes, over {MAX_FIELD}")
        parts.append(pack(fid, n))
        parts.append(value)
    if not 0 <= command <= 255:
        raise WireError(f"command {command} out of range")
    size = sum(map(len, parts))
    parts[0] = HEADER.pack(command, size)
    return b"".join(parts)


_U32 = struct.Struct(">BHI")
_U64 = struct.Struct(">BHQ")
_U8 = struct.Struct(">BHB")


def encode_notification(
    token: bytes,
    topic: bytes,
    payload: bytes,
    message_id: bytes,
    expiry: Optional[int] = None,
    timestamp: Optional[int] = None,
    priority: Optional[int] = None,
) -> bytes:
    """The bytes of ``Notification(...).encode()``, built without the message object
    (the gateway's fan-out path encodes one per pushed message)."""
    parts = [b""]
    append = parts.append
    pack = FIELD_HEADER.pack
    for number, value in ((1, token), (2, topic), (3, payload), (4, message_id)):
        if value is not None:
            value = bytes(value)
            if len(value) > MAX_FIELD:
                raise WireError(f"field {number} is {len(value)} bytes, over {MAX_FIELD}")
            append(pack(number, len(value)))
            append(value)
    if expiry is not None:
        append(_U32.pack(5, 4, int(expiry)))
    if timestamp is not None:
        append(_U64.pack(6, 8, int(timestamp)))
    if priority is not None:
        append(_U8.pack(13, 1, int(priority)))
    parts[0] = HEADER.pack(NOTIFICATION, sum(map(len, parts)))
    return b"".join(parts)


def decode_fields(body: bytes) -> tuple:
    out = []
    pos, end = 0, len(body)
    while pos < end:
        if end - pos < FIELD_HEADER.size:
            raise WireError("truncated field header")
        fid, length = FIELD_HEADER.unpack_from(body, pos)
        pos += FIELD_HEADER.size
        if end - pos < length:
            raise WireError(f"field {fid} claims {length} bytes, {end - pos} left")
        out.append((fid, body[pos : pos + length]))
        pos += length
    return tuple(out)


class FrameDecoder:
    """
    Incremental decoder. Buffers at most one frame (``max_frame`` bytes); a larger
    declared length raises before any of its body is buffered.
    """

    __slots__ = ("max_frame", "_buf")

    def __init__(self, max_frame: int = MAX_FRAME):
        self.max_frame = max_frame
        self._buf = b""

    def feed(self, data: bytes) -> Iterator[Frame]:
        """
        The complete frames in what was buffered plus ``data``. The bytes not yet framed are
        kept when the generator finishes or is closed: a consumer that stops early (to wait
        for something) must ``close()`` it before feeding again, not rely on CPython
        finalizing it when its last reference goes.
        """
        buf = self._buf
        if buf:
            # A partial frame is kept in a bytearray and grown in place: ``bytes + bytes``
            # copied all of it on every read, quadratic for a frame trickled in small reads.
            buf += data
        else:
            buf = data
        pos = 0
        try:
            while len(buf) - pos >= HEADER.size:
                command, length = HEADER.unpack_from(buf, pos)
                if length > self.max_frame:
                    raise WireError(
                        f"frame of command {command} declares {length} bytes,"
                        f" over the limit of {self.max_frame}"
                    )
                start = pos + HEADER.size
                if len(buf) - start < length:
                    break
                body = buf[start : start + length]
                if type(body) is not bytes:
                    body = bytes(body)
                pos = start + length
                yield Frame(command, decode_fields(body))
        finally:
            if pos >= len(buf):
                self._buf = b""  # idle connections share the empty bytes
            elif buf is not data:
                del buf[:pos]  # in place (the bytearray already held the rest)
            else:
                self._buf = bytearray(buf[pos:]) if pos else bytearray(buf)

    @property
    def buffered(self) -> int:
        return len(self._buf)


# --- typed messages --------------------------------------------------------

_INT_WIDTH = {"u8": 1, "u16": 2, "u32": 4, "u64": 8}


def fid(number: int, kind: str = "bytes", default=None):
    """A message attribute carried in field ``number``; ``kind`` is bytes, str, list or uN."""
    return field(default=default, metadata={"fid": number, "kind": kind})


def _spec(cls) -> tuple:
    """(name, field id, kind, int width) of a message class's wire fields, in order; cached
    on the class (``dataclasses.fields`` is slow enough to show in the fan-out profile)."""
    spec = cls.__dict__.get("_SPEC")
    if spec is None:
        spec = tuple(
            (f.name, f.metadata["fid"], f.metadata["kind"], _INT_WIDTH.get(f.metadata["kind"], 0))
            for f in dc_fields(cls)
            if "fid" in f.metadata
        )
        cls._SPEC = spec
    return spec


class Message:
    COMMAND: ClassVar[int]
    REQUIRED: ClassVar[tuple] = ()

    def _pairs(self) -> list:
        out = []
        for name, number, kind, width in _spec(type(self)):
            value = getattr(self, name)
            if value is None:
                continue
            if kind == "list":
                out.extend((number, v) for v in value)
            elif width:
                out.append((number, int(value).to_bytes(width, "big")))
            elif kind == "str":
                out.append((number, value.encode("utf-8")))
            else:
                out.append((number, bytes(value)))
        return out

    def to_frame(self) -> Frame:
        return Frame(self.COMMAND, tuple(self._pairs()))

    def encode(self) -> bytes:
        return _encode(self.COMMAND, self._pairs())

    @classmethod
    def from_frame(cls, frame: Frame):
        if frame.command != cls.COMMAND:
            raise WireError(f"expected command {cls.COMMAND}, got {frame.command}")
        by_id: dict = {}
        for i, v in frame.fields:
            found = by_id.get(i)
            if found is None:
                by_id[i] = [v]
            else:
                found.append(v)
        values = {}
        for name, number, kind, width in _spec(cls):
            found = by_id.get(number, ())
            if kind == "list":
                values[name] = list(found)
                continue
            if not found:
                if name in cls.REQUIRED:
                    raise WireError(f"{cls.__name__} lacks field {number} ({name})")
                continue
            if len(found) > 1:
                raise WireError(f"{cls.__name__} repeats field {number} ({name})")
            raw = found[0]
            if width:
                if len(raw) != width:
                    raise WireError(
                        f"{cls.__name__} field {number} ({name}) is {len(raw)} bytes,"
                        f" expected {width}"
                    )
                values[name] = int.from_bytes(raw, "big")
            elif kind == "str":
                try:
                    values[name] = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise WireError(f"{cls.__name__} field {number} is not UTF-8")
            else:
                values[name] = raw
        return cls(**values)


@dataclass
class Connect(Message):
    COMMAND = CONNECT
    REQUIRED = ("certificate", "nonce", "signature")
    push_token: Optional[bytes] = fid(1)
    state: Optional[int] = fid(2, "u8")
    flags: Optional[int] = fid(5, "u32")
    certificate: Optional[bytes] = fid(12)
    nonce: Optional[bytes] = fid(13)
    signature: Optional[bytes] = fid(14)
    protocol_version: Optional[int] = fid(16, "u16")
    #: pushd extension version (field 32); absent from plain APNs clients.
    pushd_version: Optional[int] = fid(32, "u8")
    #: pushd: the signature also covers this connection's TLS exporter (BINDING_*).
    binding: Optional[int] = fid(33, "u8")


@dataclass
class ConnectAck(Message):
    COMMAND = CONNECT_ACK
    REQUIRED = ("status",)
    status: int = fid(1, "u8", 0)
    token: Optional[bytes] = fid(3)
    max_message_size: Optional[int] = fid(4, "u16")
    unknown5: Optional[bytes] = fid(5)
    capabilities: Optional[bytes] = fid(6)
    server_time: Optional[int] = fid(10, "u64")
    #: Seconds between keepalives the server expects (pushd extension, field 32).
    keepalive_interval: Optional[int] = fid(32, "u16")


@dataclass
class Filter(Message):
    COMMAND = FILTER
    token: Optional[bytes] = fid(1)
    enabled: list = fid(2, "list")
    ignored: list = fid(3, "list")
    opportunistic: list = fid(4, "list")
    paused: list = fid(5, "list")


@dataclass
class Notification(Message):
    """
    Field 1 and 2 swap with the direction: server to device carries the token in 1 and
    the topic hash in 2 (a token is never 20 bytes, so a reader can tell them apart).
    """

    COMMAND = NOTIFICATION
    REQUIRED = ("token", "topic", "payload", "message_id")
    token: Optional[bytes] = fid(1)
    topic: Optional[bytes] = fid(2)
    payload: Optional[bytes] = fid(3)
    message_id: Optional[bytes] = fid(4)
    expiry: Optional[int] = fid(5, "u32")
    timestamp: Optional[int] = fid(6, "u64")
    priority: Optional[int] = fid(13, "u8")


@dataclass
class NotificationAck(Message):
    COMMAND = NOTIFICATION_ACK
    REQUIRED = ("message_id", "status")
    token: Optional[bytes] = fid(1)
    message_id: Optional[bytes] = fid(4)
    status: Optional[int] = fid(8, "u8")


@dataclass
class KeepAlive(Message):
    COMMAND = KEEPALIVE
    connection_method: Optional[str] = fid(1, "str")


@dataclass
class KeepAliveAck(Message):
    COMMAND = KEEPALIVE_ACK


@dataclass
class NoStorage(Message):
    COMMAND = NO_STORAGE
    token: Optional[bytes] = fid(1)


@dataclass
class ScopedToken(Message):
    COMMAND = SCOPED_TOKEN
    REQUIRED = ("topic",)
    token: Optional[bytes] = fid(1)
    topic: Optional[bytes] = fid(2)
    app_id: Optional[bytes] = fid(3)


@dataclass
class ScopedTokenAck(Message):
    COMMAND = SCOPED_TOKEN_ACK
    REQUIRED = ("status", "topic")
    status: int = fid(1, "u8", 0)
    scoped_token: Optional[bytes] = fid(2)
    topic: Optional[bytes] = fid(3)


@dataclass
class SetState(Message):
    COMMAND = SET_STATE
    state: Optional[int] = fid(1, "u8")
    unknown2: Optional[int] = fid(2, "u32")


@dataclass
class Unregister(Message):
    """pushd: the app of this topic is gone; its token answers providers 410 from now on."""

    COMMAND = UNREGISTER
    REQUIRED = ("token", "topic")
    token: Optional[bytes] = fid(1)
    topic: Optional[bytes] = fid(2)


@dataclass
class GoAway(Message):
    """pushd: the gateway drains; reconnect at once, after a uniform random wait in
    [0, window ms] (so that thousands of devices do not all connect in one millisecond)."""

    COMMAND = GOAWAY
    window_ms: Optional[int] = fid(1, "u32")


MESSAGES = {
    cls.COMMAND: cls
    for cls in (
        Connect,
        ConnectAck,
        Filter,
        Notification,
        NotificationAck,
        KeepAlive,
        KeepAliveAck,
        NoStorage,
        ScopedToken,
        ScopedTokenAck,
        SetState,
        Unregister,
        GoAway,
    )
}


def parse(frame: Frame) -> Message:
    """The typed message of a frame; WireError for an unknown command or bad fields."""
    cls = MESSAGES.get(frame.command)
    if cls is None:
        raise WireError(f"unknown command {frame.command}")
    return cls.from_frame(frame)
