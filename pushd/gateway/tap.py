"""
``twistd pushd-gateway``: the courier listeners, the provider API and the store, composed
as one MultiService.
"""

from __future__ import annotations

import sys
from pathlib import Path

from twisted.application import internet, service
from twisted.logger import Logger
from twisted.python import usage

from pushd import config, tls
from pushd.admission import Admission, fit_fd_limit
from pushd.gateway.heap import FrozenStartup, HeapTrimmer
from pushd.endpoints import BadListener, listener, reuse_port_endpoint, split_tls
from pushd.gateway.auth import Authenticator
from pushd.gateway.cluster import Node, default_node_id
from pushd.gateway.courier import CourierFactory
from pushd.gateway.drain import Drain
from pushd.gateway import hpackfast
from pushd.gateway.enrol import Enrolment, EnrolSecrets
from pushd.gateway.registry import DeviceRegistry, RegistryError
from pushd.gateway.provider import Limits, make_site
from pushd.gateway.provider.limits import H2_INITIAL_WINDOW
from pushd.gateway.replay import DEFAULT_SIZE as DEFAULT_REPLAY_CACHE_SIZE, MemoryReplayCache
from pushd.gateway.replay import DEFAULT_PER_DEVICE as DEFAULT_REPLAY_PER_DEVICE
from pushd.gateway.ratelimit import Buckets
from pushd.gateway.router import Router
from pushd.gateway.workers import Supervisor, refuse_reuse_port_supervisor, refuse_unshared_store, state_lock
from pushd.gateway.tokens import TokenMinter
from pushd.store import check_store, open_bus, open_store
from pushd.store.interfaces import StoreUnavailable

log = Logger()




class Options(config.Options):
    section = "gateway"
    synopsis = "[options]"
    longdesc = "Run the pushd gateway: courier listeners for devices, the provider API for app servers."
    optParameters = [
        ["state-dir", "d", "var/gateway", "Directory for the CA, keys and secrets (created on first start)."],
        ["keepalive", None, 300, "Longest keepalive interval (s) devices may use (told to pushd devices).", config.positive(int)],
        ["grace", None, 2.0, "A connection silent for keepalive x grace seconds is closed.", config.positive(float)],
        ["store", None, "sqlite", "Where accepted notifications wait: sqlite, sqlite:PATH, redis://HOST:PORT/DB, "
         "redis-sentinel://HOST:PORT,HOST:PORT/MASTER/DB or memory."],
        # Redis store: durability across a Sentinel failover (docs/cluster-redis.md).
        ["redis-wait", None, 0, "With a Redis store: replicas that must have an accepted push before it is "
         "answered 200 (Redis WAIT); fewer within half the store timeout answer 503.",
         config.within("redis-wait", int, 0, 100)],
        ["sqlite-synchronous", None, "full", "SQLite fsync policy: full (survives power loss) or normal (survives a crash)."],
        ["queue-size", None, 1000, "Pending notifications kept per device and topic; the oldest is dropped beyond.", config.positive(int)],
        ["window", None, 64, "Notifications in flight (unacked) per connection.", config.positive(int)],
        ["idle-timeout", None, 60.0, "Close a provider connection idle (or stalled mid-request) this long (s).", config.positive(float)],
        ["token-rate", None, 10.0, "Pushes per second to one device token (429 TooManyRequests beyond).", config.positive(float)],
        ["token-burst", None, 100.0, "Pushes to one device token allowed in a burst.", config.positive(float)],
        ["team-rate", None, 10000.0, "Pushes per second from one team (or the operator key).", config.positive(float)],
        ["team-burst", None, 20000.0, "Pushes from one team allowed in a burst.", config.positive(float)],
        # Connect replay (docs/security.md "Connect replay").
        ["replay-cache-size", None, DEFAULT_REPLAY_CACHE_SIZE, "Nonces of nonce-only (APNs-style) Connects remembered for the 300 s window; when full, such Connects are refused.", config.within("replay-cache-size", int, 1)],
        # Courier before Connect, nonces per device (docs/security.md "Connections and deadlines", "Connect replay").
        ["max-unauthenticated", None, 4096, "Courier connections not yet past Connect, all listeners together; more are "
         "closed at once, so they never fill --max-connections.", config.within("max-unauthenticated", int, 1)],
        ["replay-per-device", None, DEFAULT_REPLAY_PER_DEVICE, "Live nonces of nonce-only Connects one device may hold "
         "in the replay cache; beyond, only that device's nonce-only Connects are refused.",
         config.within("replay-per-device", int, 1)],
        # --- device lifecycle: certificates, renewal, enrolment (docs/security.md) ---
        ["cert-days", None, 365.0, "Lifetime of a device certificate (days); devices renew at about 2/3 of it.", config.positive(float)],
        ["cert-overlap", None, 604800.0, "Seconds a renewed device's previous certificate stays accepted.", config.positive(float)],
        ["enrol-window", None, 300.0, "Seconds an enrolment request's time may be off the gateway's clock.", config.positive(float)],
        ["enrol-nonces", None, 100000, "Enrolment nonces remembered (within 2 x window); beyond, 503.", config.positive(int)],
        ["enrol-rate", None, 1.0, "Enrolment/renewal requests per second from one address (429 beyond).", config.positive(float)],
        ["enrol-burst", None, 20.0, "Enrolment/renewal requests from one address allowed in a burst.", config.positive(float)],
        # --- admission: bounded before authenticated (docs/security.md, "Connections and deadlines")
        ["connect-deadline", None, 10.0, "Seconds from accept to a verified courier Connect, TLS handshake included; reads do not extend it.", config.within("connect-deadline", float, 0.1, 3600)],
        ["connect-budget", None, 8192, "Largest courier frame before Connect, in bytes (a real Connect is 0.5-2 KiB).", config.within("connect-budget", int, 1024, 32768)],
        ["max-connections", None, 18000, "Courier connections in total, all courier listeners together; more are closed at accept.", config.within("max-connections", int, 1)],
        ["max-per-address", None, 64, "Courier connections from one IPv4 address or one IPv6 prefix (--ipv6-prefix).", config.within("max-per-address", int, 1)],
        ["provider-max-connections", None, 1000, "Provider API connections in total, all provider listeners together.", config.within("provider-max-connections", int, 1)],
        ["provider-max-per-address", None, 64, "Provider API connections from one IPv4 address or one IPv6 prefix.", config.within("provider-max-per-address", int, 1)],
        ["connect-rate", None, 20.0, "New connections per second from one address, per role (token bucket).", config.within("connect-rate", float, 0.001)],
        ["connect-burst", None, 40.0, "New connections from one address allowed in a burst, per role.", config.within("connect-burst", float, 1)],
        ["ipv6-prefix", None, 64, "IPv6 sources count per prefix of this length for the per-address limits.", config.within("ipv6-prefix", int, 8, 128)],
        ["max-addresses", None, 16384, "Source addresses with no live connection remembered for their rate bucket, per role.", config.within("max-addresses", int, 1)],
        ["preauth-reads-per-turn", None, 4, "Reads of connections not yet authenticated (TLS handshake, Connect or provider token) handled per reactor turn, per role; the others wait for the next turns (0: no pacing).", config.within("preauth-reads-per-turn", int, 0)],
        # Provider API limits before authentication (docs/security.md, "Provider API limits").
        ["header-deadline", None, 5.0, "Seconds from a provider connection's start (or a request's first byte) "
         "to its complete request headers (HTTP/1.1, or before a valid token: and body); trickling does not "
         "extend it.", config.positive(float)],
        ["h2-max-streams", None, 1000, "HTTP/2 streams at once per connection once a valid provider token "
         "arrived (one before, as APNs).", config.positive(int)],
        ["h2-body-budget", None, 256 * 1024, "Bytes of request bodies not yet dispatched held per HTTP/2 "
         "connection (its flow-control window).", config.within("h2-body-budget", int, H2_INITIAL_WINDOW)],
        ["h2-requests-per-second", None, 10000, "Requests per HTTP/2 connection per second; beyond: GOAWAY "
         "ENHANCE_YOUR_CALM.", config.positive(int)],
        ["h2-resets-per-second", None, 100, "Stream resets (RST_STREAM) per HTTP/2 connection per second; "
         "beyond: GOAWAY ENHANCE_YOUR_CALM.", config.positive(int)],
        ["h2-max-header-bytes", None, 16 * 1024, "Bytes of one HTTP/2 request header block.",
         config.within("h2-max-header-bytes", int, 4096)],
        ["hpack-cache-bytes", None, hpackfast.CACHE_BYTES, "Bytes of decoded HPACK strings remembered "
         "(JWTs), in all.", config.within("hpack-cache-bytes", int, 0)],
        # HTTP/2 floods and slow bodies after authentication (docs/security.md, "Provider API limits").
        ["h2-control-frames-per-second", None, 1000, "Frames without request bytes (PING, SETTINGS, PRIORITY, "
         "WINDOW_UPDATE, RST_STREAM, empty frames, ...) per HTTP/2 connection per second; beyond: GOAWAY "
         "ENHANCE_YOUR_CALM.", config.within("h2-control-frames-per-second", int, 10)],
        ["h2-body-deadline", None, 5.0, "Seconds from an HTTP/2 request's HEADERS to the end of its body; "
         "beyond: 400 IdleTimeout and the stream is reset.", config.positive(float)],
        # Provider connections before a valid token (docs/security.md, "Provider API limits").
        ["auth-deadline", None, 10.0, "Seconds from a provider connection's start to its first valid token; "
         "beyond, it is closed (HTTP/2: GOAWAY). Refused requests do not extend it.",
         config.within("auth-deadline", float, 0.1, 3600)],
        ["unauthenticated-requests", None, 10, "Requests refused on their headers a provider connection without "
         "a valid token may make; then it is closed (HTTP/2: GOAWAY ENHANCE_YOUR_CALM).",
         config.within("unauthenticated-requests", int, 1, 100000)],
        ["auth-verify-rate", None, 5.0, "Provider tokens not seen before verified per second per address "
         "(an ES256 check costs up to 1.1 ms); beyond: 429 TooManyProviderTokenUpdates.",
         config.within("auth-verify-rate", float, 0.001)],
        ["auth-verify-burst", None, 100.0, "Provider tokens not seen before verified from one address in a burst.",
         config.within("auth-verify-burst", float, 1)],
        # --- the cluster: nodes on a shared Redis (docs/cluster.md) ---
        ["node-id", None, "", "This process's node id in the cluster (letters, digits, . _ : -); default: "
         "host name, pid and start time."],
        ["node-heartbeat", None, 3.0, "Seconds between the node's heartbeats (one store write each).",
         config.within("node-heartbeat", float, 0.1, 60)],
        ["node-ttl", None, 9.0, "Seconds a node counts as alive after its last heartbeat; then its devices "
         "count as absent. More than --node-heartbeat.", config.within("node-ttl", float, 0.5, 600)],
        # --- workers: N gateway processes on one host (docs/workers.md) ---
        ["workers", None, 1, "Gateway processes on this host sharing the courier and provider ports "
         "(tcp listeners, SO_REUSEPORT); each is a node with its own limits. More than 1 needs a shared "
         "store (--store redis://HOST:PORT/DB).", config.within("workers", int, 1, 512)],
        ["worker-backoff", None, 30.0, "Longest wait (s) before restarting a worker that keeps dying "
         "(the first restart waits 1 s, doubling).", config.within("worker-backoff", float, 1)],
        ["worker-restarts", None, 10, "Worker restarts allowed within 60 s (all workers); beyond, all are "
         "stopped and the supervisor exits with status 1.", config.within("worker-restarts", int, 1)],
        ["worker-stop-timeout", None, 30.0, "Seconds the supervisor waits for its workers to exit after "
         "SIGTERM (they drain); then SIGKILL.", config.within("worker-stop-timeout", float, 1)],
        # Drain on SIGTERM (docs/protocol.md "Reconnecting (device)").
        ["drain-timeout", None, 5.0, "On SIGTERM, seconds to wait for provider requests under way, device acks "
         "and store writes before exiting.", config.within("drain-timeout", float, 0.1, 600)],
        ["drain-window", None, 2.0, "On SIGTERM, pushd devices are told to reconnect at a random moment within "
         "this many seconds (GoAway), so that they do not all connect at once.",
         config.within("drain-window", float, 0, 60)],
    ]
    optFlags = [
        ["access-log", None, "Log one line per provider request (off: a push service takes thousands a second)."],
        ["legacy-certs", None, "Accept device certificates of this CA missing from the device registry (issued "
                               "before it existed), and record them on first Connect."],
        # --- workers (docs/workers.md) ---
        ["reuse-port", None, "Open tcp listeners with SO_REUSEPORT, so that several gateway processes share "
                             "a port (set in --workers' processes; for pushd-gateway@.service instances)."],
    ]
    multi = {
        "courier": ["tls:5223"],
        "provider": ["tls:2197"],
        "hostname": ["localhost", "127.0.0.1"],
    }

    def parseOptions(self, options=None):
        # Kept for --workers: each worker is started with the same options.
        self.argv = list(sys.argv[1:] if options is None else options)
        super().parseOptions(options)

    def postOptions(self):
        super().postOptions()
        try:  # a bad --store: one line naming the option and the forms, before anything starts
            check_store(self["store"])
        except ValueError as e:
            raise usage.UsageError(str(e))
        refusal = (refuse_unshared_store(self["workers"], self["store"])
                   or refuse_reuse_port_supervisor(self["workers"], self["reuse-port"]))
        if refusal:
            raise usage.UsageError(refusal)

    def opt_courier(self, description):
        """Courier listener (endpoint string; tls: wraps it in pushd TLS). Repeatable. [default: tls:5223]"""
        self["courier"].append(description)

    def opt_provider(self, description):
        """Provider API listener, as --courier. Repeatable. [default: tls:2197]"""
        self["provider"].append(description)

    def opt_hostname(self, name):
        """Name or address on the server certificate. Repeatable. [default: localhost, 127.0.0.1]"""
        self["hostname"].append(name)


def _expire(store, router):
    def done(n):
        if n:
            log.info("purged {n} expired notifications", n=n)

    return store.expire(router.now()).addCallbacks(done, lambda f: log.warn("expiry sweep failed: {why}", why=f.getErrorMessage()))


def _admissions(options, reactor):
    """One Admission per role, shared by its listeners; the caps fitted to the fd limit."""
    caps = fit_fd_limit({"courier": options["max-connections"], "provider": options["provider-max-connections"]})
    common = dict(rate=options["connect-rate"], burst=options["connect-burst"],
                  ipv6_prefix=options["ipv6-prefix"], max_addresses=options["max-addresses"],
                  preauth_reads_per_turn=options["preauth-reads-per-turn"])
    return (
        Admission("courier", reactor, caps["courier"], options["max-per-address"], **common),
        # The courier's factory trims the heap after its bursts; the provider's connections
        # (an HTTP/2 flood's parse buffers) had nothing giving their freed pages back.
        Admission("provider", reactor, caps["provider"], options["provider-max-per-address"],
                  heap=HeapTrimmer(reactor), **common),
    )


def provider_limits(options) -> Limits:
    return Limits(
        header_deadline=options["header-deadline"],
        max_streams=options["h2-max-streams"],
        body_budget=options["h2-body-budget"],
        requests_per_second=options["h2-requests-per-second"],
        resets_per_second=options["h2-resets-per-second"],
        max_header_bytes=options["h2-max-header-bytes"],
        control_frames_per_second=options["h2-control-frames-per-second"],
        body_deadline=options["h2-body-deadline"],
        auth_deadline=options["auth-deadline"],
        unauthenticated_requests=options["unauthenticated-requests"],
    )


def replay_caches(options, store, reactor):
    """
    (Connect replay cache, enrolment nonces). On a Redis store, shared by every node on it
    (pushd.store.redis_replay): a Connect or enrolment replayed to another node is refused
    too, and while Redis does not answer both are refused (fail closed). Else in memory.
    """
    from pushd.store.redis import RedisStore

    if isinstance(store, RedisStore):
        from pushd.store.redis_replay import RedisReplayCache

        return (
            RedisReplayCache(store, "replay", options["replay-cache-size"], options["replay-per-device"], reactor),
            RedisReplayCache(store, "enrol", options["enrol-nonces"], clock=reactor),
        )
    return (
        MemoryReplayCache(options["replay-cache-size"], reactor, options["replay-per-device"]),
        MemoryReplayCache(options["enrol-nonces"], reactor),
    )


def supervisor(options, reactor):
    """
    ``--workers N``: the supervisor. It checks the listeners and creates the state the
    workers share (CA, keys, secrets, the device registry's file) once, so N first starts
    do not race to create them; it opens no store and no port itself.
    """
    for desc in (*options["courier"], *options["provider"]):
        try:
            reuse_port_endpoint(reactor, split_tls(desc)[1])
        except (ValueError, KeyError, TypeError) as e:
            raise usage.UsageError(f"--workers {options['workers']}: bad listener {desc!r}: {e}")
    state = Path(options["state-dir"])
    with state_lock(state):
        tls.load_or_create_pki(state, list(options["hostname"]))
        tls.secret_file(state / "token.secret")
    try:
        DeviceRegistry(state / "devices.sqlite3").close()
    except RegistryError as e:
        raise usage.UsageError(str(e))
    return Supervisor(
        options.argv, options["workers"], reactor, backoff=options["worker-backoff"],
        max_restarts=options["worker-restarts"], stop_timeout=options["worker-stop-timeout"],
    )


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    if options["workers"] > 1:
        return supervisor(options, reactor)
    state = Path(options["state-dir"])
    with state_lock(state):
        pki = tls.load_or_create_pki(state, list(options["hostname"]))
        token_secret = tls.secret_file(state / "token.secret")
    try:
        store = open_store(options["store"], state, options["queue-size"], reactor, options["sqlite-synchronous"],
                           redis_wait=options["redis-wait"])
    except (ValueError, StoreUnavailable) as e:
        raise usage.UsageError(str(e))
    try:
        registry = DeviceRegistry(state / "devices.sqlite3", legacy=bool(options["legacy-certs"]))
    except RegistryError as e:
        raise usage.UsageError(str(e))
    router = Router(store, TokenMinter(token_secret), reactor, registry=registry)
    replay_cache, enrol_nonces = replay_caches(options, store, reactor)

    top = service.MultiService()
    # Started first, so stopped last: the listeners have stopped accepting when it drains.
    drain = Drain(router, store, None, None, reactor, options["drain-timeout"], options["drain-window"])
    drain.setServiceParent(top)
    try:
        node = Node(options["node-id"] or default_node_id(reactor), router, open_bus(store, reactor), reactor,
                    heartbeat=options["node-heartbeat"], ttl=options["node-ttl"])
    except ValueError as e:
        raise usage.UsageError(str(e))
    node.setServiceParent(top)  # after the drain: stopped before it (and the store) closes
    courier = CourierFactory(
        router,
        pki.ca_cert,
        clock=reactor,
        keepalive_interval=options["keepalive"],
        grace=options["grace"],
        window=options["window"],
        replay_cache=replay_cache,
        registry=registry,
        connect_timeout=options["connect-deadline"],
        connect_budget=options["connect-budget"],
        max_unauthenticated=options["max-unauthenticated"],
    )
    courier_admission, provider_admission = _admissions(options, reactor)
    auth = Authenticator(state / "providers.json", [pki.provider_key], reactor)
    enrolment = Enrolment(
        pki, EnrolSecrets(state, reactor), registry, reactor,
        rate_limit=Buckets(options["enrol-rate"], options["enrol-burst"], reactor),
        window=options["enrol-window"], max_nonces=options["enrol-nonces"],
        cert_days=options["cert-days"], overlap=options["cert-overlap"],
        ipv6_prefix=options["ipv6-prefix"], nonces=enrol_nonces,
    )
    hpackfast.configure(options["hpack-cache-bytes"])
    site = make_site(
        router, auth, enrolment,
        token_limit=Buckets(options["token-rate"], options["token-burst"], reactor),
        team_limit=Buckets(options["team-rate"], options["team-burst"], reactor),
        limits=provider_limits(options),
        verify_limit=Buckets(options["auth-verify-rate"], options["auth-verify-burst"], reactor),
        ipv6_prefix=options["ipv6-prefix"],
    )
    drain.courier, drain.site = courier, site
    site.timeOut = options["idle-timeout"]
    site.access_log = bool(options["access-log"])
    try:
        for desc in options["courier"]:
            listener(reactor, desc, courier, pki.server_options(tls.COURIER_ALPN),
                     courier_admission, reuse_port=bool(options["reuse-port"])).setServiceParent(top)
        for desc in options["provider"]:
            listener(reactor, desc, site, pki.server_options(tls.PROVIDER_ALPN),
                     provider_admission, reuse_port=bool(options["reuse-port"])).setServiceParent(top)
    except BadListener as e:
        raise usage.UsageError(str(e))
    # pushctl device revoke writes the registry; the gateway notices within a second.
    revocations = internet.TimerService(1.0, lambda: router.revoked(registry.poll()))
    revocations.clock = reactor
    revocations.setServiceParent(top)
    FrozenStartup(reactor).setServiceParent(top)  # full GCs scan only what came after start-up
    expiry = internet.TimerService(60, _expire, store, router)
    expiry.clock = reactor
    expiry.setServiceParent(top)
    log.info(
        "gateway state in {state}; store {store}; CA {ca}; provider key in {key}",
        state=str(state.resolve()),
        store=options["store"],
        ca=str(pki.ca_path.resolve()),
        key=str((state / "provider.key").resolve()),
    )
    return top
