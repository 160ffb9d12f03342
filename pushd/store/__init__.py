"""
Store providers behind one set of interfaces (``interfaces.py``). ``open_store`` picks one
from a single setting, so switching provider is one config line:

    store = sqlite                      # the embedded default: STATE-DIR/pushd.sqlite3
    store = sqlite:/var/lib/pushd/queue.sqlite3
    store = redis://127.0.0.1:6379/0    # several gateway nodes sharing one Redis
    store = memory                      # tests and throwaway gateways; loses all on exit
"""

from __future__ import annotations

from pathlib import Path


def open_store(spec: str, state_dir: Path, per_topic: int, reactor=None, synchronous: str = "FULL"):
    """Raise ValueError (bad spec) or StoreUnavailable (cannot open) with the reason."""
    if spec == "memory":
        from pushd.store.memory import MemoryStore

        return MemoryStore(per_topic=per_topic)
    if spec == "sqlite" or spec.startswith("sqlite:"):
        from pushd.store.sqlite import SQLiteStore

        path = spec[len("sqlite:"):] or str(state_dir / "pushd.sqlite3")
        return SQLiteStore(path, per_topic=per_topic, synchronous=synchronous, reactor=reactor)
    if spec.startswith("redis://"):
        from pushd.store.redis import RedisStore

        return RedisStore(spec, per_topic=per_topic, reactor=reactor)
    raise ValueError(f"unknown store {spec!r}: use sqlite, sqlite:PATH, redis://HOST:PORT/DB or memory")


def open_bus(store, reactor=None):
    """The INodeBus that goes with ``store``: Redis's PUB/SUB for a store nodes share, else in-process."""
    from pushd.store.redis import RedisStore

    if isinstance(store, RedisStore):
        from pushd.store.redisbus import RedisNodeBus

        return RedisNodeBus(store)
    from pushd.store.memory import LocalBus

    return LocalBus(clock=reactor)
