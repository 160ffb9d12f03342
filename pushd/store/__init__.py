"""
Store providers behind one set of interfaces (``interfaces.py``). ``open_store`` picks one
from a single setting, so switching provider is one config line:

    store = sqlite                      # the embedded default: STATE-DIR/pushd.sqlite3
    store = sqlite:/var/lib/pushd/queue.sqlite3
    store = redis://127.0.0.1:6379/0    # several gateway nodes sharing one Redis
    store = redis-sentinel://10.0.0.1:26379,10.0.0.2:26379/pushd/0   # the same, Sentinel HA
    store = memory                      # tests and throwaway gateways; loses all on exit
"""

from __future__ import annotations

from pathlib import Path

FORMS = ("sqlite, sqlite:PATH, redis://[[USER]:PASSWORD@]HOST[:PORT][/DB], "
         "redis-sentinel://[[USER]:PASSWORD@]HOST:PORT[,HOST:PORT...]/MASTER[/DB] or memory")


def check_store(spec: str) -> None:
    """Raise ValueError (one line naming --store and the forms) if ``spec`` names no store; opens nothing."""
    if spec in ("memory", "sqlite") or spec.startswith("sqlite:"):
        return
    from pushd.store.redis import parse_sentinel_url, parse_url

    try:
        if spec.startswith("redis://"):
            parse_url(spec)
            return
        if spec.startswith("redis-sentinel://"):
            parse_sentinel_url(spec)
            return
    except ValueError as e:
        raise ValueError(f"--store: {e}; use {FORMS}") from None
    raise ValueError(f"--store: unknown store {spec!r}; use {FORMS}")


def open_store(spec: str, state_dir: Path, per_topic: int, reactor=None, synchronous: str = "FULL",
               redis_wait: int = 0):
    """Raise ValueError (bad spec: one line naming --store and the forms) or StoreUnavailable (cannot open)."""
    if spec == "memory":
        from pushd.store.memory import MemoryStore

        return MemoryStore(per_topic=per_topic)
    if spec == "sqlite" or spec.startswith("sqlite:"):
        from pushd.store.sqlite import SQLiteStore

        path = spec[len("sqlite:"):] or str(state_dir / "pushd.sqlite3")
        return SQLiteStore(path, per_topic=per_topic, synchronous=synchronous, reactor=reactor)
    if spec.startswith(("redis://", "redis-sentinel://")):
        from pushd.store.redis import RedisStore

        try:
            return RedisStore(spec, per_topic=per_topic, reactor=reactor, wait=redis_wait)
        except ValueError as e:
            raise ValueError(f"--store: {e}; use {FORMS}") from None
    raise ValueError(f"--store: unknown store {spec!r}; use {FORMS}")


def open_bus(store, reactor=None):
    """The INodeBus that goes with ``store``: Redis's PUB/SUB for a store nodes share, else in-process."""
    from pushd.store.redis import RedisStore

    if isinstance(store, RedisStore):
        from pushd.store.redisbus import RedisNodeBus

        return RedisNodeBus(store)
    from pushd.store.memory import LocalBus

    return LocalBus(clock=reactor)
