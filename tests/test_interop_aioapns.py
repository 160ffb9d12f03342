"""aioapns 4.0, an unmodified third-party APNs provider library, against a real gateway."""

import json
import sys

from twisted.internet import defer
from twisted.trial import unittest

from . import procs
from .stack import TOPIC, Stack


class AioapnsTests(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_aioapns_token_auth_reaches_the_app(self):
        s = Stack(self)
        yield s.start_gateway()
        key = s.dir / "AuthKey_KEY1.p8"
        out, err, code = yield procs.run(procs.PUSHCTL + [
            "keys", "new", "-d", str(s.gw_state), "--team", "TEAM1", "--key-id", "KEY1",
            "--topic", TOPIC, "--out", str(key)], s.dir)
        self.assertEqual(code, 0, err)
        yield s.start_device()
        app = s.listen(1)
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
