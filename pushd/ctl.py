"""
``pushctl``: send a notification, read a device's status, listen as an app.
"""

from __future__ import annotations

import datetime
import http.client
import json
import ssl
import sys
import time
from pathlib import Path

from twisted.python import usage


class SendOptions(usage.Options):
    synopsis = "TOKEN TOPIC JSON"
    optParameters = [
        ["gateway", "g", "localhost:2197", "Provider API host:port."],
        ["state-dir", "d", "var/gateway", "Gateway state dir (provider key and CA are read from it)."],
        ["key-file", None, None, "Provider key file [default: STATE-DIR/provider.key]."],
        ["ca", None, None, "CA certificate to trust [default: STATE-DIR/ca.pem]."],
        ["expiration", None, None, "apns-expiration (UNIX time; 0 = now or never)."],
        ["priority", None, None, "apns-priority (10, 5 or 1)."],
        ["collapse-id", None, None, "apns-collapse-id."],
        ["push-type", None, "alert", "apns-push-type."],
        ["auth-key", None, None, "Sign a JWT with this .p8 key (with --key-id and --team) instead of the static key."],
        ["key-id", None, None, "The JWT's kid."],
        ["team", None, None, "The JWT's iss (team id)."],
        ["count", "n", 1, "Send this many (then report rate and latency percentiles).", int],
        ["concurrency", "c", 1, "Connections sending at once, with --count.", int],
    ]

    def parseArgs(self, token, topic, payload):
        self["token"], self["topic"], self["payload"] = token, topic, payload

    def postOptions(self):
        if self["auth-key"] and not (self["key-id"] and self["team"]):
            raise usage.UsageError("--auth-key needs --key-id and --team")
        if self["count"] < 1 or not 1 <= self["concurrency"] <= 1000:
            raise usage.UsageError("--count must be >= 1 and --concurrency 1 to 1000")


class _KeyOptions(usage.Options):
    optParameters = [
        ["state-dir", "d", "var/gateway", "The gateway's state dir (providers.json is there)."],
        ["team", None, None, "Team id (the JWT's iss)."],
        ["key-id", None, None, "Key id (the JWT's kid)."],
    ]

    def __init__(self):
        super().__init__()
        self["topics"] = []

    def opt_topic(self, topic):
        """A topic the team may push to (and its .voip, .complication... suffixes). Repeatable."""
        self["topics"].append(topic)

    def postOptions(self):
        if not (self["team"] and self["key-id"]):
            raise usage.UsageError("--team and --key-id are required")


class KeysNewOptions(_KeyOptions):
    optParameters = [["out", "o", None, "Where to write the private key [default: AuthKey_KEYID.p8]."]]


class KeysAddOptions(_KeyOptions):
    optParameters = [["public-key", None, None, "The provider's public key (PEM)."]]

    def postOptions(self):
        super().postOptions()
        if not self["public-key"]:
            raise usage.UsageError("--public-key is required")


class KeysOptions(usage.Options):
    subCommands = [
        ["new", None, KeysNewOptions, "Make a provider key (.p8, ES256) and register its public half."],
        ["add", None, KeysAddOptions, "Register a provider's public key for a team."],
    ]

    def postOptions(self):
        if self.subCommand is None:
            raise usage.UsageError("keys new or keys add")


class StatusOptions(usage.Options):
    optFlags = [["json", "j", "Print the report as JSON."]]
    optParameters = [["socket", "s", "var/device/pushd.sock", "The device daemon's socket."]]


class ReconnectOptions(usage.Options):
    optParameters = [["socket", "s", "var/device/pushd.sock", "The device daemon's socket."]]


class UnregisterOptions(usage.Options):
    synopsis = "TOPIC"
    optParameters = [["socket", "s", "var/device/pushd.sock", "The device daemon's socket."]]

    def parseArgs(self, topic):
        self["topic"] = topic


class ListenOptions(usage.Options):
    synopsis = "TOPIC"
    optParameters = [
        ["socket", "s", "var/device/pushd.sock", "The device daemon's socket."],
        ["count", "n", None, "Exit after this many notifications.", int],
    ]

    def parseArgs(self, topic):
        self["topic"] = topic


# --- device lifecycle: pushctl device list|revoke, pushctl enrol-secret rotate ---


class DeviceListOptions(usage.Options):
    optFlags = [["json", "j", "Print JSON."]]
    optParameters = [
        ["state-dir", "d", "var/gateway", "The gateway's state dir (devices.sqlite3 is there)."],
        ["limit", "n", 1000, "Print at most this many certificates, newest first.", int],
    ]


class DeviceRevokeOptions(usage.Options):
    synopsis = "DEVICE-ID"
    optParameters = [["state-dir", "d", "var/gateway", "The gateway's state dir (devices.sqlite3 is there)."]]

    def parseArgs(self, device_id):
        import re

        if not re.fullmatch(r"[0-9a-f]{32}", device_id):
            raise usage.UsageError(f"{device_id!r} is not a device id (32 lower-case hex characters)")
        self["device-id"] = device_id


class DeviceOptions(usage.Options):
    subCommands = [
        ["list", None, DeviceListOptions, "The device certificates the gateway issued."],
        ["revoke", None, DeviceRevokeOptions, "Revoke a device: its session closes, Connect and pushes are refused."],
    ]

    def postOptions(self):
        if self.subCommand is None:
            raise usage.UsageError("device list or device revoke ID")


class EnrolSecretRotateOptions(usage.Options):
    optParameters = [
        ["state-dir", "d", "var/gateway", "The gateway's state dir (enrol.secret is there)."],
        ["grace", None, 0.0, "Seconds the old secret stays accepted [default: 0, not at all].", float],
    ]

    def postOptions(self):
        if self["grace"] < 0:
            raise usage.UsageError("--grace must not be negative")


class EnrolSecretOptions(usage.Options):
    subCommands = [["rotate", None, EnrolSecretRotateOptions, "Make a new enrolment secret."]]

    def postOptions(self):
        if self.subCommand is None:
            raise usage.UsageError("enrol-secret rotate")


def _registry(state_dir):
    from pushd.gateway.registry import DeviceRegistry

    path = Path(state_dir) / "devices.sqlite3"
    if not path.exists():
        raise FileNotFoundError(f"no device registry at {path} (has the gateway run with --state-dir {state_dir}?)")
    return DeviceRegistry(path)


def _utc(t):
    if t is None:
        return "-"
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def device(o) -> int:
    from pushd.gateway.registry import RegistryError

    sub = o.subOptions
    try:
        registry = _registry(sub["state-dir"])
    except (FileNotFoundError, RegistryError) as e:
        print(f"pushctl: {e}", file=sys.stderr)
        return 2
    if o.subCommand == "list":
        rows = registry.certificates(sub["limit"])
        if sub["json"]:
            print(json.dumps(rows, indent=1))
            return 0
        print(f"{'device id':<33}{'serial':<18}{'issued':<22}{'not after':<22}{'revoked':<22}via")
        for r in rows:
            state = _utc(r["revoked_at"]) if r["revoked_at"] is not None else (
                f"replaced {_utc(r['retired_until'])}" if r["retired_until"] is not None else "-")
            print(f"{r['device_id']:<33}{r['serial'][:16]:<18}{_utc(r['issued_at']):<22}"
                  f"{_utc(r['not_after']):<22}{state:<22}{r['via']}")
        return 0
    device_id = sub["device-id"]
    known = registry.device_known(device_id)
    if not registry.revoke(device_id, time.time()):
        print(f"device {device_id} was already revoked")
        return 0
    print(f"device {device_id} revoked" + ("" if known else
          " (no certificate of it is in the registry; any it presents is refused)"))
    return 0


def enrol_secret(o) -> int:
    from pushd.gateway.enrol import rotate_secret

    sub = o.subOptions
    try:
        rotate_secret(Path(sub["state-dir"]), sub["grace"], time.time())
    except OSError as e:
        print(f"pushctl: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    where = Path(sub["state-dir"]) / "enrol.secret"
    if sub["grace"] > 0:
        print(f"new enrolment secret in {where}; the old one is accepted for {sub['grace']:g} s more")
    else:
        print(f"new enrolment secret in {where}; the old one is no longer accepted")
    return 0


class Options(usage.Options):
    synopsis = "pushctl COMMAND [options]"
    subCommands = [
        ["send", None, SendOptions, "Send one notification through the provider API."],
        ["status", None, StatusOptions, "Print the device daemon's status report."],
        ["listen", None, ListenOptions, "Register a topic as an app; print its token and every push."],
        ["keys", None, KeysOptions, "Provider keys for token (JWT) authentication."],
        ["reconnect", None, ReconnectOptions, "Tell the device daemon the network changed: reconnect now."],
        ["unregister", None, UnregisterOptions, "Unregister an app's topic: its token answers 410 from now on."],
        ["device", None, DeviceOptions, "Issued device certificates: list, revoke (run on the gateway host)."],
        ["enrol-secret", None, EnrolSecretOptions, "Rotate the gateway's enrolment secret."],
    ]

    def postOptions(self):
        if self.subCommand is None:
            raise usage.UsageError("give a command: " + ", ".join(c[0] for c in self.subCommands))


def send(o) -> int:
    state = Path(o["state-dir"])
    key_file = Path(o["key-file"] or state / "provider.key")
    ca = Path(o["ca"] or state / "ca.pem")
    try:
        if o["auth-key"]:
            from pushd.gateway.auth import make_jwt
            from pushd.tls import load_key

            key = make_jwt(load_key(Path(o["auth-key"]).read_bytes()), o["key-id"], o["team"])
        else:
            key = key_file.read_text().strip()
    except OSError as e:
        print(f"pushctl: cannot read provider key {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"pushctl: {o['auth-key']} is not a PEM private key: {e}", file=sys.stderr)
        return 2
    ctx = ssl.create_default_context(cafile=str(ca)) if ca.exists() else ssl.create_default_context()
    host, _, port = o["gateway"].rpartition(":")
    if not host:
        host, port = o["gateway"], "2197"
    headers = {
        "authorization": f"bearer {key}",
        "apns-topic": o["topic"],
        "apns-push-type": o["push-type"],
        "content-type": "application/json",
    }
    for opt, header in (("expiration", "apns-expiration"), ("priority", "apns-priority"), ("collapse-id", "apns-collapse-id")):
        if o[opt] is not None:
            headers[header] = o[opt]
    path = f"/3/device/{o['token']}"
    body = o["payload"].encode()
    if o["count"] > 1:
        return _load(o, host.strip("[]"), int(port), ctx, path, body, headers)
    conn = http.client.HTTPSConnection(host.strip("[]"), int(port), context=ctx, timeout=30)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        answer = resp.read()
    except (OSError, http.client.HTTPException) as e:
        print(f"pushctl: {o['gateway']}: {e}", file=sys.stderr)
        return 2
    apns_id = resp.getheader("apns-id")
    print(f"{resp.status} apns-id: {apns_id}" + (f" {answer.decode(errors='replace')}" if answer else ""))
    return 0 if resp.status == 200 else 1


def _load(o, host, port, ctx, path, body, headers) -> int:
    """--count N --concurrency C: N requests over C keep-alive connections (HTTP/1.1)."""
    import collections
    import threading

    lock = threading.Lock()
    todo = [o["count"]]
    latencies, statuses = [], collections.Counter()

    def worker():
        conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=30)
        while True:
            with lock:
                if todo[0] == 0:
                    break
                todo[0] -= 1
            t = time.perf_counter()
            try:
                conn.request("POST", path, body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException) as e:
                status = type(e).__name__
                conn.close()
                conn = http.client.HTTPSConnection(host, port, context=ctx, timeout=30)
            with lock:
                latencies.append(time.perf_counter() - t)
                statuses[status] += 1
        conn.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(o["concurrency"])]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(p):
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000

    print(f"{len(latencies)} requests in {elapsed:.2f} s: {len(latencies) / elapsed:.0f}/s "
          f"over {o['concurrency']} connections")
    print(f"latency ms: p50 {pct(50):.1f}  p90 {pct(90):.1f}  p99 {pct(99):.1f}  max {latencies[-1] * 1000:.1f}")
    print("statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items(), key=str)))
    return 0 if set(statuses) == {200} else 1


def _when(t):
    if t is None:
        return "never"
    stamp = datetime.datetime.fromtimestamp(t).strftime("%b %-d, %Y at %-I:%M:%S %p")
    return f"{stamp} ({time.time() - t:.2f} seconds ago)"


TIME_KEYS = {
    "startup time", "status counters last reset", "connection time", "last connection attempt",
    "last keepalive request time", "last keepalive response time", "persistent connection created",
}


def format_report(report: dict) -> str:
    """Lay the report out as ``apsctl status`` does: nested, values in one column."""
    lines = []

    def put(key, value, indent=0):
        if key in TIME_KEYS:
            value = _when(value)
        elif isinstance(value, bool):
            value = "Yes" if value else "No"
        elif value is None:
            value = "-"
        label = " " * indent + key + ":"
        lines.append(f"{label:<46}{value}")

    for key in ("daemon status", "startup time", "status counters last reset", "certificate status",
                "device id", "base token"):
        put(key, report.get(key))
    lines.append("")
    put("connection environment", report.get("connection environment"))
    c = report.get("courier", {})
    put("courier status", c.get("courier status"), 3)
    for key in ("enabled", "stream connected", "connected to service"):
        put(key, c.get(key), 6)
    if c.get("stream connected"):
        for key in ("connected to server hostname", "connected to server port", "connection time",
                    "successful connections"):
            put(key, c.get(key), 9)
    else:
        for key in ("consecutive connection failures", "last connection attempt", "successful connections"):
            put(key, c.get(key), 9)
    for key in ("last keepalive request time", "last keepalive response time", "keepalive interval",
                "notifications received", "duplicates dropped"):
        put(key, c.get(key), 6)
    for app in report.get("apps", []):
        put("application port name", app.get("application port name"), 3)
        for key in ("process", "persistent connection status", "persistent connection created", "token",
                    "pushes held for the app"):
            put(key, app.get(key), 6)
    return "\n".join(lines)


def _with_daemon(socket_path, work):
    """Run ``work(reactor, client)`` against the device daemon's socket; the exit code."""
    from twisted.internet import task

    from pushd.device import client

    if not Path(socket_path).exists():
        print(f"pushctl: no device daemon socket at {socket_path}", file=sys.stderr)
        return 2

    def main(reactor):
        d = client.connect(reactor, socket_path)
        d.addCallback(lambda c: work(reactor, c))
        return d

    try:
        task.react(main)
    except SystemExit as e:
        return e.code or 0
    return 0


def status(o) -> int:
    def work(reactor, c):
        def show(report):
            print(json.dumps(report, indent=2) if o["json"] else format_report(report))

        return c.status().addCallback(show)

    return _with_daemon(o["socket"], work)


def listen(o) -> int:
    """Be an app: register, print the token on stderr and each payload on stdout."""

    def work(reactor, c):
        seen = [0]

        def on_push(topic, payload, message_id):
            sys.stdout.write(payload.decode("utf-8", "replace") + "\n")
            sys.stdout.flush()
            seen[0] += 1
            if o["count"] and seen[0] == o["count"]:
                # After this Deliver's answer is written: closing flushes it.
                reactor.callLater(0, c.transport.loseConnection)

        c.on_push = on_push

        def got(token):
            print(f"token {token.hex()}", file=sys.stderr, flush=True)
            return c.closed

        return c.register(o["topic"]).addCallback(got)

    return _with_daemon(o["socket"], work)


def reconnect(o) -> int:
    return _with_daemon(o["socket"], lambda reactor, c: c.reconnect())


def unregister(o) -> int:
    result = []

    def work(reactor, c):
        return c.unregister(o["topic"]).addCallback(result.append)

    code = _with_daemon(o["socket"], work)
    if code == 0 and not result[0]:
        print(f"pushctl: {o['topic']} was not registered", file=sys.stderr)
        return 1
    return code


def keys(o) -> int:
    from pushd import tls
    from pushd.gateway.auth import ProviderKeys

    sub = o.subOptions
    path = Path(sub["state-dir"]) / "providers.json"
    try:
        registry = ProviderKeys.load(path)
        if o.subCommand == "new":
            key = tls.new_key("ec")
            out = Path(sub["out"] or f"AuthKey_{sub['key-id']}.p8")
            tls.write_private(out, tls.key_pem(key))
            from cryptography.hazmat.primitives import serialization

            public = key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            print(f"private key written to {out}")
        else:
            public = Path(sub["public-key"]).read_bytes()
        registry.add_key(sub["key-id"], sub["team"], public, sub["topics"])
        registry.save(path)
    except OSError as e:
        print(f"pushctl: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"pushctl: {e}", file=sys.stderr)
        return 2
    topics = registry.teams[sub["team"]]["topics"]
    print(f"key {sub['key-id']} of team {sub['team']} registered in {path}; topics: {', '.join(topics) or 'none yet'}")
    return 0


def main(argv=None) -> int:
    o = Options()
    try:
        o.parseOptions(argv if argv is not None else sys.argv[1:])
    except usage.UsageError as e:
        print(f"pushctl: {e}\n{o}", file=sys.stderr)
        return 2
    if o.subCommand == "keys":
        return keys(o.subOptions)
    if o.subCommand == "device":
        return device(o.subOptions)
    if o.subCommand == "enrol-secret":
        return enrol_secret(o.subOptions)
    return {"send": send, "status": status, "listen": listen, "reconnect": reconnect,
            "unregister": unregister}[o.subCommand](o.subOptions)


if __name__ == "__main__":
    sys.exit(main())
