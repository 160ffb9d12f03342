"""
Device tokens that need no lookup: ``device id | topic tag | two MACs``.

A token names (device, topic) and is verifiable with the gateway's secret alone, so tokens
survive restarts and every gateway node sharing the secret can resolve them. Invalidation
(410 Unregistered) needs state and belongs to the token registry of the store.
"""

from __future__ import annotations

import hashlib
import hmac

from pushd import wire

TOKEN_LEN = 32
_BASE_TAG = b"\x00\x00\x00\x00"


class TokenError(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class TokenMinter:
    def __init__(self, secret: bytes):
        self._secret = secret

    def _mac(self, label: bytes, device: bytes, data: bytes) -> bytes:
        return hmac.new(self._secret, label + device + data, hashlib.sha256).digest()[:6]

    def _mint(self, device_id: str, tag: bytes, full: bytes) -> bytes:
        device = bytes.fromhex(device_id)
        return (
            device
            + tag
            + self._mac(b"pushd-token-id\0", device, tag)
            + self._mac(b"pushd-token-topic\0", device, full)
        )

    def base_token(self, device_id: str) -> bytes:
        """The device's own token, handed out in ConnectAck."""
        return self._mint(device_id, _BASE_TAG, b"")

    def scoped_token(self, device_id: str, topic_hash: bytes) -> bytes:
        """The per-app token: one (device, topic)."""
        if len(topic_hash) != 20:
            raise TokenError("BadTopic")
        return self._mint(device_id, topic_hash[:4], topic_hash)

    def resolve(self, token: bytes, topic: str) -> tuple:
        """
        Return ``(device_id, is_scoped)`` for a token a provider addressed with ``topic``.
        A base token reaches any topic of its device; a scoped token only its own.
        Raises TokenError("BadDeviceToken") or TokenError("DeviceTokenNotForTopic").

        The answer never depends on one MAC alone: "not for this topic" is read from the
        token's clear topic tag, before any secret is used, and otherwise both MACs are
        checked together with one reason. Two reasons for two 48-bit MACs let each be
        guessed on its own (2 x 2^48 tries instead of 2^96).
        """
        if len(token) != TOKEN_LEN:
            raise TokenError("BadDeviceToken")
        device, tag = token[:16], token[16:20]
        if tag == _BASE_TAG:
            full = b""
        else:
            full = wire.topic_hash(topic)
            if full[:4] != tag:
                raise TokenError("DeviceTokenNotForTopic")
        expected = self._mac(b"pushd-token-id\0", device, tag) + self._mac(b"pushd-token-topic\0", device, full)
        if not hmac.compare_digest(token[20:32], expected):
            raise TokenError("BadDeviceToken")
        return device.hex(), tag != _BASE_TAG
