"""The web view's HTML: one page per view, drawn on the server (SVG for the graph and
the health bars), with one small inline script for live backfill progress. Nothing is
loaded from elsewhere: no scripts, fonts or styles from a CDN (it works offline)."""

from __future__ import annotations

from html import escape
from typing import Any
from urllib.parse import quote

from ..store.health import STATES

__all__ = ["COLORS", "asset_page", "backfill_page", "backfills_page", "daemon_page", "graph_page", "record_page"]

COLORS = {"succeeded": "#2e9e5b", "failed": "#d64545", "missing": "#c9ced6", "stale": "#e0a030",
          "running": "#3b7dd8"}
"""The colour of each partition state (and of a record's status, by its state)."""
_STATUS_COLOR = {"success": "succeeded", "failed": "failed", "stale": "stale", "running": "running",
                 "pending": "running", "waiting_approval": "running", "cancelled": "missing",
                 "superseded": "missing"}

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2430;background:#f6f7f9}
header{background:#1d2430;color:#fff;padding:10px 20px;display:flex;gap:20px;align-items:center}
header a{color:#cfe0ff;text-decoration:none}header b{color:#fff;margin-right:10px}
main{padding:16px 20px;max-width:1400px}h1{font-size:20px;margin:4px 0 12px}h2{font-size:16px;margin:20px 0 8px}
table{border-collapse:collapse;background:#fff;width:100%}td,th{padding:5px 8px;border-bottom:1px solid #e3e6ea;
text-align:left;vertical-align:top;font-size:13px}th{background:#eef0f3}a{color:#1f5fbf}
.pill{display:inline-block;padding:1px 7px;border-radius:9px;color:#fff;font-size:12px}
.muted{color:#6b7480}pre{background:#fff;border:1px solid #e3e6ea;padding:10px;overflow:auto;font-size:12px}
.bar{background:#e3e6ea;border-radius:4px;height:14px;width:320px;overflow:hidden;display:inline-block}
.bar span{display:block;height:100%;float:left}.bar .ok{background:#2e9e5b}.bar .bad{background:#d64545}
.legend span{margin-right:14px}
.graph{background:#fff;border:1px solid #e3e6ea;overflow:auto;max-height:78vh}
"""


_ICON = ("data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'%3E%3Crect "
         "width='16' height='16' rx='3' fill='%231d2430'/%3E%3Crect x='3' y='9' width='4' height='4' "
         "fill='%232e9e5b'/%3E%3Crect x='9' y='3' width='4' height='4' fill='%233b7dd8'/%3E%3C/svg%3E")
"""The page icon, inline (nothing is fetched from elsewhere, not even /favicon.ico)."""


def _page(title: str, body: str, *, tenant: str | None) -> str:
    who = f'<span class="muted">tenant {escape(tenant)}</span>' if tenant else ""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<meta name=viewport content='width=device-width'><title>{escape(title)} · FlowStone</title>"
        f"<link rel=icon href=\"{_ICON}\">"
        f"<style>{_STYLE}</style></head><body><header><b>FlowStone</b><a href='/'>Graph</a>"
        f"<a href='/backfills'>Backfills</a><a href='/daemon'>Daemon</a>{who}</header>"
        f"<main>{body}</main></body></html>"
    )


def _pill(status: str) -> str:
    color = COLORS[_STATUS_COLOR.get(status, status) if status not in COLORS else status]
    return f'<span class="pill" style="background:{color}">{escape(status)}</span>'


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _asset_link(name: str) -> str:
    return f'<a href="/assets/{quote(name)}">{escape(name)}</a>'


def _record_link(brief: dict[str, Any] | None, text: str | None = None) -> str:
    if brief is None:
        return '<span class="muted">none</span>'
    label = text or (brief["partition"] or brief["id"][:8])
    return f'<a href="/records/{brief["id"]}">{escape(label)}</a> {_pill(brief["status"])}'


# ------------------------------------------------------------------- graph

NODE_W, NODE_H, GAP_X, GAP_Y, PAD = 170, 30, 70, 14, 16


def graph_svg(graph: dict[str, Any]) -> str:
    """The asset graph laid out by layer: a column per layer, left to right."""
    where: dict[str, tuple[int, int]] = {}
    for column, layer in enumerate(graph["layers"]):
        for row, name in enumerate(sorted(layer)):
            where[name] = (PAD + column * (NODE_W + GAP_X), PAD + row * (NODE_H + GAP_Y))
    width = PAD * 2 + max(1, len(graph["layers"])) * (NODE_W + GAP_X) - GAP_X
    height = PAD * 2 + max((len(layer) for layer in graph["layers"]), default=1) * (NODE_H + GAP_Y) - GAP_Y
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="asset graph" font-family="system-ui,sans-serif" font-size="12">']
    for up, down in graph["edges"]:
        (x1, y1), (x2, y2) = where[up], where[down]
        sx, sy, ex, ey = x1 + NODE_W, y1 + NODE_H / 2, x2, y2 + NODE_H / 2
        mid = (sx + ex) / 2
        parts.append(f'<path d="M{sx},{sy} C{mid},{sy} {mid},{ey} {ex},{ey}" fill="none" stroke="#9aa3ae" '
                     f'stroke-width="1.2" class="edge" data-from="{escape(up)}" data-to="{escape(down)}"/>')
    for asset in graph["assets"]:
        x, y = where[asset["name"]]
        name = asset["name"]
        label = name if len(name) <= 22 else name[:21] + "…"
        fill = "#eaf1fd" if asset["partitioned"] else "#fff"
        parts.append(
            f'<a href="/assets/{quote(name)}" class="node" data-asset="{escape(name)}"><title>{escape(name)}</title>'
            f'<rect x="{x}" y="{y}" width="{NODE_W}" height="{NODE_H}" rx="6" fill="{fill}" stroke="#5b6b80"/>'
            f'<text x="{x + 10}" y="{y + 19}" fill="#1d2430">{escape(label)}</text></a>')
    parts.append("</svg>")
    return "".join(parts)


def graph_page(graph: dict[str, Any], *, tenant: str | None) -> str:
    count = len(graph["assets"])
    body = (f"<h1>Assets</h1><p class=muted>{count} assets in {len(graph['layers'])} layers; "
            "partitioned ones are shaded. Click an asset.</p>"
            f"<div class=graph>{graph_svg(graph)}</div>")
    return _page("Assets", body, tenant=tenant)


# ------------------------------------------------------------------- asset

def health_svg(health: dict[str, Any], *, width: int = 1000, height: int = 22) -> str:
    """A bar of the partitions in key order: a segment per run of one state, or per
    group of partitions with its states stacked in proportion (many partitions). The
    grouped bar is drawn in the state most partitions are in, and only the other parts
    on it (fewer shapes)."""
    total = max(1, health["total"])
    counts = health["counts"]
    ground = max(STATES, key=lambda state: counts.get(state, 0)) if health["grouped"] else ""
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="100%" height="{height}" viewBox="0 0 {width} '
             f'{height}" preserveAspectRatio="none" role="img" aria-label="partition health" class="health">']
    if ground:
        parts.append(f'<rect x="0" y="0" width="{width}" height="{height}" fill="{COLORS[ground]}" '
                     f'data-state="{ground}"/>')
    x = 0.0
    for first, last, count, inside in health["segments"]:
        if ground in inside and len(inside) == 1:
            x += width * count / total
            continue
        span = first if count == 1 else f"{first}..{last}"
        told = ", ".join(f"{n:,} {state}" for state, n in inside.items())
        parts.append(f"<g><title>{escape(str(span))} ({count:,}): {told}</title>")
        for state in STATES:
            if state in inside:
                w = width * inside[state] / total
                if state != ground:
                    parts.append(f'<rect x="{x:.2f}" y="0" width="{w:.2f}" height="{height}" '
                                 f'fill="{COLORS[state]}" data-state="{state}"/>')
                x += w
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)


def asset_page(data: dict[str, Any], *, tenant: str | None) -> str:
    health = data["health"]
    legend = "".join(f'<span><span class="pill" style="background:{COLORS[s]}">{s}</span> {n:,}</span>'
                     for s, n in health["counts"].items())
    ups = ", ".join(_asset_link(n) for n in data["depends_on"]) or '<span class="muted">none</span>'
    downs = ", ".join(_asset_link(n) for n in data["dependents"]) or '<span class="muted">none</span>'
    rows = "".join(
        f"<tr><td><a href='/records/{r['id']}'>{r['id'][:8]}</a></td><td>{escape(r['partition'] or '-')}</td>"
        f"<td>{_pill(r['status'])}</td><td>{escape((r['started_at'] or '-')[:19])}</td>"
        f"<td>{_ms(r['duration_ms'])}</td>"
        f"<td>{escape((r['error_message'] or '')[:120])}</td></tr>"
        for r in data["records"]
    )
    more = (f'<p><a href="/assets/{quote(data["asset"])}?before={data["next"]}" id=older>older records</a></p>'
            if data["next"] else "")
    body = (
        f"<h1>{escape(data['asset'])}</h1>"
        f"<p>{escape(data['description'] or '')}</p>"
        f"<p>upstream: {ups} · downstream: {downs}"
        + (f" · automation: {escape(data['automation'])}" if data["automation"] else "")
        + (f" · code version {escape(data['code_version'])}" if data["code_version"] else "") + "</p>"
        f"<h2>Partitions ({health['total']:,})</h2>{health_svg(health)}<p class=legend>{legend}"
        f"<span class=muted>as of {escape(health['as_of'][11:19])} UTC</span></p>"
        "<h2>Records, newest first</h2><table><tr><th>id</th><th>partition</th><th>status</th><th>started</th>"
        f"<th>ms</th><th>error</th></tr>{rows}</table>{more}"
    )
    return _page(data["asset"], body, tenant=tenant)


# ------------------------------------------------------------------ record

def record_page(data: dict[str, Any], *, tenant: str | None) -> str:
    r = data["record"]
    ups = "".join(f"<li>{_asset_link(u['asset'])} @ {escape(u['partition'] or '-')}: {_record_link(u['record'])}</li>"
                  for u in data["upstream"]) or '<li class="muted">none: it reads no other asset</li>'
    downs = "".join(f"<li>{_asset_link(d['asset'])} @ {escape(d['partition'] or '-')}: {_record_link(d['record'])}</li>"
                    for d in data["downstream"]) or '<li class="muted">nothing built on it yet</li>'
    fields = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in r.items()
                     if k not in ("error_traceback", "upstream_partitions", "metadata") and v is not None)
    trace = f"<h2>Traceback</h2><pre>{escape(r['error_traceback'])}</pre>" if r["error_traceback"] else ""
    where = f" @ {r['partition']}" if r["partition"] else ""
    body = (
        f"<h1>{_asset_link(r['asset'])}{escape(where)} {_pill(r['status'])}</h1>"
        f"<h2>Built from (upstream)</h2><ul id=upstream>{ups}</ul>"
        f"<h2>Built on it (downstream)</h2><ul id=downstream>{downs}</ul>"
        f"{trace}<h2>Record</h2><table>{fields}</table>"
    )
    return _page(f"{r['asset']}{where}", body, tenant=tenant)


# --------------------------------------------------------------- backfills

def _progress(b: dict[str, Any]) -> str:
    """Succeeded (green) then failed or cancelled (red) of the total."""
    total = b["total"] or 1
    ok, bad = 100.0 * b["succeeded"] / total, 100.0 * (b["failed"] + b["cancelled"]) / total
    return (f'<span class="bar"><span class="ok" style="width:{ok:.1f}%"></span>'
            f'<span class="bad" style="width:{bad:.1f}%"></span></span> '
            f'<span class="count">{b["succeeded"]:,} succeeded, {b["failed"]:,} failed of {b["total"]:,}</span>')


def backfills_page(data: dict[str, Any], *, tenant: str | None) -> str:
    rows = "".join(
        f"<tr><td><a href='/backfills/{b['id']}'>{b['id'][:8]}</a></td><td>{_asset_link(b['asset'])}</td>"
        f"<td>{escape('interrupted' if b['interrupted'] else b['state'])}</td><td>{_progress(b)}</td>"
        f"<td>{escape((b['started_at'] or '-')[:19])}</td></tr>"
        for b in data["backfills"]
    ) or "<tr><td colspan=5 class=muted>no backfills yet</td></tr>"
    more = f'<p><a href="/backfills?offset={data["next"]}" id=older>older backfills</a></p>' if data["next"] else ""
    body = ("<h1>Backfills</h1><table><tr><th>id</th><th>asset</th><th>state</th><th>progress</th>"
            f"<th>started</th></tr>{rows}</table>{more}")
    return _page("Backfills", body, tenant=tenant)


_LIVE = """<script>
(function(){var src=new EventSource(location.pathname.replace('/backfills/','/api/backfills/')+'/events');
src.onmessage=function(e){var b=JSON.parse(e.data),t=b.total||1;
document.querySelector('#progress .ok').style.width=(100*b.succeeded/t)+'%';
document.querySelector('#progress .bad').style.width=(100*(b.failed+b.cancelled)/t)+'%';
document.querySelector('#progress .count').textContent=b.succeeded.toLocaleString()+' succeeded, '+
b.failed.toLocaleString()+' failed of '+b.total.toLocaleString();
document.getElementById('state').textContent=b.state;if(b.state!=='running'){src.close();}};})();
</script>"""


def backfill_page(b: dict[str, Any], *, tenant: str | None) -> str:
    errors = "".join(f"<tr><td>{escape(str(e['partition']))}</td><td>{escape(e['error'])}</td></tr>"
                     for e in b["errors"][:100])
    body = (
        f"<h1>Backfill {b['id'][:8]} of {_asset_link(b['asset'])}</h1>"
        f"<p>state: <b id=state>{escape(b['state'])}</b></p><p id=progress>{_progress(b)}</p>"
        + (f"<h2>Errors</h2><table><tr><th>partition</th><th>error</th></tr>{errors}</table>" if errors else "")
        + (_LIVE if b["state"] == "running" else "")
    )
    return _page(f"Backfill {b['id'][:8]}", body, tenant=tenant)


# ------------------------------------------------------------------ daemon

def daemon_page(data: dict[str, Any], *, tenant: str | None) -> str:
    daemon = data["daemon"]
    if daemon is None:
        beat = "no daemon has run on this store: start one with <code>flowstone daemon</code>"
    else:
        state = "active" if daemon["active"] else "quiet (its hold lapsed)"
        beat = (f"{escape(daemon['owner'])} is {state}; last heartbeat "
                f"{escape((daemon['heartbeat_at'] or 'never')[:19])}, holds until {escape(daemon['holds_until'][:19])}")
    schedules = "".join(
        f"<tr><td>{escape(s['schedule'])}</td><td>{_asset_link(s['asset'])}</td>"
        f"<td>{escape((s['last_tick'] or 'never')[:19])}</td><td>{escape(s['state'] or '-')}</td>"
        f"<td>{escape(s['next_tick'][:19])}</td><td>{escape((s['error'] or '')[:120])}</td></tr>"
        for s in data["schedules"]
    ) or "<tr><td colspan=6 class=muted>no schedules</td></tr>"
    sensors = "".join(
        f"<tr><td>{escape(s['sensor'])}</td><td>{s['interval']:g}s</td><td>{escape((s['last_call'] or 'never')[:19])}"
        f"</td><td>{escape((s['cursor'] or '-')[:60])}</td><td>{escape((s['error'] or '')[:120])}</td></tr>"
        for s in data["sensors"]
    ) or "<tr><td colspan=5 class=muted>no sensors</td></tr>"
    body = (
        f"<h1>Daemon</h1><p id=heartbeat>{beat}</p>"
        "<h2>Schedules</h2><table><tr><th>schedule</th><th>asset</th><th>last tick</th><th>state</th>"
        f"<th>next tick</th><th>error</th></tr>{schedules}</table>"
        "<h2>Sensors</h2><table><tr><th>sensor</th><th>every</th><th>last call</th><th>cursor</th>"
        f"<th>error</th></tr>{sensors}</table>"
    )
    return _page("Daemon", body, tenant=tenant)
