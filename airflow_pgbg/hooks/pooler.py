"""Connections without a server session of their own: PostgreSQL behind a pooler in transaction mode.

PgBouncer (and poolers like it) in transaction mode lends a client a server connection for one
transaction at a time. What lives in a session does not follow the client: a ``LISTEN`` stays on a
server connection whose notifications nobody reads (PgBouncer drops them: "got packet 'A' from server
when not linked"), a session advisory lock stays held for whoever uses that server connection next,
even after its client died, and a statement prepared on one server connection is unknown on the next.

A pooler answers a client's startup with a cancel key of its own, so the backend pid a client is told
differs from the ``pg_backend_pid()`` of the server connection that runs its statements; a direct
connection (or a plain TCP proxy) is told the real one. That is how the package finds a pooler without
being told. It cannot tell the pooler's mode, so it assumes the one where sessions do not hold; the
connection extra ``pgbg_pool_mode`` says which it is (``"session"``: LISTEN and watch locks are used as
on a direct connection; ``"transaction"``: never, whatever the detection says).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

POOL_MODE_EXTRA = "pgbg_pool_mode"
"""Connection extra naming the pool mode of a pooler in front of the database."""

POOL_MODES = ("transaction", "session")

HEARTBEAT_EVERY = 10.0
"""Seconds between the heartbeats of a waiter without a session (see the engine's 89_heartbeats.sql)."""

SESSIONLESS_POLL_INTERVAL = 1.0
"""Longest interval between two polls of a watcher that cannot hear the end notification."""


def declared_pool_mode(extra: Mapping[str, Any]) -> str | None:
    """The pool mode a connection's extra declares, or None to detect it."""
    mode = extra.get(POOL_MODE_EXTRA)
    if mode in (None, ""):
        return None
    if mode not in POOL_MODES:
        raise ValueError(f"connection extra {POOL_MODE_EXTRA} must be one of {', '.join(POOL_MODES)}, not {mode!r}")
    return str(mode)


def session_less(declared: str | None, client_pid: int, server_pid: int) -> bool:
    """Whether a connection must do without a session: declared so, or a pooler of unknown mode."""
    if declared is not None:
        return declared == "transaction"
    return client_pid != server_pid


def heartbeat_ttl(every: float) -> float:
    """How long a heartbeat of a waiter that beats every ``every`` seconds proves it alive: three beats,
    so that one slow round trip is not a death."""
    return 3 * max(every, HEARTBEAT_EVERY)
