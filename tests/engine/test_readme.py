"""The README's SQL runs as printed: every ```sql block, through a real psql, as a role of pgbg_user.

A statement followed by ``-- → value`` (on its last line, or on lines of their own for several rows)
must print exactly that (psql's unaligned, tuples-only output); every other one must just succeed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from tests.conftest import REPO

_BLOCK = re.compile(r"^```sql\n(.*?)^```", re.MULTILINE | re.DOTALL)
_EXPECTED = re.compile(r"--\s*→\s*(.*?)\s*(?:\(.*\))?\s*$")


@dataclass
class Unit:
    """One psql command of the README, and what it is documented to print."""

    text: str
    expected: list[str] = field(default_factory=list)


def readme_units() -> list[Unit]:
    units: list[Unit] = []
    for block in _BLOCK.findall((REPO / "README.md").read_text(encoding="utf-8")):
        lines: list[str] = []
        for line in block.splitlines():
            code, _, comment = line.partition("--")
            if not code.strip():
                if comment.lstrip().startswith("→") and units:
                    units[-1].expected.append(_EXPECTED.search(line).group(1))
                elif lines:
                    lines.append(line)
                continue
            lines.append(line)
            if code.rstrip().endswith(";") or "\\gset" in code:
                expected = [_EXPECTED.search(line).group(1)] if "→" in comment else []
                units.append(Unit("\n".join(lines), expected))
                lines = []
        assert not "".join(lines).strip(), f"a statement of the README has no end: {lines}"
    return units


def test_the_readme_documents_results_to_check() -> None:
    units = readme_units()
    assert len(units) >= 10
    assert sum(bool(u.expected) for u in units) >= 8


@pytest.mark.pg_background_only  # p_monitor => true, the seed's synchronous launch
def test_the_readmes_sql_runs_as_printed(admin: psycopg.Connection, make_role: Callable[..., str]) -> None:
    psql = shutil.which("psql")
    assert psql, "psql (the PostgreSQL client) is needed to run the README's SQL as a user would"
    dsn = make_role()
    # A role's tables go to a schema of its own, first in its search_path ("$user").
    role = conninfo_to_dict(dsn)["user"]
    admin.execute(f"CREATE SCHEMA {role} AUTHORIZATION {role}")
    units = readme_units()
    script = []
    for k, unit in enumerate(units):
        script += [f"\\echo <<<{k}>>>", unit.text]
    run = subprocess.run(
        [psql, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", dsn],
        input="\n".join(script) + "\n",
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, f"{run.stderr}\n{run.stdout[-2000:]}"
    printed = dict(re.findall(r"<<<(\d+)>>>\n(.*?)(?=<<<\d+>>>\n|\Z)", run.stdout, re.DOTALL))
    for k, unit in enumerate(units):
        if unit.expected:
            got = [line for line in printed[str(k)].splitlines() if line.strip()]
            assert got == unit.expected, f"{unit.text}\nprinted {got}, the README says {unit.expected}"
