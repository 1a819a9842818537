"""HTML of the batch page: summary, children table and timeline, all text escaped by Jinja."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from jinja2 import Environment

from airflow_pgbg.status import ChildStatus

COLOURS = {
    ChildStatus.QUEUED.value: "#9ca3af",
    ChildStatus.RUNNING.value: "#3b82f6",
    ChildStatus.DONE.value: "#16a34a",
    ChildStatus.FAILED.value: "#dc2626",
    ChildStatus.STOPPED.value: "#d97706",
    ChildStatus.LOST.value: "#7c3aed",
}

_env = Environment(autoescape=True)

_PAGE = _env.from_string("""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
{% if active %}<meta http-equiv="refresh" content="3">{% endif %}
<title>PG Background batch {{ batch.uuid_parent }}</title>
<style>
 body { font: 14px system-ui, sans-serif; margin: 1.2rem; color: #111827; }
 table { border-collapse: collapse; width: 100%; } th, td { border-bottom: 1px solid #e5e7eb; padding: .3rem .5rem; text-align: left; vertical-align: top; }
 .status { padding: 0 .4rem; border-radius: .3rem; color: #fff; font-weight: 600; }
 .bar { display: flex; height: 14px; width: 100%; max-width: 40rem; border-radius: 7px; overflow: hidden; background: #f3f4f6; }
 pre { white-space: pre-wrap; margin: .2rem 0; } summary { cursor: pointer; } .muted { color: #6b7280; }
 .counts span { margin-right: 1rem; }
</style></head><body>
<h1>PG Background batch</h1>
<p><code id="uuid-parent">{{ batch.uuid_parent }}</code> · task <b>{{ ti.dag_id }}.{{ ti.task_id }}</b>{% if ti.map_index >= 0 %}[{{ ti.map_index }}]{% endif %} · run {{ ti.run_id }}
 · <a href="{{ json_url }}">JSON</a> · <a href="{{ csv_url }}">CSV</a></p>
<p>Status <span id="batch-status" class="status" style="background: {{ colours[batch.status] }}">{{ batch.status }}</span>
 · {{ batch.children }} children · cap {{ batch.max_parallel }} · elapsed {{ elapsed }}{% if active %} · <span class="muted">refreshing every 3 s</span>{% endif %}</p>
<div class="bar" title="progress">{% for s, n in batch.counts.items() if n %}<div style="width: {{ 100 * n / batch.children }}%; background: {{ colours[s] }}" title="{{ s }}: {{ n }}"></div>{% endfor %}</div>
<p class="counts">{% for s, n in batch.counts.items() %}<span><span class="status" style="background: {{ colours[s] }}">{{ s }}</span> {{ n }}</span>{% endfor %}</p>
<h2>Timeline</h2>
{% if bars %}<svg id="timeline" width="100%" viewBox="0 0 1000 {{ bars|length * 8 + 24 }}" preserveAspectRatio="none" role="img" aria-label="one bar per child across time">
 {% for b in bars %}<rect x="{{ b.x }}" y="{{ loop.index0 * 8 }}" width="{{ b.w }}" height="6" fill="{{ colours[b.status] }}"><title>#{{ b.seq }} {{ b.status }} {{ b.seconds }} s</title></rect>{% endfor %}
 <text x="0" y="{{ bars|length * 8 + 18 }}" font-size="12">0 s</text><text x="1000" y="{{ bars|length * 8 + 18 }}" font-size="12" text-anchor="end">{{ span }} s</text>
</svg>{% else %}<p class="muted">No child has started yet.</p>{% endif %}
<h2>Children{% if shown < batch.children %} <span class="muted">(first {{ shown }} of {{ batch.children }})</span>{% endif %}</h2>
<table id="children"><thead><tr><th>#</th><th>uuid_child</th><th>pid</th><th>status</th><th>query</th><th>result / error</th><th>start</th><th>end</th><th>seconds</th></tr></thead><tbody>
{% for c in children %}<tr data-status="{{ c.status }}">
 <td>{{ c.seq }}</td><td><code>{{ c.uuid_child }}</code></td><td>{{ c.pid or "" }}</td>
 <td><span class="status" style="background: {{ colours[c.status] }}">{{ c.status }}</span></td>
 <td><details><summary><code>{{ c.query[:80] }}{% if c.query|length > 80 %}…{% endif %}</code></summary><pre>{{ c.query }}</pre></details></td>
 <td>{% if c.error %}<b>{{ c.sqlstate or "" }}</b> {{ c.error }}{% elif c.result %}{{ c.result.command }}{% if c.result.preview %}<details><summary>rows</summary><pre>{{ c.preview }}</pre></details>{% endif %}{% endif %}</td>
 <td>{{ c.start or "" }}</td><td>{{ c.end or "" }}</td><td>{{ c.seconds if c.seconds is not none else "" }}</td>
</tr>{% endfor %}
</tbody></table>
</body></html>
""")

_MESSAGE = _env.from_string("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>body { font: 14px system-ui, sans-serif; margin: 1.2rem; }</style></head>
<body><h1>{{ title }}</h1><p>{{ message }}</p></body></html>
""")


def _clock(value: datetime | None) -> str | None:
    return value.astimezone(UTC).strftime("%H:%M:%S.%f")[:-3] if value else None


def render_message(title: str, message: str) -> str:
    return _MESSAGE.render(title=title, message=message)


def render_batch(
    ti: dict[str, Any], batch: dict[str, Any], children: list[dict[str, Any]], json_url: str, csv_url: str
) -> str:
    import json

    now = datetime.now(UTC)
    starts = [c["start_time_exec"] for c in children if c["start_time_exec"]]
    origin = min(starts) if starts else None
    end = max((c["end_time_exec"] or now for c in children if c["start_time_exec"]), default=origin)
    span = max((end - origin).total_seconds(), 1e-3) if origin else 0.0
    bars, rows = [], []
    for c in children:
        seconds = None
        if c["start_time_exec"]:
            stop = c["end_time_exec"] or now
            seconds = round((stop - c["start_time_exec"]).total_seconds(), 3)
            bars.append(
                {
                    "seq": c["seq"],
                    "status": c["status"],
                    "seconds": seconds,
                    "x": round(1000 * (c["start_time_exec"] - origin).total_seconds() / span, 2),
                    "w": max(round(1000 * seconds / span, 2), 1),
                }
            )
        preview = (c["result"] or {}).get("preview")
        rows.append(
            {
                **c,
                "start": _clock(c["start_time_exec"]),
                "end": _clock(c["end_time_exec"]),
                "seconds": seconds,
                "preview": json.dumps(preview, indent=1, default=str) if preview else None,
            }
        )
    return _PAGE.render(
        ti=ti,
        batch=batch,
        children=rows,
        shown=len(rows),
        bars=bars,
        colours=COLOURS,
        span=round(span, 3),
        elapsed=f"{batch['wall_seconds']:.3f} s" if batch["wall_seconds"] is not None else "-",
        active=batch["status"] in (ChildStatus.QUEUED.value, ChildStatus.RUNNING.value),
        json_url=json_url,
        csv_url=csv_url,
    )
