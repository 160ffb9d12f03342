"""
Provider authentication as APNs does it: a JWT signed ES256, header ``kid`` (key id),
claims ``iss`` (team id) and ``iat``. The gateway holds each key's public half and the
topics its team may push to, in ``STATE-DIR/providers.json`` (written by ``pushctl keys``,
re-read when it changes). Verified tokens are cached, so a busy connection does not verify
the same token's signature on every request.

The static key in ``STATE-DIR/provider.key`` stays accepted as ``bearer <key>``: the
operator's own key, allowed every topic.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from twisted.logger import Logger

from pushd.gateway.router import Rejected

#: APNs refuses a token whose iat is older than one hour.
TOKEN_LIFETIME = 3600
#: How far in the future an iat may be (clock skew between provider and gateway).
FUTURE_SKEW = 300
MAX_TOKEN = 2048
CACHE_SIZE = 10000


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_jwt(private_key, key_id: str, team_id: str, iat: int | None = None) -> str:
    """An APNs provider token (what a provider library builds from its .p8 key)."""
    header = b64url(json.dumps({"alg": "ES256", "kid": key_id}, separators=(",", ":")).encode())
    claims = b64url(json.dumps({"iss": team_id, "iat": int(time.time() if iat is None else iat)},
                               separators=(",", ":")).encode())
    signing_input = f"{header}.{claims}".encode("ascii")
    r, s = decode_dss_signature(private_key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    return f"{header}.{claims}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


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
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} is not a valid providers file: {e!r}") from None
        return keys

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"teams": self.teams, "keys": self.keys}, indent=1, sort_keys=True))
        os.replace(tmp, path)

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
        self._clock = clock
        self._mtime = None
        self._checked = None
        self._public: dict = {}
        self._teams: dict = {}
        self._cache: OrderedDict = OrderedDict()  # token -> (team, iat)
        self.verified = 0
        self.cache_hits = 0
        self._reload()

    def now(self) -> float:
        return self._clock.seconds() if self._clock is not None else time.time()

    def _reload(self, force=False):
        """Re-read providers.json if it changed (looked at no more than once a second, unless forced)."""
        now = self.now()
        if not force and self._checked is not None and now - self._checked < 1.0:
            return
        self._checked = now
        try:
            mtime = self.path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = None
        if mtime == self._mtime:
            return
        try:
            keys = ProviderKeys.load(self.path)
            public = {kid: (e["team"], serialization.load_pem_public_key(e["public_key"].encode()))
                      for kid, e in keys.keys.items()}
        except ValueError as e:
            self.log.error("keeping the previous provider keys: {why}", why=str(e))
            return
        self._mtime = mtime
        self._public = public
        self._teams = {team: list(t.get("topics", [])) for team, t in keys.teams.items()}
        self._cache.clear()

    def authenticate(self, header: bytes | None):
        """Return the team id (None for the static operator key); raise Rejected."""
        if not header:
            raise Rejected(403, "MissingProviderToken")
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            raise Rejected(403, "MissingProviderToken")
        if token.count(b".") != 2:
            if any(hmac.compare_digest(token, k) for k in self.static_keys):
                return None
            raise Rejected(403, "InvalidProviderToken")
        if len(token) > MAX_TOKEN:
            raise Rejected(403, "InvalidProviderToken")
        self._reload()
        now = self.now()
        hit = self._cache.get(token)
        if hit is not None:
            team, iat = hit
            self.cache_hits += 1
        else:
            team, iat = self._verify(token, now)
            self._cache[token] = (team, iat)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        if now - iat > TOKEN_LIFETIME:
            raise Rejected(403, "ExpiredProviderToken")
        return team

    def _verify(self, token: bytes, now: float):
        try:
            header_b64, claims_b64, sig_b64 = token.decode("ascii").split(".")
            header = json.loads(unb64url(header_b64))
            claims = json.loads(unb64url(claims_b64))
            sig = unb64url(sig_b64)
            alg, kid = header["alg"], header["kid"]
            iss, iat = claims["iss"], claims["iat"]
            if not isinstance(iat, int) or isinstance(iat, bool):
                raise TypeError("iat is not an integer")
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, binascii.Error):
            raise Rejected(403, "InvalidProviderToken") from None
        if kid not in self._public:
            # A key registered a moment ago (pushctl keys add) must work at once: look again.
            self._reload(force=True)
        if alg != "ES256" or len(sig) != 64 or kid not in self._public:
            raise Rejected(403, "InvalidProviderToken")
        team, public = self._public[kid]
        if iss != team:
            raise Rejected(403, "InvalidProviderToken")
        der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
        try:
            public.verify(der, f"{header_b64}.{claims_b64}".encode("ascii"), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise Rejected(403, "InvalidProviderToken") from None
        if iat - now > FUTURE_SKEW:
            raise Rejected(403, "InvalidProviderToken")
        self.verified += 1
        return team, iat

    def allowed(self, team, topic: str) -> bool:
        """A team may push to its topics and their APNs suffixes (.voip, .complication, ...)."""
        if team is None:
            return True
        return any(topic == t or topic.startswith(t + ".") for t in self._teams.get(team, ()))
