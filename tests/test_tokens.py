from twisted.trial import unittest

from pushd import wire
from pushd.gateway.tokens import TokenError, TokenMinter

DEV = "00112233445566778899aabbccddeeff"


class TokenTests(unittest.TestCase):
    def setUp(self):
        self.m = TokenMinter(b"k")

    def test_scoped_token_resolves_for_its_topic(self):
        t = self.m.scoped_token(DEV, wire.topic_hash("com.example.a"))
        self.assertEqual(len(t), 32)
        self.assertEqual(self.m.resolve(t, "com.example.a"), (DEV, True))

    def test_scoped_token_not_for_other_topic(self):
        t = self.m.scoped_token(DEV, wire.topic_hash("com.example.a"))
        with self.assertRaises(TokenError) as e:
            self.m.resolve(t, "com.example.b")
        self.assertEqual(e.exception.reason, "DeviceTokenNotForTopic")

    def test_base_token_any_topic(self):
        t = self.m.base_token(DEV)
        self.assertEqual(self.m.resolve(t, "x"), (DEV, False))

    def test_forged(self):
        t = bytearray(self.m.base_token(DEV))
        t[0] ^= 1
        with self.assertRaises(TokenError) as e:
            self.m.resolve(bytes(t), "x")
        self.assertEqual(e.exception.reason, "BadDeviceToken")

    def test_other_secret(self):
        t = TokenMinter(b"other").scoped_token(DEV, wire.topic_hash("a"))
        with self.assertRaises(TokenError) as e:
            self.m.resolve(t, "a")
        self.assertEqual(e.exception.reason, "BadDeviceToken")

    def test_wrong_length(self):
        with self.assertRaises(TokenError):
            self.m.resolve(b"\x00" * 31, "a")

    def test_never_20_bytes(self):
        """pypush tells the direction of a notification by a 20-byte field 1."""
        self.assertNotEqual(len(self.m.base_token(DEV)), 20)
