import hashlib
import hmac
import json
import os
import stat
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from pushd import tls
from pushd.gateway import auth as auth_module
from pushd.gateway.auth import TOPIC_SUFFIXES, Authenticator, ProviderKeys, b64url, make_jwt, unb64url
from pushd.gateway.errors import Refusal
from pushd.gateway.provider.rules import refused

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
        with self.assertRaises(Refusal) as e:
            self.auth.authenticate(header)
        answer = refused(e.exception)  # the provider API's status for the domain's refusal
        return answer.status, answer.reason

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

    def test_topic_ownership_is_exact_or_an_apns_suffix(self):
        """A team owning com.b pushes to com.b and com.b.voip, never to another team's com.b.app."""
        keys = ProviderKeys.load(self.path)
        keys.add_key("KEYB", "TEAMB", public_pem(tls.new_key("ec")), ["com.b"])
        keys.save(self.path)
        self.clock.advance(2)
        self.auth._reload()
        self.assertTrue(self.auth.allowed("TEAMB", "com.b"))
        for suffix in TOPIC_SUFFIXES:
            self.assertTrue(self.auth.allowed("TEAMB", "com.b" + suffix), suffix)
        for topic in ("com.b.app", "com.b.app.voip", "com.b.voip.x", "com.b.", "com.bb", "com", "com.b.voipx"):
            self.assertFalse(self.auth.allowed("TEAMB", topic), topic)
        self.assertEqual(len(TOPIC_SUFFIXES), 7)

    def forge(self, header, claims, key=None):
        """A token signed by the right key whose header and claims are whatever JSON we like."""
        h = b64url(json.dumps(header).encode())
        c = b64url(json.dumps(claims).encode())
        sig = jwt.get_algorithm_by_name("ES256").sign(f"{h}.{c}".encode(), key or self.key)
        return f"{h}.{c}.{b64url(sig)}"

    def test_every_header_and_claim_type_is_checked(self):
        """Wrong JSON types in a correctly signed token are InvalidProviderToken, never an exception."""
        good_h, good_c = {"alg": "ES256", "kid": "KEY1"}, {"iss": "TEAM1", "iat": T0}
        self.assertEqual(self.auth.authenticate(self.bearer(self.forge(good_h, good_c))), "TEAM1")
        headers = [dict(good_h, kid=v) for v in (["KEY1"], {"k": 1}, 1, None, True)]
        headers += [dict(good_h, alg=v) for v in (["ES256"], None, 256, "HS256", "none", "ES384")]
        headers += [["ES256", "KEY1"], "KEY1", 1, None, {"alg": "ES256"}]
        claims = [dict(good_c, iss=v) for v in (["TEAM1"], {"t": 1}, 1, None, True)]
        claims += [dict(good_c, iat=v) for v in (str(T0), float(T0), None, True, [T0], {"t": T0})]
        claims += [[good_c], "TEAM1", T0, None, {"iss": "TEAM1"}, {"iat": T0}]
        cases = [(h, good_c) for h in headers] + [(good_h, c) for c in claims]
        for header, claim in cases:
            self.assertEqual(self.reason(self.bearer(self.forge(header, claim))), (403, "InvalidProviderToken"),
                             (header, claim))

    def test_only_es256(self):
        """Not HS256 keyed with the public key (algorithm confusion), not ES384, not none."""
        pem = public_pem(self.key)
        claims = {"iss": "TEAM1", "iat": T0}
        h = b64url(json.dumps({"alg": "HS256", "kid": "KEY1"}).encode())
        c = b64url(json.dumps(claims).encode())
        hs = f"{h}.{c}." + b64url(hmac.new(pem, f"{h}.{c}".encode(), hashlib.sha256).digest())
        es384 = self.forge({"alg": "ES384", "kid": "KEY1"}, claims)
        unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": "KEY1"})
        for token in (hs, es384, unsigned):
            self.assertEqual(self.reason(self.bearer(token)), (403, "InvalidProviderToken"), token)

    @settings(max_examples=300, deadline=None)
    @given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                        lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(), kids, max_size=3),
                        max_leaves=8),
           st.sampled_from(["alg", "kid", "iss", "iat", "crit", "typ", "b64"]), st.booleans())
    def test_any_json_value_anywhere_is_a_clean_rejection(self, value, name, in_header):
        """Hypothesis puts any JSON value in any field: the answer is a team or a Refusal, nothing else."""
        header, claims = {"alg": "ES256", "kid": "KEY1"}, {"iss": "TEAM1", "iat": T0}
        (header if in_header else claims)[name] = value
        try:
            team = self.auth.authenticate(self.bearer(self.forge(header, claims)))
        except Refusal as e:
            self.assertIn(e.reason, ("InvalidProviderToken", "ExpiredProviderToken"))
        else:
            self.assertEqual(team, "TEAM1")

    def test_garbage_bytes_are_a_clean_rejection(self):
        for token in (b"\xff\xfe.\x00.\x80", b"..", b"a..", b"e30.e30.", b"\xe9t\xe9.x.y", b"W10.W10.AA"):
            self.assertEqual(self.reason(b"bearer " + token), (403, "InvalidProviderToken"), token)

    def test_pyjwt_runs_once_per_token_not_per_push(self):
        calls = []
        real = jwt.decode
        self.patch(auth_module.jwt, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
        token = self.bearer(make_jwt(self.key, "KEY1", "TEAM1", iat=T0))
        for _ in range(100):
            self.assertEqual(self.auth.authenticate(token), "TEAM1")
        self.assertEqual((len(calls), self.auth.verified, self.auth.cache_hits), (1, 1, 99))

    def test_cache_is_bounded(self):
        self.patch(auth_module, "CACHE_SIZE", 5)
        for i in range(20):
            self.auth.authenticate(self.bearer(make_jwt(self.key, "KEY1", "TEAM1", iat=T0 - i)))
        self.assertEqual(len(self.auth._cache), 5)

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

    def test_unreadable_keys_file_keeps_previous_and_says_so_once(self):
        """providers.json unreadable (here a directory; for a daemon user, a root-owned 0600 file)."""
        token = self.bearer(make_jwt(self.key, "KEY1", "TEAM1", iat=T0))
        self.auth.authenticate(token)
        self.path.unlink()
        self.path.mkdir()
        self.clock.advance(2)
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        self.assertEqual(self.auth.authenticate(token), "TEAM1")
        for i in range(20):  # unknown key ids each ask for a fresh look
            self.assertEqual(self.reason(self.bearer(make_jwt(self.key, f"NEW{i}", "TEAM1", iat=T0))),
                             (403, "InvalidProviderToken"))
        self.assertEqual(len([e for e in logged if "keeping the previous" in e.get("log_format", "")]), 1)
        self.flushLoggedErrors()

    def test_only_p256_keys(self):
        rsa = tls.new_key("rsa")
        with self.assertRaisesRegex(ValueError, "P-256"):
            ProviderKeys().add_key("K", "T", public_pem(rsa))


class ProvidersFileTests(unittest.TestCase):
    def test_providers_json_is_0600_whatever_the_umask(self):
        old = os.umask(0o022)
        self.addCleanup(os.umask, old)
        path = Path(self.mktemp())
        keys = ProviderKeys()
        keys.add_key("KEY1", "TEAM1", public_pem(tls.new_key("ec")), ["com.example.app"])
        keys.save(path)
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        path.chmod(0o644)
        keys.save(path)
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
