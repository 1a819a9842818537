"""What a batch's outcome means for its Airflow task, from the engine's summary document.

The summary (``pg_background_summary``) is built by the engine, so its shape is defined there once;
this module only words it, for the operator (on a worker) and the trigger (in the triggerer) alike.
"""

from __future__ import annotations

from typing import Any

from airflow_pgbg.status import ChildStatus


def succeeded(summary: dict[str, Any]) -> bool:
    return summary["status"] == ChildStatus.DONE.value


def failure_message(summary: dict[str, Any]) -> str:
    """Why the task fails: how many statements did not succeed, and the first of them with SQLSTATE."""
    not_done = summary["children"] - summary["counts"]["done"]
    described = "; ".join(
        f"#{r['seq']} {r['status']} [{r['sqlstate'] or '-'}] {(r['error'] or '')[:200]} :: {r['query'][:120]}"
        for r in summary.get("problems") or []
    )
    return (
        f"batch {summary['uuid_parent']}: {not_done} of {summary['children']} statements did not succeed"
        f" (status {summary['status']}); first: {described or '-'}"
    )


def summary_line(summary: dict[str, Any]) -> str:
    """One log line for a batch that ended."""
    counts = {s: n for s, n in summary["counts"].items() if n}
    line = f"Batch {summary['uuid_parent']} ended {summary['status']}: {counts}"
    if summary.get("wall_seconds") is not None:
        line += f" in {summary['wall_seconds']:.3f} s"
    if summary.get("retried"):
        line += f", {summary['retried']} children needed automatic retries"
    return line
