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
    hpackfast._cache.clear()
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
        hpackfast._cache.clear()
        texts = [b"bearer eyJhbGciOiJFUzI1NiIsImtpZCI6%05d" % i for i in range(hpackfast.CACHE_SIZE + 10)]
        for t in texts:
            self.assertEqual(hpackfast.decode_huffman(ENCODER.encode(t)), t)
        self.assertLessEqual(len(hpackfast._cache), hpackfast.CACHE_SIZE)
        for t in texts[-5:]:
            self.assertEqual(hpackfast.decode_huffman(ENCODER.encode(t)), t)

    def test_install(self):
        from hpack import hpack

        original = hpack.decode_huffman
        self.addCleanup(setattr, hpack, "decode_huffman", original)
        hpackfast.install()
        self.assertIs(hpack.decode_huffman, hpackfast.decode_huffman)
