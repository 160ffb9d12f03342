"""
Provider authentication as APNs does it: a JWT signed ES256, header ``kid`` (key id),
claims ``iss`` (team id) and ``iat``. The gateway holds each key's public half and the
topics its team may push to, in ``STATE-DIR/providers.json`` (written by ``pushctl keys``,
re-read when it changes). PyJWT checks the signature (ES256 only); every header field and
claim the gateway reads has its type checked, so a malformed token is InvalidProviderToken,
never an exception. Verified tokens are cached by their text, so a busy connection verifies
a token once, not on every request; so are tokens that failed, for a while (by digest,
bounded): a verification costs 0.5-1.1 ms of CPU, a refused token sent again costs none.
Whoever calls may also bound the verifications it pays for (``may_verify``, per address).

The static key in ``STATE-DIR/provider.key`` stays accepted as ``bearer <key>``: the
operator's own key, allowed every topic.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.logger import Logger

from pushd import private
from pushd.filewatch import FileWatch
from pushd.gateway.errors import ProviderTokenRefused, TooManyProviderTokenUpdates

#: APNs refuses a token whose iat is older than one hour.
TOKEN_LIFETIME = 3600
#: How far in the future an iat may be (clock skew between provider and gateway).
FUTURE_SKEW = 300
MAX_TOKEN = 2048
CACHE_SIZE = 10000
#: Tokens that failed verification remembered (16-byte digests), and for how long: a token
#: refused for an iat in the future becomes valid later, a newly added key may validate one.
FAILED_CACHE_SIZE = 4096
FAILED_TTL = 60.0
ALGORITHMS = ["ES256"]
#: What APNs appends to a bundle id for the other push types ("Sending notification
#: requests to APNs": voip, complication, fileprovider, location, liveactivity,
#: pushtotalk, widgets). A team owning com.b may push to com.b and com.b<suffix>, no more.
TOPIC_SUFFIXES = (".voip", ".complication", ".pushkit.fileprovider", ".location-query",
                  ".push-type.liveactivity", ".voip-ptt", ".push-type.widgets")
#: PyJWT checks the signature and the algorithm; the times are checked here, on the
#: gateway's (injected) clock, and the claims' types too.
_DECODE_OPTIONS = {"verify_signature": True, "verify_exp": False, "verify_nbf": False, "verify_iat": False,
                   "verify_aud": False, "verify_iss": False, "require": []}
#: What a hostile token can make PyJWT raise (its own errors; the rest are our type checks').
_BAD_TOKEN = (jwt.PyJWTError, ValueError, TypeError, KeyError, AttributeError)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_jwt(private_key, key_id: str, team_id: str, iat: int | None = None) -> str:
    """An APNs provider token (what a provider library builds from its .p8 key)."""
    claims = {"iss": team_id, "iat": int(time.time() if iat is None else iat)}
    return jwt.encode(claims, private_key, algorithm="ES256", headers={"kid": key_id})


def owned_topics(topics) -> frozenset:
    """Every topic a team owning ``topics`` may push to: each exactly, and with APNs' suffixes."""
    return frozenset(t + suffix for t in topics for suffix in ("", *TOPIC_SUFFIXES))


@dataclass
class ProviderKeys:
    """Teams (with their topics) and key ids (with their team and public key)."""

    teams: dict = field(default_factory=dict)  # team -> {"topics": [...]}
    keys: dict = field(default_factory=dict)  # key id -> {"team": str, "public_key": PEM str}

    @classmethod
    def load(cls, path: Path) -> "ProviderKeys":
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
            keys = cls(dict(data.get("teams", {})), dict(data.get("keys", {})))
            for kid, entry in keys.keys.items():
                if not isinstance(entry.get("team"), str) or not isinstance(entry.get("public_key"), str):
                    raise ValueError(f"key {kid!r} lacks its team or public_key")
            for team, entry in keys.teams.items():
                topics = entry.get("topics", [])
                if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
                    raise ValueError(f"team {team!r}: topics is not a list of strings")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} is not a valid providers file: {e!r}") from None
        return keys

    def save(self, path: Path) -> None:
        data = json.dumps({"teams": self.teams, "keys": self.keys}, indent=1, sort_keys=True)
        private.write(path, data.encode())

    def add_key(self, key_id: str, team: str, public_pem: bytes, topics=()):
        public = serialization.load_pem_public_key(public_pem)
        if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
            raise ValueError("provider keys are EC P-256 (ES256), like APNs .p8 keys")
        self.keys[key_id] = {"team": team, "public_key": public_pem.decode("ascii")}
        team_entry = self.teams.setdefault(team, {"topics": []})
        for t in topics:
            if t not in team_entry["topics"]:
                team_entry["topics"].append(t)


class Authenticator:
    """Answers: which team sent this request, and may it push to this topic."""

    log = Logger()

    def __init__(self, path: Path, static_keys=(), clock=None):
        self.path = Path(path)
        self.static_keys = [k.encode() if isinstance(k, str) else k for k in static_keys]
        self._watch = FileWatch((self.path,), clock)
        self._public: dict = {}
        self._teams: dict = {}  # team -> frozenset of the topics it may push to
        self._cache: OrderedDict = OrderedDict()  # token -> (team, iat)
        self._failed: OrderedDict = OrderedDict()  # digest of a token -> when it failed
        self.verified = 0
        self.cache_hits = 0
        self.failed_hits = 0
        self._reload()

    def now(self) -> float:
        return self._watch.now()

    def _reload(self, force=False):
        """Re-read providers.json if it changed (looked at no more than once a second, unless forced)."""
        if self._watch.changed(force) is None:
            return
        try:
            keys = ProviderKeys.load(self.path)
            public = {kid: (e["team"], serialization.load_pem_public_key(e["public_key"].encode()))
                      for kid, e in keys.keys.items()}
        except (ValueError, OSError) as e:
            # Malformed, or unreadable (written 0600 by another user): said once per change of
            # the file, however many unknown key ids ask for a fresh look.
            self.log.error("keeping the previous provider keys: {why}", why=str(e))
            return
        self._public = public
        self._teams = {team: owned_topics(t.get("topics", [])) for team, t in keys.teams.items()}
        self._cache.clear()
        self._failed.clear()

    def authenticate(self, header: bytes | None, may_verify=None):
        """
        Return the team id (None for the static operator key); raise ProviderTokenRefused.
        A token not seen before is verified only if ``may_verify()`` (when given) says so:
        else TooManyProviderTokenUpdates, APNs' reason for tokens changed too often.
        """
        if not header:
            raise ProviderTokenRefused("MissingProviderToken")
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            raise ProviderTokenRefused("MissingProviderToken")
        if token.count(b".") != 2:
            if any(hmac.compare_digest(token, k) for k in self.static_keys):
                return None
            raise ProviderTokenRefused("InvalidProviderToken")
        if len(token) > MAX_TOKEN:
            raise ProviderTokenRefused("InvalidProviderToken")
        self._reload()
        now = self.now()
        hit = self._cache.get(token)
        if hit is not None:
            team, iat = hit
            self.cache_hits += 1
        else:
            digest = hashlib.blake2b(token, digest_size=16).digest()
            failed = self._failed.get(digest)
            if failed is not None:
                if now - failed < FAILED_TTL:
                    self.failed_hits += 1
                    raise ProviderTokenRefused("InvalidProviderToken")
                del self._failed[digest]
            if may_verify is not None and not may_verify():
                raise TooManyProviderTokenUpdates()
            try:
                team, iat = self._verify(token, now)
            except ProviderTokenRefused:
                self._failed[digest] = now
                while len(self._failed) > FAILED_CACHE_SIZE:
                    self._failed.popitem(last=False)
                raise
            self._cache[token] = (team, iat)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        if now - iat > TOKEN_LIFETIME:
            raise ProviderTokenRefused("ExpiredProviderToken")
        return team

    def _verify(self, token: bytes, now: float):
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except _BAD_TOKEN:
            raise ProviderTokenRefused("InvalidProviderToken") from None
        if not isinstance(kid, str):
            raise ProviderTokenRefused("InvalidProviderToken")
        if kid not in self._public:
            # A key registered a moment ago (pushctl keys add) must work at once: look again.
            self._reload(force=True)
        entry = self._public.get(kid)
        if entry is None:
            raise ProviderTokenRefused("InvalidProviderToken")
        team, public = entry
        try:
            claims = jwt.decode(token, public, algorithms=ALGORITHMS, options=_DECODE_OPTIONS)
        except _BAD_TOKEN:
            raise ProviderTokenRefused("InvalidProviderToken") from None
        iss, iat = claims.get("iss"), claims.get("iat")
        # iat an integer (not a bool, float or string); iss equal to the key's team, which
        # only that very string is.
        if type(iat) is not int or iss != team:
            raise ProviderTokenRefused("InvalidProviderToken")
        if iat - now > FUTURE_SKEW:
            raise ProviderTokenRefused("InvalidProviderToken")
        self.verified += 1
        return team, iat

    def allowed(self, team, topic: str) -> bool:
        """A team may push to its topics exactly, and to them with APNs' suffixes (.voip, ...)."""
        if team is None:
            return True
        return topic in self._teams.get(team, ())
