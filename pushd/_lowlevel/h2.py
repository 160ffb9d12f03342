"""
What pushd knows about h2's insides: an ``H2Connection`` keeps a frame dispatch table of
bound methods of itself, a reference cycle. ``forget`` breaks it when a connection ends, so
refcounting frees the H2Connection (HPACK tables, streams, settings) instead of the cyclic
collector. Measured (bench/abuse.py, gc callbacks in the gateway): the cycles closed
connections left made full collections of 41-102 ms under floods, each an honest push's
stall.
"""

from __future__ import annotations

from h2.config import H2Configuration
from h2.connection import H2Connection


def forget(conn) -> None:
    """An ended connection's H2Connection: clear its dispatch table (nothing reads it again)."""
    table = getattr(conn, "_frame_dispatch_table", None)
    if isinstance(table, dict):
        table.clear()


def self_check() -> list:
    """What this module relies on and the installed h2 does not have (empty: all there)."""
    conn = H2Connection(H2Configuration(client_side=False))
    if not isinstance(getattr(conn, "_frame_dispatch_table", None), dict):
        return ["h2's H2Connection has no _frame_dispatch_table dict: update pushd/_lowlevel/h2.py"]
    return []
