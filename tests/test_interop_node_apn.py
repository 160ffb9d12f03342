"""node-apn (@parse/node-apn), an unmodified third-party Node.js APNs provider client, against a real gateway."""

import json
import shutil

from twisted.internet import defer
from twisted.trial import unittest

from . import procs
from .stack import TOPIC, Stack

NODE_DIR = procs.ROOT / "tests" / "interop" / "node"
NODE = shutil.which("node")


class NodeApnTests(unittest.TestCase):
    timeout = 90

    def setUp(self):
        if NODE is None:
            raise unittest.SkipTest("node is not installed (.ci/run installs nodejs and npm from Debian)")
        if not (NODE_DIR / "node_modules" / "@parse" / "node-apn").is_dir():
            self.fail(f"node-apn is not installed: run `npm ci --prefix {NODE_DIR.relative_to(procs.ROOT)}`")

    @defer.inlineCallbacks
    def test_node_apn_token_auth_reaches_the_app_and_reads_errors(self):
        s = Stack(self)
        yield s.start_gateway()
        key = yield s.provider_key()
        yield s.start_device()
        app = s.listen(1)
        token = (yield app.wait_for(r"^token ([0-9a-f]{64})$")).group(1)

        client = procs.spawn("node-apn", [
            NODE, str(NODE_DIR / "send.js"), str(s.provider_port), str(s.gw_state / "ca.pem"),
            str(key), "KEY1", "TEAM1", TOPIC, token], NODE_DIR)
        self.addCleanup(client.stop)
        code = yield client.ended
        self.assertEqual(code, 0, "\n".join(client.lines) + s.gateway.log())
        results = [json.loads(line[len("result "):]) for line in client.lines if line.startswith("result ")]
        self.assertEqual([(r["ok"], r.get("status"), r.get("reason"), r.get("device")) for r in results], [
            (True, 200, None, token),
            (False, 400, "BadDeviceToken", "00" * 32),
            (False, 400, "TopicDisallowed", token),
        ], results)
        # The gateway echoes node-apn's apns-id on success and on error.
        self.assertEqual([r.get("id") for r in results], [
            "4f1e6a2c-9b3d-4c5e-8f70-1a2b3c4d5e6f",
            "4f1e6a2c-9b3d-4c5e-8f70-000000000002",
            "4f1e6a2c-9b3d-4c5e-8f70-000000000003",
        ])
        yield app.wait_for(r'^\{"aps":\{"alert":"from node-apn"\}\}$')
        self.assertEqual((yield app.ended), 0)
