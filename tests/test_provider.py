"""The provider API over real HTTPS on loopback: HTTP/1.1 with twisted's Agent, HTTP/2 with curl."""

from __future__ import annotations

import json
import shutil
import uuid
from io import BytesIO
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, endpoints, reactor, ssl, threads, utils
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from pushd import tls, wire
from pushd.gateway.auth import Authenticator, ProviderKeys
from pushd.gateway.enrol import Enrolment
from pushd.gateway.provider import make_site
from pushd.gateway.router import Router
from pushd.gateway.tokens import TokenMinter
from pushd.store.interfaces import StoreUnavailable
from pushd.store.memory import MemoryStore

TOPIC = "com.example.app"
DEVICE = "00112233445566778899aabbccddeeff"


class ServerMixin:
    """A provider site with enrolment, on a real TLS port."""

    @defer.inlineCallbacks
    def setUp(self):
        self.pki = tls.load_or_create_pki(Path(self.mktemp()), ["localhost", "127.0.0.1"])
        self.store = MemoryStore()
        self.tokens = TokenMinter(b"k")
        self.router = Router(self.store, self.tokens)
        keys_path = Path(self.mktemp())
        self.jwt_key = tls.new_key("ec")
        keys = ProviderKeys()
        public = self.jwt_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        keys.add_key("KEY1", "TEAM1", public, [TOPIC])
        keys.add_key("KEY2", "TEAM2", public, ["com.example.other"])
        keys.save(keys_path)
        self.auth = Authenticator(keys_path, [self.pki.provider_key])
        self.site = make_site(self.router, self.auth, Enrolment(self.pki))
        factory = TLSMemoryBIOFactory(self.pki.server_options(tls.PROVIDER_ALPN), False, self.site)
        self.port = yield endpoints.serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
        self.addCleanup(self.port.stopListening)
        self.url = f"https://localhost:{self.port.getHost().port}"
        self.ca_pem = tls.cert_pem(self.pki.ca_cert)
        policy = BrowserLikePolicyForHTTPS(trustRoot=ssl.Certificate.loadPEM(self.ca_pem))
        self.agent = Agent(reactor, contextFactory=policy)
        self.token = self.tokens.scoped_token(DEVICE, wire.topic_hash(TOPIC)).hex()


class ProviderTests(ServerMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def request(self, path=None, body=b'{"aps":{"alert":"hi"}}', method=b"POST", auth=True, **headers):
        h = {"apns-topic": TOPIC}
        if auth:
            h["authorization"] = f"bearer {self.pki.provider_key}"
        h.update({k.replace("_", "-"): v for k, v in headers.items()})
        h = {k: v for k, v in h.items() if v is not None}
        path = path or f"/3/device/{self.token}"
        producer = FileBodyProducer(BytesIO(body)) if body is not None else None
        resp = yield self.agent.request(
            method, (self.url + path).encode(), Headers({k: [v] for k, v in h.items()}), producer
        )
        data = yield readBody(resp)
        apns_id = resp.headers.getRawHeaders(b"apns-id", [b""])[0].decode()
        reason = json.loads(data)["reason"] if data else None
        return resp.code, reason, apns_id

    @defer.inlineCallbacks
    def assertReason(self, status, reason, **kw):
        code, got, apns_id = yield self.request(**kw)
        self.assertEqual((code, got), (status, reason))
        uuid.UUID(apns_id)

    @defer.inlineCallbacks
    def test_accepted_and_stored(self):
        sent_id = str(uuid.uuid4())
        code, reason, apns_id = yield self.request(apns_id=sent_id, apns_collapse_id="c", apns_priority="5")
        self.assertEqual((code, reason, apns_id), (200, None, sent_id))
        (m,) = self.successResultOf(self.store.pending(DEVICE, {wire.topic_hash(TOPIC)}, 10, 0))
        self.assertEqual((m.payload, m.message_id, m.priority, m.collapse_id),
                         (b'{"aps":{"alert":"hi"}}', uuid.UUID(sent_id).bytes, 5, "c"))
        self.assertGreater(m.expiry, self.router.now(), "no apns-expiration: stored for a while")

    def test_missing_provider_token(self):
        return self.assertReason(403, "MissingProviderToken", auth=False)

    def test_invalid_provider_token(self):
        return self.assertReason(403, "InvalidProviderToken", auth=False, authorization="bearer nope")

    def test_bad_device_token_not_hex(self):
        return self.assertReason(400, "BadDeviceToken", path="/3/device/xyz")

    def test_bad_device_token_unknown(self):
        return self.assertReason(400, "BadDeviceToken", path="/3/device/" + "00" * 32)

    def test_token_not_for_topic(self):
        return self.assertReason(400, "DeviceTokenNotForTopic", apns_topic="com.example.other")

    def test_missing_topic(self):
        return self.assertReason(400, "MissingTopic", apns_topic=None)

    def test_payload_too_large(self):
        return self.assertReason(413, "PayloadTooLarge", body=b'{"a":"' + b"x" * 4090 + b'"}')

    @defer.inlineCallbacks
    def test_voip_allows_5120(self):
        voip = TOPIC + ".voip"  # APNs: a voip push goes to the bundle id + .voip
        token = self.tokens.scoped_token(DEVICE, wire.topic_hash(voip)).hex()
        code, reason, _ = yield self.request(path=f"/3/device/{token}", body=b'{"a":"' + b"x" * 5000 + b'"}',
                                             apns_push_type="voip", apns_topic=voip)
        self.assertEqual(code, 200, reason)

    def test_huge_body_is_not_buffered(self):
        return self.assertReason(413, "PayloadTooLarge", body=b"x" * (1024 * 1024))

    def test_payload_empty(self):
        return self.assertReason(400, "PayloadEmpty", body=b"")

    def test_payload_not_json(self):
        return self.assertReason(400, "BadPayload", body=b"{nope")

    def test_bad_expiration(self):
        return self.assertReason(400, "BadExpirationDate", apns_expiration="soon")

    def test_bad_priority(self):
        return self.assertReason(400, "BadPriority", apns_priority="7")

    def test_bad_collapse_id(self):
        return self.assertReason(400, "BadCollapseId", apns_collapse_id="c" * 65)

    def test_bad_message_id(self):
        return self.assertReason(400, "BadMessageId", apns_id="not-a-uuid")

    def test_bad_push_type(self):
        return self.assertReason(400, "InvalidPushType", apns_push_type="shout")

    @defer.inlineCallbacks
    def test_unregistered_with_timestamp(self):
        yield self.store.invalidate(bytes.fromhex(self.token), 1_700_000_000.5)
        code, reason, _ = yield self.request()
        self.assertEqual((code, reason), (410, "Unregistered"))
        resp = yield self.agent.request(b"POST", f"{self.url}/3/device/{self.token}".encode(), Headers({
            "authorization": [f"bearer {self.pki.provider_key}"], "apns-topic": [TOPIC]}),
            FileBodyProducer(BytesIO(b"{}")))
        body = json.loads((yield readBody(resp)))
        self.assertEqual(body, {"reason": "Unregistered", "timestamp": 1_700_000_000_500})

    @defer.inlineCallbacks
    def test_store_down_is_503(self):
        def down(message):
            return defer.fail(StoreUnavailable("down for the test"))

        self.store.enqueue = down
        code, reason, _ = yield self.request()
        self.assertEqual((code, reason), (503, "ServiceUnavailable"))

    @defer.inlineCallbacks
    def test_duplicate_headers(self):
        resp = yield self.agent.request(b"POST", f"{self.url}/3/device/{self.token}".encode(), Headers({
            "authorization": [f"bearer {self.pki.provider_key}"], "apns-topic": [TOPIC, TOPIC]}),
            FileBodyProducer(BytesIO(b"{}")))
        body = yield readBody(resp)
        self.assertEqual((resp.code, body and json.loads(body)["reason"]), (400, "DuplicateHeaders"))

    def test_topic_disallowed_is_400(self):
        from pushd.gateway.auth import make_jwt

        jwt = make_jwt(self.jwt_key, "KEY2", "TEAM2")
        return self.assertReason(400, "TopicDisallowed", auth=False, authorization=f"bearer {jwt}")

    def test_method_not_allowed(self):
        return self.assertReason(405, "MethodNotAllowed", method=b"GET", body=None)

    def test_bad_path(self):
        return self.assertReason(404, "BadPath", path="/4/device/" + self.token)

    @defer.inlineCallbacks
    def test_http2_with_curl(self):
        curl = shutil.which("curl")
        self.assertIsNotNone(curl, "curl is not installed (.ci/run installs it)")
        ca = Path(self.mktemp())
        ca.write_bytes(self.ca_pem)
        out, err, code = yield utils.getProcessOutputAndValue(curl, [
            "-sS", "--http2", "--cacert", str(ca), "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
            "-H", f"authorization: bearer {self.pki.provider_key}", "-H", f"apns-topic: {TOPIC}",
            "-d", '{"aps":{"alert":"h2"}}', f"{self.url}/3/device/{self.token}",
        ])
        self.assertEqual((code, out), (0, b"2 200"), err)
        (m,) = self.successResultOf(self.store.pending(DEVICE, {wire.topic_hash(TOPIC)}, 10, 0))
        self.assertEqual(m.payload, b'{"aps":{"alert":"h2"}}')


class EnrolTests(ServerMixin, unittest.TestCase):
    def enrol(self, secret):
        from pushd.device.identity import enrol

        return threads.deferToThread(enrol, self.url, secret, Path(self.mktemp()))

    @defer.inlineCallbacks
    def test_enrol_issues_device_certificate(self):
        ident = yield self.enrol(self.pki.enrol_secret)
        ident.cert.verify_directly_issued_by(self.pki.ca_cert)
        self.assertEqual(len(ident.device_id), 32)
        self.assertEqual(ident.ca_pem, self.ca_pem)
        self.assertEqual(x509.load_pem_x509_certificate(ident.ca_pem), self.pki.ca_cert)

    @defer.inlineCallbacks
    def test_wrong_secret_refused(self):
        from pushd.device.identity import EnrolError

        with self.assertRaisesRegex(EnrolError, "403 BadEnrolmentSecret"):
            yield self.enrol(b"wrong")
