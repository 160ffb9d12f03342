"""
A faster HPACK Huffman decoder for the h2 stack, installed into hpack at gateway start.

hpack decodes a nibble at a time in Python; every provider request carries a Huffman-coded
path and JWT (clients never index ``authorization``), so under load this was a sixth of
the gateway's time. This walks a byte at a time over a table derived at import from
hpack's own nibble table (same states, same errors), and remembers recent JWT-sized
strings: a provider sends the same JWT with every request for up to an hour.

The memory is bounded before anyone is authenticated: only encoded strings from CACHE_MIN
to CACHE_MAX bytes are remembered, and all of them together (keys and values) at most
``cache_bytes``. Unbounded, one refused header block full of long Huffman strings left
about 1.2 MB here, up to ~1.8 GB in all.
"""

from __future__ import annotations

from hpack import hpack as _hpack
from hpack import huffman_table as _ht
from hpack.exceptions import HPACKDecodingError

_COMPLETE, _EMIT, _FAIL = _ht.HUFFMAN_COMPLETE, _ht.HUFFMAN_EMIT_SYMBOL, _ht.HUFFMAN_FAIL
#: Decoded strings remembered, keyed by their encoded bytes, at most this many...
CACHE_SIZE = 1024
#: ...only those from CACHE_MIN to CACHE_MAX encoded bytes (an ES256 JWT header value is ~170)...
CACHE_MIN = 24
CACHE_MAX = 512
#: ...and all keys and values together at most this many bytes (a gateway setting).
CACHE_BYTES = 256 * 1024


def _build():
    table = _ht.HUFFMAN_TABLE
    states = len(table) // 16
    nxt, out, done = [0] * (states * 256), [None] * (states * 256), bytearray(states * 256)
    interned: dict = {}
    for state in range(states):
        for byte in range(256):
            emitted = bytearray()
            s, ok, flags = state, True, 0
            for nibble in (byte >> 4, byte & 0x0F):
                s, flags, symbol = table[s * 16 + nibble]
                if flags & _FAIL:
                    ok = False
                    break
                if flags & _EMIT:
                    emitted.append(symbol)
            i = state << 8 | byte
            if ok:
                nxt[i] = s
                out[i] = interned.setdefault(bytes(emitted), bytes(emitted))
                done[i] = flags & _COMPLETE
    return nxt, out, bytes(done)


_NEXT, _OUT, _DONE = _build()
_cache: dict = {}
_cached_bytes = 0
cache_bytes = CACHE_BYTES


def configure(max_bytes: int) -> None:
    """Set the cache's byte cap (``--hpack-cache-bytes``); 0 turns the cache off."""
    global cache_bytes
    cache_bytes = max_bytes
    clear()


def clear() -> None:
    global _cached_bytes
    _cache.clear()
    _cached_bytes = 0


def cached_bytes() -> int:
    return _cached_bytes


def decode_huffman(huffman_string) -> bytes:
    global _cached_bytes
    if not huffman_string:
        return b""
    key = bytes(huffman_string)
    hit = _cache.get(key)
    if hit is not None:
        return hit
    nxt, table = _NEXT, _OUT
    state = 0
    i = 0
    parts = []
    for byte in key:
        i = state << 8 | byte
        o = table[i]
        if o is None:
            raise HPACKDecodingError("Invalid Huffman string")
        if o:
            parts.append(o)
        state = nxt[i]
    if not _DONE[i]:
        raise HPACKDecodingError("Incomplete Huffman string")
    result = b"".join(parts)
    if CACHE_MIN <= len(key) <= CACHE_MAX:
        size = len(key) + len(result)
        if len(_cache) >= CACHE_SIZE or _cached_bytes + size > cache_bytes:
            _cache.clear()
            _cached_bytes = 0
        if size <= cache_bytes:
            _cache[key] = result
            _cached_bytes += size
    return result


def install():
    """Make hpack's decoder use this one (idempotent)."""
    _hpack.decode_huffman = decode_huffman
