"""HTML of the batch console: summary, figures, an aggregated timeline and one page of children.

Jinja escapes everything the server renders; the page's script updates it in place from the JSON
endpoint while the batch runs, building rows with ``textContent`` only, and loads a child's result
preview when its row is opened. No build step, no library.
"""

from __future__ import annotations

from typing import Any

from jinja2 import Environment, StrictUndefined

from airflow_pgbg.status import CONSOLE_SORTS, ChildStatus

COLOURS = {
    ChildStatus.QUEUED.value: "#9ca3af",
    ChildStatus.RUNNING.value: "#3b82f6",
    ChildStatus.DONE.value: "#16a34a",
    ChildStatus.FAILED.value: "#dc2626",
    ChildStatus.STOPPED.value: "#d97706",
    ChildStatus.LOST.value: "#7c3aed",
}

# StrictUndefined: a name the template gets wrong is an error in the tests, not an empty cell.
_env = Environment(autoescape=True, undefined=StrictUndefined)

_SCRIPT = """
(() => {
  const state = JSON.parse(document.getElementById("console-state").textContent);
  const colours = state.colours;
  const el = (tag, text, attrs) => {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    return e;
  };
  const clock = (iso) => iso ? new Date(iso).toISOString().substring(11, 23) : "";
  const secs = (v) => v === null || v === undefined ? "" : Number(v).toFixed(3);
  const badge = (status) => el("span", status, {class: "status", style: "background: " + colours[status]});

  async function loadDetail(details) {
    const pre = details.querySelector("pre.detail");
    if (details.dataset.loaded) return;
    details.dataset.loaded = "1";
    pre.textContent = "loading…";
    try {
      const r = await fetch(state.child_url.replace("__CHILD__", details.dataset.child), {credentials: "same-origin"});
      const c = await r.json();
      if (!r.ok) { pre.textContent = c.detail || r.statusText; return; }
      const parts = ["-- query\\n" + c.query];
      if (c.result) parts.push("-- result\\n" + JSON.stringify(c.result, null, 1));
      if (c.error) parts.push("-- error " + (c.sqlstate || "") + "\\n" + c.error +
        (c.error_detail ? "\\nDETAIL: " + c.error_detail : "") + (c.error_hint ? "\\nHINT: " + c.error_hint : ""));
      if (c.errors && c.errors.length) parts.push("-- failed attempts\\n" + JSON.stringify(c.errors, null, 1));
      pre.textContent = parts.join("\\n\\n");
    } catch (e) { pre.textContent = "could not load: " + e; delete details.dataset.loaded; }
  }
  document.getElementById("children").addEventListener("toggle", (ev) => {
    if (ev.target.matches("details.child") && ev.target.open) loadDetail(ev.target);
  }, true);

  // An action token expires: it is renewed at half-life while the page is open, and before an action
  // when a timer was held back (a sleeping laptop, a background tab).
  let tokenExpires = 0, tokenMargin = 0, renewTimer = null;
  function tokenReceived(t) {
    state.actions.token = t.token;
    tokenExpires = Date.now() + t.ttl * 1000;
    tokenMargin = Math.min(5000, t.ttl * 250);
    clearTimeout(renewTimer);
    renewTimer = setTimeout(renewToken, t.ttl * 500);
  }
  async function renewToken() {
    try {
      const r = await fetch(state.actions.token_url, {credentials: "same-origin", cache: "no-store"});
      if (r.ok) {
        tokenReceived(await r.json());
        document.body.dataset.tokenRenewals = String(Number(document.body.dataset.tokenRenewals || 0) + 1);
        return;
      }
    } catch (e) { /* the API server may be restarting */ }
    clearTimeout(renewTimer);
    renewTimer = setTimeout(renewToken, 5000);
  }
  if (state.actions) tokenReceived(state.actions);

  async function act(url, body, question) {
    if (!window.confirm(question)) return;
    const out = document.getElementById("action-message");
    out.textContent = "…";
    if (Date.now() > tokenExpires - tokenMargin) await renewToken();
    try {
      const r = await fetch(url, {method: "POST", credentials: "same-origin",
        headers: {"Content-Type": "application/json", "X-Pgbg-Token": state.actions.token}, body: JSON.stringify(body)});
      const reply = await r.json();
      out.textContent = r.ok ? (reply.message || ("stopped " + reply.stopped + " (" + reply.by + ")")) : (reply.detail || r.statusText);
    } catch (e) { out.textContent = "failed: " + e; }
    refresh();
  }
  if (state.actions) {
    document.body.addEventListener("click", (ev) => {
      const b = ev.target.closest("button[data-action]"); if (!b) return;
      if (b.dataset.action === "stop-child") act(state.actions.stop_url, {child: b.dataset.child}, "Stop child #" + b.dataset.seq + "?");
      if (b.dataset.action === "stop-batch") act(state.actions.stop_url, {}, "Stop the whole batch?");
      if (b.dataset.action === "requeue") act(state.actions.requeue_url, {}, "Queue the failed, stopped and lost children again?");
    });
  }

  const progressText = (p) => p.command + ": " + p.phase + (p.percent == null ? "" : " " + Number(p.percent).toFixed(1) + "%");

  function row(c) {
    const tr = el("tr", null, {"data-status": c.status, "data-child": c.uuid_child});
    tr.append(el("td", c.seq), el("td", null), el("td", c.attempt));
    tr.children[1].append(badge(c.status));
    const q = el("td"); const d = el("details", null, {class: "child", "data-child": c.uuid_child});
    const s = el("summary"); s.append(el("code", c.query.substring(0, 80) + (c.query_length > 80 ? "…" : "")));
    d.append(s, el("pre", "", {class: "detail"})); q.append(d); tr.append(q);
    const res = el("td");
    if (c.error) { res.append(el("b", c.sqlstate || ""), document.createTextNode(" " + c.error)); }
    else if (c.command) { res.textContent = c.command; }
    else if (c.progress) { res.append(el("span", progressText(c.progress), {class: "progress"})); }
    tr.append(res, el("td", clock(c.start_time_exec)), el("td", secs(c.queue_seconds)), el("td", secs(c.seconds)),
              el("td", c.stopped_by || ""));
    if (state.actions) {
      const cell = el("td");
      if (c.status === "queued" || c.status === "running")
        cell.append(el("button", "stop", {type: "button", "data-action": "stop-child", "data-child": c.uuid_child, "data-seq": c.seq}));
      tr.append(cell);
    }
    return tr;
  }

  function render(data) {
    const b = data.batch;
    const st = document.getElementById("batch-status");
    st.textContent = b.status; st.style.background = colours[b.status];
    document.getElementById("elapsed").textContent = b.wall_seconds === null ? "-" : b.wall_seconds.toFixed(3) + " s";
    for (const [s, n] of Object.entries(b.counts)) {
      const c = document.querySelector('[data-count="' + s + '"]'); if (c) c.textContent = n;
      const seg = document.querySelector('[data-segment="' + s + '"]');
      if (seg) seg.style.width = (b.children ? 100 * n / b.children : 0) + "%";
    }
    const f = data.figures || {};
    for (const k of ["run_p50", "run_p95", "queue_wait_p50", "queue_wait_p95", "per_second"]) {
      const e = document.querySelector('[data-figure="' + k + '"]'); if (e) e.textContent = f[k] == null ? "-" : Number(f[k]).toFixed(3);
    }
    drawTimeline(f);
    document.getElementById("matching").textContent = data.view.matching;
    const body = document.querySelector("#children tbody");
    const open = new Set([...body.querySelectorAll("details.child[open]")].map(d => d.dataset.child));
    const loaded = new Map([...body.querySelectorAll("details.child[data-loaded]")].map(d => [d.dataset.child, d.querySelector("pre").textContent]));
    const rows = data.children.map(row);
    body.replaceChildren(...rows);
    for (const d of body.querySelectorAll("details.child")) {
      if (loaded.has(d.dataset.child)) { d.querySelector("pre").textContent = loaded.get(d.dataset.child); d.dataset.loaded = "1"; }
      if (open.has(d.dataset.child)) { d.open = true; if (!d.dataset.loaded) loadDetail(d); }
    }
    document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
    return b.status === "queued" || b.status === "running";
  }

  function drawTimeline(f) {
    const svg = document.getElementById("timeline"); if (!svg) return;
    const bins = f.bins || []; const peak = Math.max(1, ...bins.map(b => b[0]));
    svg.dataset.peak = String(Math.max(0, ...bins.map(b => b[0])));
    const w = 1000 / Math.max(1, bins.length); const h = 120;
    const NS = "http://www.w3.org/2000/svg"; const g = [];
    bins.forEach((b, i) => {
      const r = document.createElementNS(NS, "rect");
      const height = h * b[0] / peak;
      r.setAttribute("x", (i * w).toFixed(2)); r.setAttribute("width", Math.max(w - 1, 1).toFixed(2));
      r.setAttribute("y", (h - height).toFixed(2)); r.setAttribute("height", height.toFixed(2));
      r.setAttribute("fill", colours.running);
      const t = document.createElementNS(NS, "title"); t.textContent = b[0] + " running, " + b[1] + " ended"; r.append(t);
      g.push(r);
    });
    svg.replaceChildren(...g);
    const label = document.getElementById("timeline-span");
    if (label) label.textContent = f.started ? Number(f.span_seconds).toFixed(3) + " s, peak " + svg.dataset.peak + " running" : "";
  }

  drawTimeline(state.figures);
  let timer = null;
  const tick = async () => {
    timer = null;
    try {
      const r = await fetch(state.json_url, {credentials: "same-origin"});
      if (r.ok && !render(await r.json())) return;  // the batch ended: one last render
    } catch (e) { /* the API server may be restarting: try again */ }
    timer = setTimeout(tick, 2000);
  };
  function refresh() { if (timer) clearTimeout(timer); tick(); }
  if (state.active) timer = setTimeout(tick, 2000);
})();
"""

_PAGE = _env.from_string(
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>PG Background batch {{ batch.uuid_parent }}</title>
<style>
 body { font: 14px system-ui, sans-serif; margin: 1.2rem; color: #111827; }
 table { border-collapse: collapse; width: 100%; } th, td { border-bottom: 1px solid #e5e7eb; padding: .3rem .5rem; text-align: left; vertical-align: top; }
 .status { padding: 0 .4rem; border-radius: .3rem; color: #fff; font-weight: 600; }
 .bar { display: flex; height: 14px; width: 100%; max-width: 40rem; border-radius: 7px; overflow: hidden; background: #f3f4f6; }
 pre { white-space: pre-wrap; margin: .2rem 0; max-height: 30rem; overflow: auto; } summary { cursor: pointer; } .muted { color: #6b7280; }
 .counts span, .figures span { margin-right: 1rem; } form.filters { display: flex; gap: .6rem; flex-wrap: wrap; align-items: end; margin: .6rem 0; }
 form.filters label { display: flex; flex-direction: column; font-size: 12px; color: #374151; }
</style></head><body>
<h1>PG Background batch</h1>
<p><code id="uuid-parent">{{ batch.uuid_parent }}</code> · task <b>{{ ti.dag_id }}.{{ ti.task_id }}</b>{% if ti.map_index >= 0 %}[{{ ti.map_index }}]{% endif %} · run {{ ti.run_id }}
 · <a href="{{ json_url }}">JSON</a> · <a href="{{ csv_url }}">CSV (all children)</a></p>
<p>Status <span id="batch-status" class="status" style="background: {{ colours[batch.status] }}">{{ batch.status }}</span>
 · {{ batch.children }} children · cap {{ batch.max_parallel }} · elapsed <span id="elapsed">{{ elapsed }}</span>{% if active %} · <span class="muted">updating live</span>{% endif %}</p>
{% if batch.settings %}<p class="muted" id="batch-settings">settings {% for name, value in batch.settings|dictsort %}<code>{{ name }} = {{ value }}</code>{% if not loop.last %} · {% endif %}{% endfor %}</p>{% endif %}
{% if batch.notes %}<p class="muted" id="batch-notes">{{ batch.notes }}</p>{% endif %}
{% if actions %}<p id="actions"><button type="button" data-action="stop-batch">Stop the batch</button>
 <button type="button" data-action="requeue">Re-queue failed, stopped and lost</button> <span id="action-message" class="muted"></span></p>{% endif %}
<div class="bar" title="progress">{% for s, n in batch.counts.items() %}<div data-segment="{{ s }}" style="width: {{ (100 * n / batch.children) if batch.children else 0 }}%; background: {{ colours[s] }}" title="{{ s }}"></div>{% endfor %}</div>
<p class="counts">{% for s, n in batch.counts.items() %}<span><a href="{{ status_links[s] }}"><span class="status" style="background: {{ colours[s] }}">{{ s }}</span></a> <span data-count="{{ s }}">{{ n }}</span></span>{% endfor %}
 {% if problems %}<a id="problems" href="{{ problems_link }}">show the {{ problems }} failed, stopped and lost</a>{% endif %}</p>
<p class="figures">{% for key, label in figure_labels %}<span>{{ label }} <b data-figure="{{ key }}">{{ "%.3f"|format(figures[key]) if figures.get(key) is not none else "-" }}</b></span>{% endfor %}</p>
<h2>Timeline <span class="muted" id="timeline-span"></span></h2>
<svg id="timeline" width="100%" height="120" viewBox="0 0 1000 120" preserveAspectRatio="none" role="img" aria-label="children running over time"></svg>
<h2>Children <span class="muted">(<span id="matching">{{ view.matching }}</span> matching; page {{ view.page }} of {{ view.pages }})</span></h2>
<form class="filters" method="get">
 <input type="hidden" name="map_index" value="{{ ti.map_index }}">
 <label>status<select name="status"><option value="">any</option>{% for s in statuses %}<option value="{{ s }}"{% if view.status == [s] %} selected{% endif %}>{{ s }}</option>{% endfor %}
  <option value="failed,stopped,lost"{% if view.status == ["failed", "stopped", "lost"] %} selected{% endif %}>failed, stopped, lost</option></select></label>
 <label>query contains<input name="q" value="{{ view.q or "" }}"></label>
 <label>SQLSTATE<input name="sqlstate" size="6" value="{{ view.sqlstate or "" }}"></label>
 <label>sort<select name="sort">{% for s in sorts %}<option{% if view.sort == s %} selected{% endif %}>{{ s }}</option>{% endfor %}</select></label>
 <label>order<select name="order"><option{% if view.order == "asc" %} selected{% endif %}>asc</option><option{% if view.order == "desc" %} selected{% endif %}>desc</option></select></label>
 <label>per page<input name="per_page" size="4" value="{{ view.per_page }}"></label>
 <button type="submit">Show</button>
 {% if prev_link %}<a href="{{ prev_link }}">← previous</a>{% endif %} {% if next_link %}<a id="next-page" href="{{ next_link }}">next →</a>{% endif %}
</form>
<table id="children"><thead><tr><th>#</th><th>status</th><th>attempt</th><th>query (open for the whole child)</th><th>result / error</th><th>start</th><th>queued s</th><th>run s</th><th>stopped by</th>{% if actions %}<th></th>{% endif %}</tr></thead><tbody>
{% for c in children %}<tr data-status="{{ c.status }}" data-child="{{ c.uuid_child }}">
 <td>{{ c.seq }}</td><td><span class="status" style="background: {{ colours[c.status] }}">{{ c.status }}</span></td><td>{{ c.attempt }}</td>
 <td><details class="child" data-child="{{ c.uuid_child }}"><summary><code>{{ c.query[:80] }}{% if c.query_length > 80 %}…{% endif %}</code></summary><pre class="detail"></pre></details></td>
 <td>{% if c.error %}<b>{{ c.sqlstate or "" }}</b> {{ c.error }}{% elif c.command %}{{ c.command }}{% elif c.progress %}<span class="progress">{{ c.progress.command }}: {{ c.progress.phase }}{% if c.progress.percent is not none %} {{ "%.1f"|format(c.progress.percent) }}%{% endif %}</span>{% endif %}</td>
 <td>{{ c.start or "" }}</td><td>{{ "%.3f"|format(c.queue_seconds) if c.queue_seconds is not none else "" }}</td>
 <td>{{ "%.3f"|format(c.seconds) if c.seconds is not none else "" }}</td><td>{{ c.stopped_by or "" }}</td>
 {% if actions %}<td>{% if c.status in ("queued", "running") %}<button type="button" data-action="stop-child" data-child="{{ c.uuid_child }}" data-seq="{{ c.seq }}">stop</button>{% endif %}</td>{% endif %}
</tr>{% endfor %}
</tbody></table>
<script type="application/json" id="console-state">{{ state_json }}</script>
<script>{{ script }}</script>
</body></html>
"""
)

_MESSAGE = _env.from_string("""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>body { font: 14px system-ui, sans-serif; margin: 1.2rem; }</style></head>
<body><h1>{{ title }}</h1><p>{{ message }}</p></body></html>
""")

FIGURE_LABELS = (
    ("run_p50", "run p50 s"),
    ("run_p95", "run p95 s"),
    ("queue_wait_p50", "queue wait p50 s"),
    ("queue_wait_p95", "queue wait p95 s"),
    ("per_second", "children/s"),
)


def render_message(title: str, message: str) -> str:
    return _MESSAGE.render(title=title, message=message)


def _script_json(value: Any) -> str:
    """JSON for a <script type="application/json"> block: nothing in it can close the element."""
    import json

    from markupsafe import Markup

    text = json.dumps(value, default=str).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return Markup(text)


def render_batch(
    data: dict[str, Any],
    *,
    json_url: str,
    csv_url: str,
    child_url: str,
    links: dict[str, Any],
    actions: dict[str, Any] | None = None,
) -> str:
    """The console; ``actions`` (URLs and the anti-forgery token) only for users who may edit the task."""
    from markupsafe import Markup

    batch = data["batch"]
    active = batch["status"] in (ChildStatus.QUEUED.value, ChildStatus.RUNNING.value)
    counts = batch["counts"]
    problems = sum(counts.get(s, 0) for s in ("failed", "stopped", "lost"))
    rows = [
        {
            **c,
            "start": c["start_time_exec"].strftime("%H:%M:%S.%f")[:-3] if c["start_time_exec"] else None,
            "seconds": c["run_seconds"],
        }
        for c in data["children_rows"]
    ]
    return _PAGE.render(
        ti=data["task_instance"],
        batch=batch,
        view=data["view"],
        figures=data["figures"],
        figure_labels=FIGURE_LABELS,
        children=rows,
        colours=COLOURS,
        statuses=[s.value for s in ChildStatus],
        sorts=CONSOLE_SORTS,
        problems=problems,
        elapsed=f"{batch['wall_seconds']:.3f} s" if batch["wall_seconds"] is not None else "-",
        active=active,
        json_url=json_url,
        csv_url=csv_url,
        status_links=links["status"],
        problems_link=links["problems"],
        prev_link=links.get("prev"),
        next_link=links.get("next"),
        state_json=_script_json(
            {
                "json_url": json_url,
                "child_url": child_url,
                "colours": COLOURS,
                "active": active,
                "figures": data["figures"],
                "actions": actions,
            }
        ),
        actions=actions,
        script=Markup(_SCRIPT),
    )
