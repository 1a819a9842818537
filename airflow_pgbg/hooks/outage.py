"""Telling a database outage from a real error, and waiting one out.

A restart, a failover, a dropped connection or a full connection table say nothing about a batch:
the engine keeps its state in the database, so whoever waits for a batch reconnects and goes on.
Everything else (a missing batch, a permission error, bad input) is an answer and ends the wait.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import psycopg

OUTAGE_SQLSTATES = frozenset(
    {
        "57P01",  # admin_shutdown: the server is stopping or our backend was terminated
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now: starting up, or in recovery
        "53300",  # too_many_connections
        "25006",  # read_only_sql_transaction: a failover has not finished promoting the new primary
    }
)
"""SQLSTATEs of a server that is (for now) not there, beside the whole connection_exception class 08."""

DEFAULT_RECONNECT_TIMEOUT = 15 * 60.0
"""Seconds a waiter rides out an outage before it gives up (the operator's reconnect_timeout)."""


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` means the database is unreachable for now rather than that something is wrong."""
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate:
        return sqlstate in OUTAGE_SQLSTATES or sqlstate.startswith("08")
    # No SQLSTATE: the connection failed or broke before the server could say why.
    return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError, ConnectionError, TimeoutError))


def describe(exc: BaseException) -> str:
    """The first line of an error: its type, SQLSTATE and message (libpq names host and port, never the
    password)."""
    sqlstate = getattr(exc, "sqlstate", None)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}{f' [{sqlstate}]' if sqlstate else ''}: {text}"


@dataclass
class Backoff:
    """Capped exponential backoff with full jitter, so a fleet of waiters does not reconnect in step."""

    initial: float = 0.5
    cap: float = 30.0
    factor: float = 2.0
    _attempt: int = field(default=0, init=False)

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.initial * self.factor**self._attempt)
        self._attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._attempt = 0


class EngineUnreachable(RuntimeError):
    """The database stayed unreachable for longer than the waiter's reconnect timeout."""

    def __init__(self, seconds: float, cause: BaseException) -> None:
        super().__init__(
            f"the database was unreachable for {seconds:.0f} s (reconnect_timeout), last error: {describe(cause)}"
        )
        self.seconds = seconds
        self.cause = cause
