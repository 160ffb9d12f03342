"""The fast Huffman decoder gives what hpack's own gives, errors included."""

from __future__ import annotations

from hpack import huffman_table
from hpack.exceptions import HPACKDecodingError
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from pushd.gateway import hpackfast

ENCODER = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)


def reference(data):
    try:
        return ("ok", huffman_table.decode_huffman(data))
    except HPACKDecodingError as e:
        return ("error", str(e))


def fast(data):
    hpackfast.clear()
    try:
        return ("ok", hpackfast.decode_huffman(data))
    except HPACKDecodingError as e:
        return ("error", str(e))


class FastHuffmanTests(unittest.TestCase):
    @settings(max_examples=500)
    @given(st.binary(max_size=300))
    def test_round_trip(self, text):
        encoded = ENCODER.encode(text)
        self.assertEqual(fast(encoded), ("ok", text))

    @settings(max_examples=1000)
    @given(st.binary(max_size=64))
    def test_arbitrary_bytes_same_as_hpack(self, data):
        self.assertEqual(fast(data), reference(data))

    def test_errors(self):
        self.assertEqual(fast(b"\xff\xff\xff\xff")[0], "error")  # EOS inside: invalid
        self.assertEqual(fast(b"\x00")[0], "error")  # padding not all ones: incomplete
        self.assertEqual(fast(b""), ("ok", b""))

    def test_cache_is_bounded_and_correct(self):
        hpackfast.clear()
        texts = [b"bearer eyJhbGciOiJFUzI1NiIsImtpZCI6%05d" % i for i in range(hpackfast.CACHE_SIZE + 10)]
        for t in texts:
            self.assertEqual(hpackfast.decode_huffman(ENCODER.encode(t)), t)
        self.assertLessEqual(len(hpackfast._cache), hpackfast.CACHE_SIZE)
        for t in texts[-5:]:
            self.assertEqual(hpackfast.decode_huffman(ENCODER.encode(t)), t)

    def test_long_strings_are_not_cached(self):
        """A refused header block of long Huffman strings leaves nothing behind."""
        hpackfast.clear()
        for i in range(50):
            text = b"%05d" % i + b"x" * 4000
            self.assertEqual(hpackfast.decode_huffman(ENCODER.encode(text)), text)
        self.assertEqual(hpackfast.cached_bytes(), 0)
        self.assertEqual(len(hpackfast._cache), 0)

    def test_cache_bytes_capped(self):
        """Many distinct JWT-sized strings: the cache never holds more than its byte cap."""
        self.addCleanup(hpackfast.configure, hpackfast.CACHE_BYTES)
        hpackfast.configure(8 * 1024)
        peak = 0
        for i in range(500):
            text = b"bearer %05d." % i + b"e" * 300
            encoded = ENCODER.encode(text)
            self.assertLessEqual(len(encoded), hpackfast.CACHE_MAX)
            self.assertEqual(hpackfast.decode_huffman(encoded), text)
            peak = max(peak, sum(len(k) + len(v) for k, v in hpackfast._cache.items()))
        self.assertLessEqual(peak, 8 * 1024)
        self.assertGreater(peak, 0, "JWT-sized strings are still cached")
        self.assertEqual(hpackfast.cached_bytes(), sum(len(k) + len(v) for k, v in hpackfast._cache.items()))

    def test_install(self):
        from hpack import hpack

        original = hpack.decode_huffman
        self.addCleanup(setattr, hpack, "decode_huffman", original)
        hpackfast.install()
        self.assertIs(hpack.decode_huffman, hpackfast.decode_huffman)
