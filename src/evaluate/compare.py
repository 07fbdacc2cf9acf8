"""Before/after tables and plotly charts of evaluation results.

Accepts an ``evaluate`` JSON (``{"model", "benchmarks": {...}}``), its ``benchmarks`` dict, or an
:func:`~biaslens.evaluate.suite` dict. A row is one metric of one benchmark (nested parts such
as ``stereoset/intrasentence`` or ``winobias/type1`` get their own rows; per-group breakdowns
``by_*``, ``per_occupation`` and ``per_template`` are left to the JSON). Integer fields without a
CI (counts, window sizes) are settings, not metrics, and are not rows.

The headline leads every table: the stereotype contrast on held-out templates
(:data:`biaslens.evaluate.suite.HEADLINE`, defined in src/evaluate/contrast.py), with its
relative cut and a paired bootstrap CI of the cut (:func:`headline`).
"""

from __future__ import annotations

import math
from typing import Any

SKIP = {"n", "ci"}
__all__ = ["flatten", "compare_rows", "compare_table", "compare_figure", "headline",
           "headline_text", "per_template_rows", "fmt_value", "fmt_ci", "SKIP"]


def _benchmarks(res: dict) -> dict:
    return res.get("benchmarks", res) if isinstance(res, dict) else {}


def flatten(res: dict) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(benchmark, metric): {"value", "ci", "n"}}`` for every numeric metric."""
    out: dict[tuple[str, str], dict[str, Any]] = {}

    def walk(name: str, r: dict) -> None:
        ci = r.get("ci", {}) or {}
        for k, v in r.items():
            if k in SKIP or isinstance(v, (bool, int)) and k not in ci:  # counts and settings
                continue
            if isinstance(v, (int, float)) or v is None and k in ci:
                out[(name, k)] = {"value": v, "ci": ci.get(k), "n": r.get("n")}
            elif isinstance(v, dict) and "ci" in v and not k.startswith("by_"):
                walk(f"{name}/{k}", v)

    for name, r in _benchmarks(res).items():
        if isinstance(r, dict):
            walk(name, r)
    return out


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def fmt_value(v: Any) -> str:
    x = _num(v)
    if math.isnan(x):
        return "—"
    a = abs(x)
    if a != 0 and (a >= 1e5 or a < 1e-3):
        return f"{x:.3g}"
    return f"{x:.4f}" if a < 10 else f"{x:.2f}"


def fmt_ci(ci: Any) -> str:
    return f"[{fmt_value(ci[0])}, {fmt_value(ci[1])}]" if ci else ""


def compare_rows(before: dict, after: dict) -> list[dict[str, Any]]:
    """One row per (benchmark, metric) present in either result, in before's order."""
    b, a = flatten(before), flatten(after)
    keys = list(b) + [k for k in a if k not in b]
    rows = []
    for k in keys:
        x, y = b.get(k, {}), a.get(k, {})
        vb, va = _num(x.get("value")), _num(y.get("value"))
        rel = (va - vb) / abs(vb) if vb != 0.0 and not math.isnan(vb) else float("nan")
        rows.append({"benchmark": k[0], "metric": k[1], "before": vb, "after": va,
                     "delta": va - vb, "rel": rel,
                     "ci_before": x.get("ci"), "ci_after": y.get("ci"),
                     "n_before": x.get("n"), "n_after": y.get("n")})
    return rows


def headline(before: dict, after: dict | None = None) -> dict | None:
    """The headline of one result, or of a before/after pair: the stereotype contrast on
    held-out templates (``{"benchmark", "value", "ci", "n"}``; with ``after``:
    :func:`biaslens.evaluate.contrast.contrast_change`, i.e. before, after, the relative cut with
    a paired bootstrap CI over templates, and per-template rows). None when the result has no
    contrast (e.g. ``evaluate --benchmarks`` without it)."""
    from biaslens.evaluate.suite import HEADLINE

    bench, metric = HEADLINE
    b = _benchmarks(before).get(bench)
    if not isinstance(b, dict) or b.get(metric) is None:
        return None
    if after is None:
        return {"benchmark": bench, "value": float(b[metric]), "ci": (b.get("ci") or {}).get(metric),
                "n": b.get("n")}
    a = _benchmarks(after).get(bench)
    if not isinstance(a, dict) or a.get(metric) is None:
        return None
    from biaslens.evaluate.contrast import contrast_change

    return {"benchmark": bench, **contrast_change(b, a)}


def _pct(x: Any) -> str:
    x = _num(x)
    return "—" if math.isnan(x) else f"{100 * x:.0f}%"


def headline_text(before: dict, after: dict | None = None) -> str | None:
    """One line: ``stereotype contrast on held-out templates: 0.241 [0.094, 0.386] → 0.202 [...],
    cut 16% [CI 5%, 29%] (6 templates)``; without ``after`` the value alone. None without a
    contrast."""
    h = headline(before, after)
    if h is None:
        return None
    label = "stereotype contrast on held-out templates (mean |contrast|)"
    if after is None:
        return f"{label}: {fmt_value(h['value'])} {fmt_ci(h['ci'])} ({h['n']} templates)"
    lo, hi = h["ci"]["cut"]
    return (f"{label}: {fmt_value(h['before'])} {fmt_ci(h['ci']['before'])} → {fmt_value(h['after'])} "
            f"{fmt_ci(h['ci']['after'])}, cut {_pct(h['cut'])} [CI {_pct(lo)}, {_pct(hi)}] "
            f"({h['n']} templates)")


def per_template_rows(before: dict, after: dict) -> list[list[str]]:
    """``[template, before, after, change]`` of the headline contrast per template (signed:
    positive = toward the stereotype), as strings; empty without a contrast."""
    h = headline(before, after)
    if h is None:
        return []
    return [[r["template"], fmt_value(r["before"]), fmt_value(r["after"]), f"{r['change']:+.4f}"]
            for r in h["per_template"]]


def _text_table(head: list[str], body: list[list[Any]]) -> list[str]:
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)] if body else [len(h) for h in head]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(head, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in body]
    return lines


def compare_table(before: dict, after: dict) -> str:
    """A plain-text before/after table led by the headline line (:func:`headline_text`):
    benchmark, metric, before [CI], after [CI], change, n; then the headline contrast per
    template."""
    rows = compare_rows(before, after)
    head = ["benchmark", "metric", "before", "95% CI", "after", "95% CI", "change", "change %", "n"]
    body = []
    for r in rows:
        n = r["n_after"] if r["n_after"] == r["n_before"] else f"{r['n_before']}→{r['n_after']}"
        rel = "" if math.isnan(r["rel"]) else f"{100 * r['rel']:+.1f}%"
        body.append([r["benchmark"], r["metric"], fmt_value(r["before"]), fmt_ci(r["ci_before"]),
                     fmt_value(r["after"]), fmt_ci(r["ci_after"]),
                     "—" if math.isnan(r["delta"]) else f"{r['delta']:+.4g}", rel, str(n)])
    top = headline_text(before, after)
    lines = ([f"headline: {top}", ""] if top else []) + _text_table(head, body)
    per = per_template_rows(before, after)
    if per:
        lines += ["", "stereotype contrast per held-out template (signed; + = toward the stereotype)"]
        lines += _text_table(["template", "before", "after", "change"], per)
    return "\n".join(lines)


def compare_figure(before: dict, after: dict | None = None, title: str | None = None):
    """A plotly figure: one panel per benchmark, before/after bars per metric with CI error bars
    (only ``before`` is drawn when ``after`` is None)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    sets = [("before", flatten(before))] + ([("after", flatten(after))] if after is not None else [])
    benches: list[str] = []
    for _, f in sets:
        for bench, _m in f:
            if bench not in benches:
                benches.append(bench)
    if not benches:
        raise ValueError("no numeric metrics to plot")
    fig = make_subplots(rows=len(benches), cols=1, subplot_titles=benches,
                        vertical_spacing=min(0.08, 0.5 / max(1, len(benches))))
    colors = {"before": "#7f7f7f", "after": "#1f77b4"}
    for row, bench in enumerate(benches, 1):
        for label, f in sets:
            items = [(m, v) for (b, m), v in f.items() if b == bench]
            ys = [_num(v["value"]) for _, v in items]
            hi = [(_num(v["ci"][1]) - y) if v["ci"] else 0 for (_, v), y in zip(items, ys)]
            lo = [(y - _num(v["ci"][0])) if v["ci"] else 0 for (_, v), y in zip(items, ys)]
            fig.add_trace(go.Bar(
                x=[m for m, _ in items], y=ys, name=label, marker_color=colors[label],
                legendgroup=label, showlegend=row == 1,
                error_y=dict(type="data", array=hi, arrayminus=lo, visible=True),
                hovertext=[f"n={v['n']}" for _, v in items]), row=row, col=1)
    name = lambda r: r.get("model", "") if isinstance(r, dict) else ""  # noqa: E731
    top = headline_text(before, after)
    default = ("before/after: " + " → ".join(x for x in (name(before), name(after or {})) if x)
               if after is not None else f"evaluation: {name(before)}")
    fig.update_layout(
        barmode="group", height=260 * len(benches) + 110,
        title=title or (f"{default}<br><sup>{top}</sup>" if top else default),
    )
    return fig
