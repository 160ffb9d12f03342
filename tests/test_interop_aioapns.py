"""aioapns 4.0, an unmodified third-party APNs provider library, against a real gateway."""

import json
import shutil
import sys

from twisted.internet import defer, utils
from twisted.trial import unittest

from pushd.gateway.auth import make_jwt
from pushd.tls import load_key

from . import procs
from .stack import TOPIC, Stack


class AioapnsTests(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_aioapns_and_curl_token_auth_reach_the_app(self):
        s = Stack(self)
        yield s.start_gateway()
        key = yield s.provider_key()
        yield s.start_device()
        app = s.listen(2)
        token = (yield app.wait_for(r"^token ([0-9a-f]{64})$")).group(1)

        client = procs.spawn("aioapns", [
            sys.executable, "-m", "tests.interop.aioapns_client", str(s.provider_port),
            str(s.gw_state / "ca.pem"), str(key), "KEY1", "TEAM1", TOPIC, token], procs.ROOT)
        self.addCleanup(client.stop)
        code = yield client.ended
        results = [json.loads(line[len("result "):]) for line in client.lines if line.startswith("result ")]
        self.assertEqual(code, 0, "\n".join(client.lines) + s.gateway.log())
        self.assertEqual([(r["ok"], r["status"]) for r in results], [(True, "200"), (False, "400")], results)
        self.assertEqual(results[1]["description"], "BadDeviceToken")
        yield app.wait_for(r'^\{"aps": \{"alert": "from aioapns"\}\}$')

        # The same with curl over HTTP/2 (ALPN), the JWT made from the same .p8 key.
        jwt = make_jwt(load_key(key.read_bytes()), "KEY1", "TEAM1")
        out, err, code = yield utils.getProcessOutputAndValue(shutil.which("curl"), [
            "-sS", "--http2", "--cacert", str(s.gw_state / "ca.pem"), "-w", "%{http_version} %{http_code}",
            "-H", f"authorization: bearer {jwt}", "-H", f"apns-topic: {TOPIC}",
            "-d", '{"aps":{"alert":"from curl"}}', f"https://localhost:{s.provider_port}/3/device/{token}"])
        self.assertEqual((code, out), (0, b"2 200"), err)
        yield app.wait_for(r'^\{"aps":\{"alert":"from curl"\}\}$')
        self.assertEqual((yield app.ended), 0)
