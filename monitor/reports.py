"""Incident reports: one self-contained HTML page per incident, plots as inline SVG.

What on-call opens from an alert's link (``/incidents/<id>`` on the daemon's HTTP
server): what fired and how strongly, since when, for which model version; the
reference against the current distribution of the features that moved most; and the
incident's metric over time with the windows that fired.

Pure: incidents in, a string out (no I/O, no clock unless given, no JavaScript, no
external assets), so a page renders the same in a browser, in an MLflow artifact
view (issue #5) and in a test. Every text that comes from data (feature names,
categories, summaries: they come from producers' events) is escaped.
"""

from __future__ import annotations

import datetime as dt
import html
import itertools
import math
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from monitor.incidents import Incident

__all__ = ["bin_labels", "incident_path", "render_index", "render_report", "svg_distribution", "svg_series"]

#: Drifting features of the same model shown besides the incident's own.
MAX_RELATED = 5
_REF, _CUR, _FIRE = "#4c78a8", "#e45756", "#e45756"

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem;max-width:70rem;color:#222}
h1{font-size:1.4rem;margin-bottom:.2rem} h2{font-size:1.1rem;margin-top:2rem}
.badge{display:inline-block;padding:.1rem .5rem;border-radius:.3rem;color:#fff;font-size:.85rem}
.firing{background:#c0392b} .resolved{background:#27ae60} .warning{background:#d68910}
.critical{background:#922b21} .info{background:#2471a3}
table{border-collapse:collapse;margin:.5rem 0} td,th{border:1px solid #ddd;padding:.25rem .6rem;
text-align:left;font-size:.9rem} th{background:#f4f4f4} .muted{color:#777;font-size:.85rem}
svg{background:#fff;border:1px solid #eee;margin:.5rem 0}
"""


def incident_path(incident_id: str) -> str:
    """The report page of an incident on the daemon's HTTP server (stable: the id is).

    >>> incident_path("feature_drift/ctr/f.age@1767225660000")
    '/incidents/feature_drift/ctr/f.age@1767225660000'
    """
    return "/incidents/" + urllib.parse.quote(incident_id, safe="/@:")


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _iso(ms: int | None) -> str:
    if ms is None:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _num(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return _e(v)
    if isinstance(v, float) and not math.isfinite(v):
        return _e(v)
    return _e(f"{v:.4g}")


def bin_labels(evidence: Mapping[str, Any]) -> list[str] | None:
    """Labels of the bins in a drift evidence: ``<=e0``, ``(e0, e1]``, ..., ``>ek`` for
    numbers (right-closed, as monitor/stats/profile.py counts), the categories otherwise.

    >>> bin_labels({"edges": [1.0, 2.5], "reference_counts": [1, 2, 3]})
    ['≤1', '(1, 2.5]', '>2.5']
    """
    cats = evidence.get("categories")
    if isinstance(cats, list):
        return [str(c) for c in cats]
    edges = evidence.get("edges")
    if not isinstance(edges, list):
        return None
    e = [f"{float(x):.4g}" for x in edges]
    if not e:
        return ["all"]
    return [f"≤{e[0]}", *[f"({a}, {b}]" for a, b in itertools.pairwise(e)], f">{e[-1]}"]


def svg_distribution(title: str, labels: Sequence[str], reference: Sequence[float],
                     window: Sequence[float], *, width: int = 680, height: int = 260) -> str:
    """Grouped bars: each bin's share of the reference (blue) and of the window (red)."""
    n = len(labels)
    if n == 0 or len(reference) != n or len(window) != n:
        return ""
    rt, wt = float(sum(reference)) or 1.0, float(sum(window)) or 1.0
    rp = [float(c) / rt for c in reference]
    wp = [float(c) / wt for c in window]
    top = max([*rp, *wp, 1e-9])
    left, right, head, foot = 48, 12, 28, 70
    pw, ph = width - left - right, height - head - foot
    slot = pw / n
    bar = max(1.0, slot * 0.38)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'role="img" aria-label="{_e(title)}">',
           f'<text x="{left}" y="16" font-size="13" font-weight="bold">{_e(title)}</text>',
           f'<rect x="{width - 230}" y="6" width="10" height="10" fill="{_REF}"/>'
           f'<text x="{width - 216}" y="15" font-size="11">reference</text>'
           f'<rect x="{width - 150}" y="6" width="10" height="10" fill="{_CUR}"/>'
           f'<text x="{width - 136}" y="15" font-size="11">current window</text>']
    for k in range(5):
        v = top * k / 4
        y = head + ph - ph * k / 4
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">'
                   f'{v:.0%}</text>')
    for i, label in enumerate(labels):
        x0 = left + i * slot + slot / 2 - bar
        for j, (p, color) in enumerate(((rp[i], _REF), (wp[i], _CUR))):
            h = ph * p / top
            out.append(f'<rect x="{x0 + j * bar:.1f}" y="{head + ph - h:.1f}" width="{bar:.1f}" '
                       f'height="{h:.1f}" fill="{color}"><title>{_e(label)}: '
                       f'{"reference" if j == 0 else "window"} {p:.2%}</title></rect>')
        tx, ty = left + i * slot + slot / 2, head + ph + 12
        short = label if len(label) <= 18 else label[:17] + "…"
        out.append(f'<text x="{tx:.1f}" y="{ty:.1f}" font-size="10" text-anchor="end" '
                   f'transform="rotate(-35 {tx:.1f} {ty:.1f})">{_e(short)}</text>')
    out.append(f'<line x1="{left}" x2="{left + pw}" y1="{head + ph}" y2="{head + ph}" stroke="#999"/>')
    out.append("</svg>")
    return "".join(out)


def svg_series(title: str, points: Sequence[Sequence[Any]], fired: Sequence[Sequence[int]], *,
               width: int = 680, height: int = 240) -> str:
    """The metric per evaluation (``[end_ms, value | None, firing]``), firing ones in red,
    with the windows that fired (``[start_ms, end_ms]``) shaded."""
    pts = [(int(p[0]), None if p[1] is None else float(p[1]), bool(p[2])) for p in points
           if len(p) >= 3]
    vals = [v for _, v, _ in pts if v is not None and math.isfinite(v)]
    if not pts or not vals:
        return ""
    times = [t for t, _, _ in pts] + [int(w[0]) for w in fired] + [int(w[1]) for w in fired]
    t0, t1 = min(times), max(times)
    t1 = t1 if t1 > t0 else t0 + 1
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12:
        lo, hi = lo - (abs(lo) * 0.1 or 1.0), hi + (abs(hi) * 0.1 or 1.0)
    left, right, head, foot = 56, 12, 28, 34
    pw, ph = width - left - right, height - head - foot

    def x(t: int) -> float:
        return left + pw * (t - t0) / (t1 - t0)

    def y(v: float) -> float:
        return head + ph - ph * (v - lo) / (hi - lo)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'role="img" aria-label="{_e(title)}">',
           f'<text x="{left}" y="16" font-size="13" font-weight="bold">{_e(title)}</text>']
    for s, e in fired:
        xs, xe = x(int(s)), x(int(e))
        out.append(f'<rect x="{xs:.1f}" y="{head}" width="{max(1.0, xe - xs):.1f}" height="{ph}" '
                   f'fill="{_FIRE}" fill-opacity="0.12"><title>fired: {_e(_iso(int(s)))} to '
                   f'{_e(_iso(int(e)))}</title></rect>')
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        yy = y(v)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#eee"/>'
                   f'<text x="{left - 4}" y="{yy + 4:.1f}" font-size="10" text-anchor="end">'
                   f'{v:.3g}</text>')
    line = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v, _ in pts if v is not None and math.isfinite(v))
    out.append(f'<polyline points="{line}" fill="none" stroke="#555" stroke-width="1.5"/>')
    for t, v, firing in pts:
        if v is None or not math.isfinite(v):
            continue
        color = _FIRE if firing else "#888"
        out.append(f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="3" fill="{color}"><title>'
                   f'{_e(_iso(t))}: {v:.4g}{" (fired)" if firing else ""}</title></circle>')
    out.append(f'<text x="{left}" y="{height - 8}" font-size="10">{_e(_iso(t0))}</text>'
               f'<text x="{left + pw}" y="{height - 8}" font-size="10" text-anchor="end">'
               f'{_e(_iso(t1))}</text></svg>')
    return "".join(out)


def _metric_name(inc: Incident) -> str:
    ev = inc.evidence or inc.opening_evidence
    for key, name in (("psi", "PSI"), ("value", inc.subject.split(":")[-1].replace("_", " ")),
                      ("observed", inc.subject), ("window_rate", "window rate")):
        if key in ev:
            return name
    return "metric"


def _facts_table(inc: Incident) -> str:
    keys = [k for k in {**inc.opening_evidence, **inc.evidence}
            if not isinstance((inc.evidence.get(k, inc.opening_evidence.get(k))), list | dict)]
    if not keys:
        return ""
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_num(inc.opening_evidence.get(k, ''))}</td>"
                   f"<td>{_num(inc.evidence.get(k, ''))}</td></tr>" for k in keys)
    return ("<table><tr><th>statistic</th><th>when it opened</th><th>latest firing window</th></tr>"
            f"{rows}</table>")


def _distribution(inc: Incident) -> str:
    ev = inc.evidence or inc.opening_evidence
    labels = bin_labels(ev)
    ref, win = ev.get("reference_counts"), ev.get("window_counts")
    if labels is None or not isinstance(ref, list) or not isinstance(win, list):
        return ""
    psi = ev.get("psi")
    title = f"{inc.subject}: reference vs current" + (
        f" (PSI {psi:.3f})" if isinstance(psi, int | float) else "")
    return svg_distribution(title, labels, ref, win)


def render_report(inc: Incident, *, related: Sequence[Incident] = (), source: str = "",
                  generated_ms: int | None = None) -> str:
    """The HTML page of one incident.

    Args:
        inc: the incident (its evidence, history and fired windows).
        related: other incidents (any model); the drifting features of the same
            model, open while this one was, with the largest PSI are plotted too
            ("what else moved").
        source: the consumer group, shown for context.
        generated_ms: shown as the page's time (omitted when None).
    """
    ev = inc.evidence or inc.opening_evidence
    version = ev.get("version")
    status_cls = "resolved" if inc.status == "resolved" else "firing"
    parts = [
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{_e(inc.kind)} {_e(inc.subject)} on {_e(inc.model)} - driftloop</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<p class=\"muted\"><a href=\"/incidents\">all incidents</a> · driftloop {_e(source)}</p>",
        f"<h1>{_e(inc.kind.replace('_', ' '))}: {_e(inc.subject)} on {_e(inc.model)}"
        f"{' v' + _e(version) if version else ''}</h1>",
        f"<p><span class=\"badge {status_cls}\">{_e(inc.status)}</span> "
        f"<span class=\"badge {_e(inc.severity)}\">{_e(inc.severity)}</span></p>",
        f"<p>{_e(inc.summary or inc.fingerprint)}</p>",
        "<table>",
        f"<tr><th>incident</th><td><code>{_e(inc.id)}</code></td></tr>",
        f"<tr><th>since</th><td>{_e(_iso(inc.opened_ms))}</td></tr>",
        f"<tr><th>latest evaluation</th><td>{_e(_iso(inc.updated_ms))}</td></tr>",
        f"<tr><th>resolved</th><td>{_e(_iso(inc.resolved_ms))}</td></tr>",
        f"<tr><th>model version</th><td>{_e(version or '-')}</td></tr>",
        f"<tr><th>firing evaluations</th><td>{inc.firing_evaluations}</td></tr>",
        f"<tr><th>reference</th><td>{_e(ev.get('reference', ev.get('reference_source', '-')))}</td></tr>",
        "</table>",
        "<p class=\"muted\">Times are event time: the end of the window the evidence is about.</p>",
    ]
    series = svg_series(f"{_metric_name(inc)} per evaluation (shaded: windows that fired)",
                        inc.history, inc.windows)
    parts.append("<h2>Over time</h2>")
    parts.append(series or "<p class=\"muted\">No per-evaluation history recorded.</p>")
    own = _distribution(inc)
    end = inc.resolved_ms if inc.resolved_ms is not None else math.inf
    others = sorted(
        (r for r in related if r.id != inc.id and r.model == inc.model
         and r.kind in ("feature_drift", "prediction_drift") and _distribution(r)
         # open at some point while this one was: they moved together
         and r.opened_ms <= end and (r.resolved_ms is None or r.resolved_ms >= inc.opened_ms)),
        key=lambda r: -float((r.evidence or r.opening_evidence).get("psi") or 0.0))[:MAX_RELATED]
    if own or others:
        parts.append("<h2>Distributions: reference vs current</h2>")
        parts.append(own)
        if others:
            parts.append(f"<p>Other features of {_e(inc.model)} that moved, largest PSI first:</p>")
            parts.extend(_distribution(r) for r in others)
    parts.append("<h2>Evidence</h2>")
    parts.append(_facts_table(inc) or "<p class=\"muted\">No statistics recorded.</p>")
    if inc.windows:
        rows = "".join(f"<tr><td>{_e(_iso(int(s)))}</td><td>{_e(_iso(int(e)))}</td></tr>"
                       for s, e in inc.windows[::-1][:20])
        parts.append(f"<h2>Windows that fired ({len(inc.windows)} kept, newest first)</h2>"
                     f"<table><tr><th>from</th><th>to</th></tr>{rows}</table>")
    if generated_ms is not None:
        parts.append(f"<p class=\"muted\">generated {_e(_iso(generated_ms))}</p>")
    parts.append("</body></html>")
    return "".join(parts)


def render_index(incidents: Sequence[Incident]) -> str:
    """A list of incidents, newest first, each linking to its report."""
    rows = "".join(
        f"<tr><td><a href=\"{_e(incident_path(i.id))}\">{_e(i.kind)} {_e(i.subject)}</a></td>"
        f"<td>{_e(i.model)}</td><td>{_e(i.severity)}</td><td>{_e(i.status)}</td>"
        f"<td>{_e(_iso(i.opened_ms))}</td></tr>" for i in incidents)
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>driftloop "
            f"incidents</title><style>{_CSS}</style></head><body><h1>Incidents</h1><table><tr>"
            "<th>what</th><th>model</th><th>severity</th><th>status</th><th>since</th></tr>"
            f"{rows}</table></body></html>")
