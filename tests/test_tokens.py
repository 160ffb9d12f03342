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


class TokenOracleTests(unittest.TestCase):
    """A forger learns nothing from the reason until the whole 96 bits of MAC are right."""

    def setUp(self):
        self.m = TokenMinter(b"k")
        self.genuine = self.m.scoped_token(DEV, wire.topic_hash("com.example.a"))

    def reason(self, token, topic):
        with self.assertRaises(TokenError) as e:
            self.m.resolve(bytes(token), topic)
        return e.exception.reason

    def flipped(self, index):
        t = bytearray(self.genuine)
        t[index] ^= 1
        return t

    def test_one_right_mac_answers_like_none(self):
        id_right = self.flipped(31)  # the id MAC right, the topic MAC wrong
        topic_right = self.flipped(20)  # the other way round
        both_wrong = self.flipped(20)
        both_wrong[31] ^= 1
        reasons = {self.reason(t, "com.example.a") for t in (id_right, topic_right, both_wrong)}
        self.assertEqual(reasons, {"BadDeviceToken"})

    def test_other_topic_answer_does_not_depend_on_the_macs(self):
        """Addressed to another topic, a right and a wrong id MAC get the same reason."""
        self.assertEqual(self.reason(self.genuine, "com.example.b"), "DeviceTokenNotForTopic")
        self.assertEqual(self.reason(self.flipped(20), "com.example.b"), "DeviceTokenNotForTopic")
        self.assertEqual(self.reason(self.flipped(31), "com.example.b"), "DeviceTokenNotForTopic")
