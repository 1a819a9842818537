"""The README's Performance figures, rendered from bench/results.json.

    python bench/report.py            rewrites README.md's generated blocks (between their markers)
    python bench/report.py --check    exits 1 if they are not what results.json renders

``make bench`` runs it after writing results.json. Every figure in the blocks comes from results.json:
from this run, or, where this run did not measure it (a slow baseline, a figure of an earlier
engine), from a dated snapshot of its ``history``, marked with a letter that the notes under the
table date and explain. Text that is not a measurement (targets, what a baseline is) lives here.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results.json"
README = REPO / "README.md"


def markers(name: str) -> tuple[str, str]:
    return (
        f"<!-- bench/report.py {name}: generated from bench/results.json; edit report.py, not this block -->",
        f"<!-- bench/report.py {name}: end -->",
    )


Figures = dict[str, Any]
Part = Callable[[Figures], str]
"""One phrase of a cell from a set of figures; raises KeyError when a figure it needs is missing."""

MARKS = "ᵃᵇᶜᵈᵉᶠᵍʰⁱʲᵏˡᵐⁿᵒᵖʳˢᵗᵘᵛʷˣʸᶻ"


def runs(values: Sequence[float], fmt: str = ".2f") -> str:
    return " / ".join(format(v, fmt) for v in values)


def median(f: Figures, key: str, fmt: str = ".2f") -> str:
    """A median figure in seconds, with the runs it is the median of where results.json has them."""
    text = f"{format(f[key], fmt)} s"
    return f"{text} ({runs(f[key + '_runs'], fmt)})" if key + "_runs" in f else text


def workers(f: Figures, prefix: str) -> str:
    """The executor's task processes of a DAG's runs."""
    count = f[prefix + "_worker_runs"]
    runs = len(f.get(prefix + "_run_wall_runs", [None]))
    return f"{count} worker processes" + (f" in {runs} runs" if runs > 1 else "")


def span(value: float | Sequence[float], scale: float, fmt: str) -> str:
    """A figure, or the range of several measurements of it."""
    if isinstance(value, int | float):
        return format(value / scale, fmt)
    return "–".join(format(v / scale, fmt) for v in (min(value), max(value)))


def wrap(text: str) -> str:
    """Prose at the README's width (a table row stays one line)."""
    return textwrap.fill(text, width=100, break_long_words=False, break_on_hyphens=False)


def version(text: str | None) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")) if text else ()


def when(snapshot: Figures) -> str:
    stamp = snapshot["when"]
    return f"{stamp[:10]} {stamp[11:16]} UTC" if len(stamp) > 10 else stamp


def pct(share: float) -> str:
    return f"{share * 100:.1f} %"


@dataclass
class Row:
    workload: str
    now: list[Part]
    baseline: list[Part] = field(default_factory=list)
    target: Part | None = None
    met: Callable[[Figures], bool] | None = None


def _render(parts: Sequence[Part], figures: Figures) -> str | None:
    """The phrases whose figures are all there, joined; None when there are none."""
    out = []
    for part in parts:
        try:
            out.append(part(figures))
        except KeyError:
            continue
    return "; ".join(out) if out else None


W5_TARGET = {"connections": 3, "failed": 0, "p95_ms": 250, "lag_p99_ms": 100}

ROWS: list[Row] = [
    Row(
        "W1: 400 × `pg_sleep(0.02)`, cap 8 (makespan, median)",
        [
            lambda f: f"{median(f, 'w1_makespan', '.3f')} launched after the batch before",
            lambda f: f"first run after the install {f['w1_makespan_cold']:.3f} s",
        ],
        [
            lambda f: f"thread pool {f['w1_thread_pool']:.3f} s",
            lambda f: f"seed {f['w1_seed_style']:.1f} s ¹",
            lambda f: f"bare in-server runner {median(f, 'w1_bare_runner', '.3f')} ³",
            lambda f: f"50 × `pg_sleep(0.02)` in one session {f['w1_floor']:.3f} s (the floor: it sleeps in whole ms)",
        ],
        lambda f: f"≤ 1.05 × ideal {f['w1_ideal']:.3f} s",
        lambda f: f["w1_makespan"] <= 1.05 * f["w1_ideal"],
    ),
    Row(
        "W1 on the pg_cron launcher",
        [
            lambda f: f"{f['cron_w1_makespan']:.3f} s from launch",
            lambda f: (
                f"{f['cron_w1_from_first_start']:.3f} s from the first start "
                f"(first start {f['cron_w1_first_start'] * 1000:.0f} ms after launch)"
            ),
        ],
        [],
        lambda f: "≤ 1.05 × ideal from launch",
        lambda f: f["cron_w1_makespan"] <= 1.05 * f["w1_ideal"],
    ),
    Row(
        "pg_background: first start of a batch launched 0.2–1.6 s / 3.5–5 s after the role's previous one",
        [
            lambda f: (
                f"{f['first_start_lingering_median'] * 1000:.0f} ms median, "
                f"{f['first_start_lingering_max'] * 1000:.0f} ms max (runners still there) / "
                f"{f['first_start_cold_median'] * 1000:.0f} ms median, "
                f"{f['first_start_cold_max'] * 1000:.0f} ms max (new runners)"
            )
        ],
        [],
        lambda f: "first child ≤ 0.1 s after launch",
        lambda f: f["first_start_cold_max"] <= 0.1 and f["first_start_lingering_max"] <= 0.1,
    ),
    Row(
        "pg_cron: first start of a batch launched 0.2–4 s / 6.5–8 s after the role's previous one",
        [
            lambda f: (
                f"{f['cron_first_start_lingering_median'] * 1000:.0f} ms median, "
                f"{f['cron_first_start_lingering_max'] * 1000:.0f} ms max (runners still there) / "
                f"{f['cron_first_start_parked_median']:.2f} s median, "
                f"{f['cron_first_start_parked_max']:.2f} s max (parked)"
            )
        ],
        [],
        lambda f: "first child ≤ 1.5 s after launch",
        lambda f: f["cron_first_start_parked_max"] <= 1.5 and f["cron_first_start_lingering_max"] <= 1.5,
    ),
    Row(
        "W2: 5,000 × `SELECT 1`, cap 2 (median)",
        [lambda f: f"{f['w2_children_per_s']:,.0f} children/s ({runs(f['w2_children_per_s_runs'], ',.0f')})"],
        [
            lambda f: (
                f"thread pool {f['w2_thread_pool_per_s']:,.0f}/s ({runs(f['w2_thread_pool_per_s_runs'], ',.0f')})"
            ),
            lambda f: f"seed {f['w2_seed_style_per_s']:.2f}/s ¹",
        ],
        lambda f: "≥ the thread pool",
        lambda f: f["w2_children_per_s"] >= f["w2_thread_pool_per_s"],
    ),
    Row(
        "W2 on the pg_cron launcher",
        [
            lambda f: f"{f['cron_w2_children_per_s']:,.0f} children/s from launch",
            lambda f: f"{f['cron_w2_from_first_start_per_s']:,.0f}/s from the first start",
        ],
        [],
        lambda f: "≥ 0.8 × the thread pool",
        lambda f: f["cron_w2_children_per_s"] >= 0.8 * f["w2_thread_pool_per_s"],
    ),
    Row(
        "W3: launch of 10,000 (until the first child runs)",
        [lambda f: f"{f['w3_launch_10k']:.2f} s"],
        [],
        lambda f: "≤ 1 s",
        lambda f: f["w3_launch_10k"] <= 1.0,
    ),
    Row(
        "W3: one trigger poll on a 10,000-child batch (median)",
        [lambda f: f"{f['w3_monitor_10k_median_ms']:.1f} ms"],
        [],
        lambda f: "≤ 25 ms",
        lambda f: f["w3_monitor_10k_median_ms"] <= 25,
    ),
    Row(
        "W4: W1 through `dag.test()`, deferrable, poll 1 s (task wall, median)",
        [
            lambda f: median(f, "w4_task_wall"),
            lambda f: f"cold {f['w4_task_wall_cold']:.1f} s ²",
        ],
        [],
        lambda f: "≤ 3.0 s",
        lambda f: f["w4_task_wall"] <= 3.0,
    ),
    Row(
        "W5: 1,000 deferred batches on one triggerer, server max_connections 100",
        [
            lambda f: f"{f['w5_connections_peak']} connections",
            lambda f: f"{f['w5_tasks_failed']} of {f['w5_batches']:,} failed",
            lambda f: f"end p50 {f['w5_end_latency_p50_ms']:.0f} ms / p95 {f['w5_end_latency_p95_ms']:.0f} ms",
            lambda f: f"loop lag p99 {f['w5_loop_lag_p99_ms']:.1f} ms",
        ],
        [
            lambda f: (
                f"a connection per trigger (engine 0.1.0's trigger): {f['w5_trigger_0_1_0_connections_peak']} "
                f"connections, {f['w5_trigger_0_1_0_tasks_failed']:,} of {f['w5_batches']:,} failed, "
                f"loop lag p99 {f['w5_trigger_0_1_0_loop_lag_p99_ms'] / 1000:.1f} s"
            )
        ],
        lambda f: "≤ {connections} connections, {failed} failed, p95 ≤ {p95_ms} ms, lag p99 ≤ {lag_p99_ms} ms".format(
            **W5_TARGET
        ),
        lambda f: (
            f["w5_connections_peak"] <= W5_TARGET["connections"]
            and f["w5_tasks_failed"] == W5_TARGET["failed"]
            and f["w5_end_latency_p95_ms"] <= W5_TARGET["p95_ms"]
            and f["w5_loop_lag_p99_ms"] <= W5_TARGET["lag_p99_ms"]
        ),
    ),
    Row(
        "W6: a poll of 100 / 100,000 children (median)",
        [lambda f: f"{f['w6_poll_100_ms']:.1f} / {f['w6_poll_100000_ms']:.1f} ms"],
        [lambda f: f"engine 0.1.0: {f['w6_poll_100_0_1_0_ms']:.1f} / {f['w6_poll_100000_0_1_0_ms']:.1f} ms"],
        lambda f: "≤ 10 ms at 100,000",
        lambda f: f["w6_poll_100000_ms"] <= 10,
    ),
    Row(
        "W7: 200 × 50 ms at cap 8, 40 crossing pairwise (deadlocks)",
        [
            lambda f: (
                ("all done" if f["w7_status"] == "done" else f"ended {f['w7_status']}")
                + f" in {f['w7_makespan']:.2f} s, {f['w7_children_retried']} victims retried"
                + ("" if f["w7_effects_exactly_once"] else ", effects NOT exactly once")
            )
        ],
        [lambda f: f"ideal {f['w7_ideal']:.2f} s"],
        lambda f: "every child done, its effects once",
        lambda f: f["w7_status"] == "done" and f["w7_effects_exactly_once"],
    ),
    Row(
        "W8: DAG run of 200 × 50 ms, cap 8, real deployment (Airflow 3.3), median",
        [
            lambda f: f"{median(f, 'w8_batch_200_run_wall')}, {workers(f, 'w8_batch_200')}",
            lambda f: (
                f"launched from a worker (`start_from_trigger=False`): {median(f, 'w8_on_worker_200_run_wall')}, "
                f"{workers(f, 'w8_on_worker_200')}"
            ),
            lambda f: (
                f"the same waiting there for the batch (`defer_after={f['w8_worker_wait_defer_after']}`): "
                f"{median(f, 'w8_worker_wait_200_run_wall')}"
            ),
        ],
        [lambda f: f"200 mapped `SQLExecuteQueryOperator`: {f['w8_mapped_200_run_wall']:.1f} s"],
        lambda f: f"≤ ideal + 2.5 s = {f['w8_ideal_200'] + 2.5:.2f} s",
        lambda f: f["w8_batch_200_run_wall"] <= f["w8_ideal_200"] + 2.5,
    ),
    Row(
        "W8: the same with 1,000 statements",
        [lambda f: median(f, "w8_batch_1000_run_wall", ".1f")],
        [lambda f: f"mapped: {f['w8_mapped_1000_run_wall']:.0f} s"],
    ),
    Row(
        "W9: the console's database work for a 100,000-child batch (median): first page problems first / "
        "a status filter / figures",
        [
            lambda f: (
                f"{f['w9_console_page_100000_ms']:.0f} / {f['w9_console_filtered_100000_ms']:.0f} / "
                f"{f['w9_console_figures_100000_ms']:.0f} ms"
            )
        ],
        [],
        lambda f: "page ≤ 1 s",
        lambda f: f["w9_console_page_100000_ms"] <= 1000,
    ),
    Row(
        "W10: lineage of 10,000 distinct `INSERT … SELECT` over 100 tables (build, median): five named "
        "columns / `SELECT *`",
        [
            lambda f: (
                f"{f['w10_lineage_named_ms']:.0f} / {f['w10_lineage_star_ms']:.0f} ms, event "
                f"{max(f['w10_lineage_named_event_bytes'], f['w10_lineage_star_event_bytes']) / 1000:.0f} KB"
            )
        ],
        [
            lambda f: (
                f"the provider's `SQLParser` path: {span(f['w10_provider_named_ms'], 1000, '.0f')} s, "
                f"{span(f['w10_provider_named_event_bytes'], 1e6, '.2f')} MB"
            )
        ],
        lambda f: "event < 1 MB, a few hundred ms",
        lambda f: (
            max(f["w10_lineage_named_event_bytes"], f["w10_lineage_star_event_bytes"]) < 1_000_000
            and f["w10_lineage_named_ms"] < 500
        ),
    ),
]

FOOTNOTES = (
    "¹ The seed's design (a worker per statement, queued ones started only at a 1 s poll), measured on "
    "80 of W1's and 10 of W2's statements and scaled. ² `dag.test()` in a fresh interpreter; the warm "
    "figure is the second run in the same interpreter, the cold one pays Airflow's in-process task "
    "start-up (median of the interpreters). ³ Eight sessions, already connected, each looping over a "
    "queue table in a procedure: claim the next statement, commit, run it in a subtransaction, record "
    "its end with the next claim; a commit per child that does not wait for a WAL flush, and nothing "
    "more (no counts, outcomes, settings, launch or crash recovery): what one commit per child costs "
    "here (`bench.py`'s `bare_runner_run`)."
)


class Sources:
    """Where a cell's figures come from: this run, else the newest snapshot of ``history`` that has
    them all, which then gets a mark."""

    def __init__(self, results: Figures) -> None:
        self.now = {k: v for k, v in results.items() if k != "history"}
        self.history: list[Figures] = results.get("history", [])
        self.used: dict[int, str] = {}

    def mark(self, index: int) -> str:
        if index not in self.used:
            self.used[index] = MARKS[len(self.used)]
        return self.used[index]

    def cell(self, parts: Sequence[Part]) -> str:
        """Each phrase from the newest source that renders it."""
        out = []
        for part in parts:
            text = _render([part], self.now)
            if text is None:
                for i, snapshot in enumerate(self.history):
                    text = _render([part], snapshot["figures"])
                    if text is not None:
                        text += f" {self.mark(i)}"
                        break
            if text is not None:
                out.append(text)
        return "; ".join(out)

    def before(self, row: Row) -> str:
        """The row from a snapshot of the latest earlier engine that has it (its newest)."""
        earlier = [
            (i, h)
            for i, h in enumerate(self.history)
            if h.get("engine") and version(h["engine"]) < version(self.now.get("engine"))
        ]
        earlier.sort(key=lambda ih: (version(ih[1]["engine"]), ih[1]["when"]), reverse=True)
        for i, snapshot in earlier:
            text = _render(row.now, snapshot["figures"])
            if text is not None:
                return f"{text} {self.mark(i)}"
        return ""

    def notes(self) -> list[str]:
        out = []
        for i, mark in sorted(self.used.items(), key=lambda item: MARKS.index(item[1])):
            snapshot = self.history[i]
            engine = f", engine {snapshot['engine']}" if snapshot.get("engine") else ""
            out.append(f"{mark} {when(snapshot)}{engine}: {snapshot['note']}.")
        return out


def with_history(results: Figures, previous: Figures) -> Figures:
    """``results`` with the ``history`` of the previous results.json: the previous run joins it when
    it measured another engine (the README's "earlier engine" column), and snapshots of this
    engine's, which this complete run supersedes, leave it."""
    history = [h for h in previous.get("history", []) if h.get("engine") != results["engine"]]
    if previous.get("engine") and previous["engine"] != results["engine"]:
        figures = {k: v for k, v in previous.items() if k not in ("history", "when", "engine", "machine")}
        history.insert(
            0,
            {
                "when": previous["when"],
                "engine": previous["engine"],
                "machine": previous.get("machine"),
                "note": f"the last `make bench` of engine {previous['engine']}",
                "figures": figures,
            },
        )
    # Newest first: the "earlier engine" column and fallbacks take the first snapshot that fits.
    history.sort(key=lambda h: h["when"], reverse=True)
    return {**results, "history": history}


def _target(row: Row, figures: Figures) -> str:
    if row.target is None:
        return ""
    text = row.target(figures)
    if row.met is None:
        return text
    try:
        return f"{'✓' if row.met(figures) else '✗'} {text}"
    except KeyError:
        return text


def _cells(values: Sequence[str]) -> str:
    return "| " + " | ".join(v.replace("|", "\\|") for v in values) + " |"


PHASES = {
    "queued": "run queued → running (scheduler) ¹",
    "to_task": "run running → task deferred (scheduler)",
    "to_batch": "task deferred → batch launched (triggerer)",
    "batch": "batch launched → its last child ended (engine)",
    "to_task_end": "last child ended → task ended (trigger event)",
    "to_run_end": "task ended → run ended (scheduler)",
}
# W8's figure but the engine's phase: what W8's target (ideal + 2.5 s) leaves to Airflow.
AIRFLOW_PHASES = ("to_task", "to_batch", "to_task_end", "to_run_end")
SERVICES = ("scheduler", "triggerer", "postgres")


def _setting(env: str) -> str:
    """``AIRFLOW__SCHEDULER__X`` as Airflow's documentation names it: ``[scheduler] x``."""
    section, key = env.removeprefix("AIRFLOW__").split("__", 1)
    return f"`[{section.lower()}] {key.lower()}`"


def render_tuning(results: Figures) -> str:
    """The measured part of "Tuning Airflow for short batches": W8's phases and CPU on the defaults
    and on each tuned deployment, from the newest source that has them."""
    src = Sources(results)
    sources = [
        (src.now, src.now.get("when", ""), f"{when(src.now)}, engine {src.now.get('engine', '?')} (the run above)")
    ]
    sources += [
        (h["figures"], h["when"], f"{when(h)}, engine {h.get('engine', '?')}, {h['note']}") for h in src.history
    ]
    # The newest: a snapshot newer than the table's run measured what the run above did not.
    measured = [(s, stamp, o) for s, stamp, o in sources if "w8_batch_200_phases" in s]
    if not measured:
        return "Not measured yet: `make bench` measures it."
    f, _, origin = max(measured, key=lambda m: m[1])
    tuned = f.get("w8_tuned_settings", {})
    columns = [("Airflow's defaults", "w8_batch_200", "w8_idle_cpu")] + [
        (
            ", ".join(f"{_setting(k)} = {v}" for k, v in settings.items()),
            f"w8_tuned_{name}_200",
            f"w8_tuned_{name}_idle_cpu",
        )
        for name, settings in tuned.items()
        if f"w8_tuned_{name}_200_phases" in f
    ]
    lines = [
        wrap(
            f"Figures of {origin}: W8's DAG run of 200 × 50 ms, median of {f.get('w8_runs', 3)} runs on each "
            "deployment; CPU of each service's process tree, per DAG run and idle (share of one core with no run):"
        ),
        "",
        _cells(["", *(c[0] for c in columns)]),
        "|---" * (len(columns) + 1) + "|",
    ]
    lines += [_cells([label, *(f"{f[c[1] + '_phases'][key]:.2f} s" for c in columns)]) for key, label in PHASES.items()]
    lines.append(
        _cells(
            [
                "Airflow's part of W8 (the phases above but the first and the engine's, added)",
                *(f"{sum(f[c[1] + '_phases'][key] for key in AIRFLOW_PHASES):.2f} s" for c in columns),
            ]
        )
    )
    lines.append(_cells(["**DAG run (W8)**", *(f"**{median(f, c[1] + '_run_wall')}**" for c in columns)]))
    lines.append(
        _cells(["from the REST call that triggered it", *(median(f, c[1] + "_from_trigger") for c in columns)])
    )
    lines += [_cells([f"CPU per DAG run: {s}", *(f"{f[c[1] + '_cpu_s'][s]:.2f} s" for c in columns)]) for s in SERVICES]
    lines += [_cells([f"CPU idle: {s}", *(pct(f[c[2]][s]) for c in columns)]) for s in SERVICES]
    lines += [
        "",
        "¹ Not part of W8's figure, which starts when the run does; part of what a user who triggers it waits.",
    ]
    default, bullets = columns[0], []
    for label, prefix, idle in columns[1:]:

        def sooner(key: str, p: str = prefix) -> str:
            gained = f[f"{default[1]}_phases"][key] - f[f"{p}_phases"][key]
            return f"{abs(gained):.2f} s {'sooner' if gained >= 0 else 'later'}"

        cost = {s: f[idle][s] - f[default[2]][s] for s in SERVICES}
        bullets.append(
            textwrap.fill(
                f"- {label}: a triggered run starts {sooner('queued')} and ends {sooner('to_run_end')} after its "
                f"task; idle, the scheduler uses {cost['scheduler'] * 100:+.1f} and PostgreSQL "
                f"{cost['postgres'] * 100:+.1f} percentage points of a core, and "
                f"{f[prefix + '_cpu_s']['scheduler'] - f[default[1] + '_cpu_s']['scheduler']:+.2f} s of scheduler "
                "CPU per DAG run.",
                width=100,
                subsequent_indent="  ",
                break_long_words=False,
                break_on_hyphens=False,
            )
        )
    if bullets:
        lines += ["", "Against the defaults:", "", *bullets]
    extra = []
    if "w8_poll5_200_run_wall" in f:
        extra.append(f"`poll_interval=5` (the operator's default) instead of 1: {median(f, 'w8_poll5_200_run_wall')}")
    if "w8_on_worker_200_run_wall" in f:
        extra.append(
            f"`start_from_trigger=False` (the batch launched from a worker, as on Airflow 3.1 and 3.2): "
            f"{median(f, 'w8_on_worker_200_run_wall')}, {workers(f, 'w8_on_worker_200')}, "
            f"task deferred → batch launched {f['w8_on_worker_200_phases']['to_batch']:.2f} s, scheduler CPU "
            f"{f['w8_on_worker_200_cpu_s']['scheduler']:.2f} s per run"
        )
    if "w8_worker_wait_200_run_wall" in f:
        extra.append(
            f"`defer_after={f['w8_worker_wait_defer_after']}` too (the worker waits for the batch instead of "
            f"deferring): {median(f, 'w8_worker_wait_200_run_wall')}, last child ended → task ended "
            f"{f['w8_worker_wait_200_phases']['to_task_end']:.2f} s, task ended → run ended "
            f"{f['w8_worker_wait_200_phases']['to_run_end']:.2f} s, scheduler CPU "
            f"{f['w8_worker_wait_200_cpu_s']['scheduler']:.2f} s per run"
        )
    if extra:
        lines += ["", wrap("On the defaults, the same DAG run with " + "; with ".join(extra) + ".")]
    return "\n".join(lines)


def render_performance(results: Figures) -> str:
    src = Sources(results)
    now = src.now
    engine = now.get("engine", "?")
    runs_note = (
        f"Airflow figures are medians of {now['w8_runs']} runs (the runs in parentheses)."
        if now.get("w8_runs", 1) > 1
        else "Airflow figures are single runs."
    )
    lines = [
        wrap(
            f"Figures of {when(now)}, engine {engine}, Airflow {now.get('airflow', '?')}, on {now['machine']}. "
            f"{runs_note} ✓ / ✗: the target met or not in this run."
        ),
        "",
        _cells(["workload", f"engine {engine}", "earlier engine", "baseline (same run)", "target"]),
        "|---|---|---|---|---|",
    ]
    for row in ROWS:
        lines.append(
            _cells([row.workload, src.cell(row.now), src.before(row), src.cell(row.baseline), _target(row, now)])
        )
    lines += ["", wrap(FOOTNOTES)]
    if notes := src.notes():
        lines += ["", wrap(" ".join(notes))]
    return "\n".join(lines)


BLOCKS: dict[str, Callable[[Figures], str]] = {"performance": render_performance, "tuning": render_tuning}


def render_readme(readme: str, results: Figures) -> str:
    """``readme`` with each generated block rendered afresh from ``results``."""
    for name, render in BLOCKS.items():
        begin, end = markers(name)
        start, stop = readme.find(begin), readme.find(end)
        if start < 0 or stop < start:
            raise ValueError(f"README.md has no {name} block ({begin} ... {end})")
        readme = f"{readme[:start]}{begin}\n{render(results)}\n{readme[stop:]}"
    return readme


def main(argv: Sequence[str] = sys.argv[1:]) -> int:
    results = json.loads(RESULTS.read_text(encoding="utf-8"))
    readme = README.read_text(encoding="utf-8")
    updated = render_readme(readme, results)
    if "--check" in argv:
        if updated != readme:
            print("README.md's generated blocks differ from what bench/report.py renders: run it", file=sys.stderr)
            return 1
        return 0
    README.write_text(updated, encoding="utf-8")
    print(f"rewrote the generated blocks of {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
