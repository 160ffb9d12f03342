from pathlib import Path

from twisted.python import usage
from twisted.trial import unittest

from pushd.device import tap as device_tap
from pushd.gateway import tap as gateway_tap

ROOT = Path(__file__).resolve().parent.parent


class ConfigTests(unittest.TestCase):
    def conf(self, text):
        p = Path(self.mktemp())
        p.write_text(text)
        return str(p)

    def parse(self, argv, options=gateway_tap.Options):
        o = options()
        o.parseOptions(argv)
        return o

    def test_shipped_examples_parse(self):
        g = self.parse(["--config", str(ROOT / "etc/pushd/gateway.conf")])
        self.assertEqual(g["courier"], ["tls:5223", "tls:443"])
        d = self.parse(["--config", str(ROOT / "etc/pushd/device.conf")], device_tap.Options)
        self.assertEqual(d["transport"], ["tls:push.example.org:5223", "tls:push.example.org:443"])

    def test_command_line_wins(self):
        c = self.conf("[gateway]\nkeepalive = 30\ncourier = tls:1\n")
        o = self.parse(["--config", c, "--keepalive", "10", "--courier", "tls:2"])
        self.assertEqual((o["keepalive"], o["courier"]), (10, ["tls:2"]))

    def test_defaults_without_config(self):
        o = self.parse([])
        self.assertEqual((o["courier"], o["provider"]), (["tls:5223"], ["tls:2197"]))

    def test_errors_are_clear(self):
        cases = {
            "[gateway]\nkeepalive = soon\n": "keepalive = 'soon'",
            "[gateway]\nkeepalive = -1\n": "must be positive",
            "[gateway]\nshoe-size = 9\n": "unknown setting 'shoe-size'",
            "[device]\nstate-dir = x\n": "no [gateway] section",
            "keepalive = 1\n": "not valid INI",
        }
        for text, message in cases.items():
            with self.assertRaises(usage.UsageError) as e:
                self.parse(["--config", self.conf(text)])
            self.assertIn(message, str(e.exception))
        with self.assertRaisesRegex(usage.UsageError, "cannot read config"):
            self.parse(["--config", "/nonexistent/pushd.conf"])

    def test_flags_in_config(self):
        self.assertEqual(self.parse([])["access-log"], 0)
        self.assertEqual(self.parse(["--config", self.conf("[gateway]\naccess-log = yes\n")])["access-log"], 1)
        self.assertEqual(self.parse(["--config", self.conf("[gateway]\naccess-log = off\n")])["access-log"], 0)
        self.assertEqual(self.parse(["--access-log", "--config", self.conf("[gateway]\naccess-log = no\n")])["access-log"], 1)
        with self.assertRaisesRegex(usage.UsageError, "access-log = 'maybe': not yes/no"):
            self.parse(["--config", self.conf("[gateway]\naccess-log = maybe\n")])

    def test_bad_cli_values(self):
        self.assertRaises(usage.UsageError, self.parse, ["--window", "0"])
        self.assertRaises(usage.UsageError, self.parse, ["--key-type", "dsa"], device_tap.Options)
        self.assertRaises(usage.UsageError, self.parse, ["--socket", "/" + "x" * 200], device_tap.Options)


class MakeServiceTests(unittest.TestCase):
    def test_gateway_composes_listeners(self):
        o = gateway_tap.Options()
        o.parseOptions(["--state-dir", self.mktemp(), "--courier", "tls:0", "--courier", "tcp:0",
                        "--provider", "tls:0"])
        svc = gateway_tap.makeService(o)
        names = [type(s).__name__ for s in svc]
        self.assertEqual(names.count("StreamServerEndpointService"), 3)

    def test_bad_listener(self):
        o = gateway_tap.Options()
        o.parseOptions(["--state-dir", self.mktemp(), "--courier", "bogus:1"])
        with self.assertRaisesRegex(usage.UsageError, "bad listener 'bogus:1'"):
            gateway_tap.makeService(o)

    def test_device_without_identity_or_secret(self):
        o = device_tap.Options()
        o.parseOptions(["--state-dir", self.mktemp()])
        with self.assertRaisesRegex(usage.UsageError, "--enrol-secret"):
            device_tap.makeService(o)

    def test_device_enrolment_unreachable(self):
        o = device_tap.Options()
        o.parseOptions(["--state-dir", self.mktemp(), "--enrol-secret", "s", "--enrol-url", "https://127.0.0.1:1"])
        with self.assertRaisesRegex(usage.UsageError, "enrolment failed: cannot reach the gateway"):
            device_tap.makeService(o)
