"""More PostgreSQL servers than the suite's main one, for tests that restart or starve a server.

Each is an instance of ``scripts/db.sh`` (same sid root, its own data directory and port), so a test
may restart it, fill its connection table or stop it without disturbing the main server, which the
Airflow metadata of the end-to-end suite lives on.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

import pytest

from tests.conftest import REPO


@dataclass(frozen=True)
class Instance:
    """A server started by ``scripts/db.sh --instance``."""

    name: str
    port: int
    settings: tuple[str, ...] = ()
    without: str | None = None

    def _db(self, action: str) -> str:
        args = ["bash", str(REPO / "scripts" / "db.sh"), action, "--instance", self.name, "--port", str(self.port)]
        for setting in self.settings:
            args += ["-c", setting]
        if self.without:
            args += ["--without", self.without]
        out = subprocess.run(args, check=True, capture_output=True, text=True)
        return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""

    def start(self) -> str:
        """Starts the server if it is not running; its superuser DSN."""
        return self._db("start")

    def restart(self) -> None:
        self._db("restart")

    def stop(self) -> None:
        self._db("stop")


def local_servers_or_skip() -> None:
    """Instances need this machine's sid root (scripts/db.sh); `make test` against a server of your own
    (PGBG_TEST_DSN) sets PGBG_EXTERNAL_SERVER and these tests are skipped."""
    if os.environ.get("PGBG_EXTERNAL_SERVER"):
        pytest.skip("needs the local servers of scripts/db.sh (testing against PGBG_TEST_DSN)")
    if os.geteuid() != 0:
        pytest.skip("starting more servers needs root (scripts/db.sh)")


FLEET = Instance("fleet", 54319, ("max_connections=100",))
"""A stock-sized server (max_connections 100) that tests may restart."""

MANAGED = Instance("managed", 54321, without="pg_background")
"""A server like a managed service: pg_cron preloaded, pg_background not available."""


@dataclass(frozen=True)
class Pooler:
    """PgBouncer started by ``scripts/pgbouncer.sh`` in front of a server of scripts/db.sh."""

    name: str
    port: int
    server_port: int
    mode: str = "transaction"
    settings: tuple[str, ...] = ()

    def _run(self, action: str) -> str:
        args = ["bash", str(REPO / "scripts" / "pgbouncer.sh"), action, "--instance", self.name]
        args += ["--port", str(self.port), "--server-port", str(self.server_port), "--mode", self.mode]
        for setting in self.settings:
            args += ["-s", setting]
        out = subprocess.run(args, check=True, capture_output=True, text=True)
        return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""

    def start(self) -> str:
        """Starts the pooler if it is not running; the superuser DSN through it."""
        return self._run("start")

    def restart(self) -> str:
        """Restarts the pooler, dropping every server connection it holds (a role the tests dropped and
        created again is another role to the server: its old connections would still act as the old one)."""
        return self._run("restart")

    def stop(self) -> None:
        self._run("stop")


FLEET_TX = Pooler("fleet-tx", 64319, FLEET.port)
"""PgBouncer in transaction mode in front of the fleet server."""

FLEET_SESSION = Pooler("fleet-session", 64320, FLEET.port, mode="session")
"""PgBouncer in session mode in front of the fleet server."""

MAIN_TX = Pooler("main-tx", 64318, 54318)
"""PgBouncer in transaction mode in front of the main server (the e2e deployments' DAGs go through it)."""
