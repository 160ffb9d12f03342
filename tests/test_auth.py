import json
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from twisted.internet import task
from twisted.trial import unittest

from pushd import tls
from pushd.gateway.auth import Authenticator, ProviderKeys, b64url, make_jwt, unb64url
from pushd.gateway.router import Rejected

T0 = 1_800_000_000


def public_pem(key):
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


class AuthTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.key = tls.new_key("ec")
        self.path = Path(self.mktemp())
        keys = ProviderKeys()
        keys.add_key("KEY1", "TEAM1", public_pem(self.key), ["com.example.app"])
        keys.save(self.path)
        self.auth = Authenticator(self.path, ["static-key"], self.clock)

    def bearer(self, token):
        return b"bearer " + (token.encode() if isinstance(token, str) else token)

    def reason(self, header):
        with self.assertRaises(Rejected) as e:
            self.auth.authenticate(header)
        return e.exception.status, e.exception.reason

    def test_valid_token_names_its_team_and_is_cached(self):
        token = make_jwt(self.key, "KEY1", "TEAM1", iat=T0 - 10)
        self.assertEqual(self.auth.authenticate(self.bearer(token)), "TEAM1")
        self.assertEqual(self.auth.authenticate(self.bearer(token)), "TEAM1")
        self.assertEqual((self.auth.verified, self.auth.cache_hits), (1, 1))

    def test_static_operator_key(self):
        self.assertIsNone(self.auth.authenticate(b"bearer static-key"))
        self.assertEqual(self.reason(b"bearer wrong-key"), (403, "InvalidProviderToken"))

    def test_missing(self):
        self.assertEqual(self.reason(None), (403, "MissingProviderToken"))
        self.assertEqual(self.reason(b"basic abc"), (403, "MissingProviderToken"))
        self.assertEqual(self.reason(b"bearer "), (403, "MissingProviderToken"))

    def test_expired_even_when_cached(self):
        token = make_jwt(self.key, "KEY1", "TEAM1", iat=T0)
        self.auth.authenticate(self.bearer(token))
        self.clock.advance(3601)
        self.assertEqual(self.reason(self.bearer(token)), (403, "ExpiredProviderToken"))
        old = make_jwt(self.key, "KEY1", "TEAM1", iat=T0 - 7200)
        self.assertEqual(self.reason(self.bearer(old)), (403, "ExpiredProviderToken"))

    def test_invalid_tokens(self):
        other = tls.new_key("ec")
        good = make_jwt(self.key, "KEY1", "TEAM1", iat=T0)
        h, c, s = good.split(".")
        forged_claims = b64url(json.dumps({"iss": "TEAM1", "iat": T0 + 1}).encode())
        none_header = b64url(json.dumps({"alg": "none", "kid": "KEY1"}).encode())
        cases = {
            "signed by another key": make_jwt(other, "KEY1", "TEAM1", iat=T0),
            "unknown key id": make_jwt(self.key, "KEY2", "TEAM1", iat=T0),
            "another team's key": make_jwt(self.key, "KEY1", "TEAM2", iat=T0),
            "claims changed": f"{h}.{forged_claims}.{s}",
            "alg none": f"{none_header}.{c}.",
            "garbage": "a.b.c",
            "truncated signature": f"{h}.{c}.{s[:20]}",
            "far future iat": make_jwt(self.key, "KEY1", "TEAM1", iat=T0 + 3600),
            "huge": "a." + "b" * 5000 + ".c",
        }
        for name, token in cases.items():
            self.assertEqual(self.reason(self.bearer(token)), (403, "InvalidProviderToken"), name)
        self.assertEqual(len(unb64url(s)), 64)

    def test_topics(self):
        self.assertTrue(self.auth.allowed("TEAM1", "com.example.app"))
        self.assertTrue(self.auth.allowed("TEAM1", "com.example.app.voip"))
        self.assertFalse(self.auth.allowed("TEAM1", "com.example.application"))
        self.assertFalse(self.auth.allowed("TEAM2", "com.example.app"))
        self.assertTrue(self.auth.allowed(None, "anything"))

    def test_keys_file_reloaded_when_changed(self):
        key2 = tls.new_key("ec")
        keys = ProviderKeys.load(self.path)
        keys.add_key("KEY2", "TEAM2", public_pem(key2), ["com.example.two"])
        keys.save(self.path)
        token = make_jwt(key2, "KEY2", "TEAM2", iat=T0)
        self.clock.advance(2)
        self.assertEqual(self.auth.authenticate(self.bearer(token)), "TEAM2")
        self.assertTrue(self.auth.allowed("TEAM2", "com.example.two"))

    def test_new_key_works_at_once(self):
        """pushctl keys add, then a push right away: an unknown kid makes it look again."""
        self.auth.authenticate(self.bearer(make_jwt(self.key, "KEY1", "TEAM1", iat=T0)))
        key2 = tls.new_key("ec")
        keys = ProviderKeys.load(self.path)
        keys.add_key("KEY2", "TEAM2", public_pem(key2), ["com.example.two"])
        keys.save(self.path)
        token = make_jwt(key2, "KEY2", "TEAM2", iat=T0)
        self.assertEqual(self.auth.authenticate(self.bearer(token)), "TEAM2")  # no clock.advance

    def test_broken_keys_file_keeps_previous(self):
        self.path.write_text("{not json")
        self.clock.advance(2)
        token = make_jwt(self.key, "KEY1", "TEAM1", iat=T0)
        self.assertEqual(self.auth.authenticate(self.bearer(token)), "TEAM1")
        self.flushLoggedErrors()

    def test_only_p256_keys(self):
        rsa = tls.new_key("rsa")
        with self.assertRaisesRegex(ValueError, "P-256"):
            ProviderKeys().add_key("K", "T", public_pem(rsa))
