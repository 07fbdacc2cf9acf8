"""The main job end to end: trace -> heatmap -> LSDM edit at the located site -> evaluate
before/after -> export, ending in one self-contained ``report.html``.

``biaslens demo --out DIR [--model M]`` (``make demo`` runs it on the embedded organism).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from biaslens.evaluate.runs import BEFORE_AFTER_ROWS

__all__ = ["HEADLINE", "before_after_rows", "per_template_contrast", "run_demo", "COMMANDS"]

# the before/after table's rows (the headline first) are the library's choice
# (biaslens.evaluate.runs.BEFORE_AFTER_ROWS); HEADLINE is that table, kept under its demo name
HEADLINE = BEFORE_AFTER_ROWS


def _get(suite: dict, bench: str, metric: str):
    b = suite.get(bench) or {}
    v = b.get(metric)
    ci = (b.get("ci") or {}).get(metric)
    return v, ci


def _fmt(v, ci=None) -> str:
    if v is None:
        return "–"
    s = f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    if ci:
        s += f" [{ci[0]:.3g}, {ci[1]:.3g}]"
    return s


def before_after_rows(before: dict, after: dict) -> list[list[Any]]:
    from biaslens.report import raw

    rows = []
    for bench, metric, label, lower in HEADLINE:
        b, bci = _get(before, bench, metric)
        a, aci = _get(after, bench, metric)
        if b is None and a is None:
            continue
        change = ""
        if b is not None and a is not None:
            d = a - b
            rel = f" ({100 * d / abs(b):+.1f}%)" if b else ""
            better = (abs(a) < abs(b)) if metric == "mean_contrast" else (d < 0) == lower
            change = raw(f"<span class='{'good' if better else 'bad'}'>{d:+.4g}{rel}</span>")
        n = (after.get(bench) or before.get(bench) or {}).get("n", "")
        rows.append([label, _fmt(b, bci), _fmt(a, aci), change, n])
    return rows


def per_template_contrast(before: dict, after: dict) -> dict[str, list[dict]]:
    """``{contrast benchmark: [{"template", "before", "after", "change"}, ...]}`` for every
    stereotype contrast both suites have (signed per-template contrast,
    :func:`biaslens.evaluate.contrast.contrast_change`)."""
    from biaslens.evaluate.contrast import contrast_change
    from biaslens.evaluate.suite import CONTRASTS

    return {name: contrast_change(before[name], after[name])["per_template"]
            for name in CONTRASTS if name in before and name in after}


def run_demo(model_spec: str, out: str | Path, device: str = "cpu", dtype: str = "float32",
             force: bool = False, text: str | None = None, layers: str = "auto",
             trace_prompts_n: int = 120, limit: int | None = None,
             edit_prompts_n: int | None = None) -> dict[str, Path]:
    """Run the main job; return the paths written (report, model folder, effects, report.json).

    ``limit``: a seeded subset of each evaluation prompt set; ``edit_prompts_n``: edit with a
    balanced sample of the edit prompts and keep prompts (quick runs; default all)."""
    import biaslens
    from biaslens import jsonio
    from biaslens.edit import lsdm
    from biaslens.evaluate import perplexity, suite as default_suite
    from biaslens.evaluate.compare import headline, headline_text
    from biaslens.export import export
    from biaslens.locate import default_prompts, locate
    from biaslens.io import prepare, staging

    out = prepare(out, force)  # fail before loading a model
    t0 = time.time()
    stamp = lambda msg: print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)  # noqa: E731

    stamp(f"loading {model_spec}")
    model = biaslens.load(model_spec, device=device, dtype=dtype)

    def suite() -> dict:
        res = default_suite(model, limit=limit)
        if text:
            res["perplexity"] = perplexity(model, text)
        return res

    stamp("evaluating before the edit")
    before = suite()

    # a seeded sample of the model's edit prompts, balanced over occupations (biaslens.defaults)
    trace_prompts = default_prompts(model, max_prompts=trace_prompts_n, seed=0)
    stamp(f"tracing (noise corruption + restoration) on {len(trace_prompts)} edit prompts")
    effects = locate(model, trace_prompts, method="noise", components=("resid", "mlp", "attn"))

    stamp("LSDM edit at the located site")
    edit_layers = "auto" if layers == "auto" else [int(x) for x in layers.split(",")]
    edit, keep = None, None
    if edit_prompts_n:
        from biaslens.defaults import defaults_for

        edit, keep = defaults_for(model).edit_sample(edit_prompts_n)
    delta = lsdm(model, edit, layers=edit_layers, role="auto", effect_map=effects, keep_prompts=keep)
    site = dict(delta.info.get("site") or {})
    stamp(f"edited {', '.join(delta.names)} (site {site})")

    stamp("evaluating after the edit")
    after = suite()
    head = headline(before, after)
    stamp(f"headline: {headline_text(before, after)}")

    stamp("exporting")
    stage = staging(out, force, command="demo")  # OUT is written as one folder, renamed into place
    with stage as tmp:
        effects.save(tmp / "effects.json")
        export(model, tmp / "model", delta=delta,
               manifest={"metrics": {"before": before, "after": after}, "effects": "effects.json"})
        jsonio.write(tmp / "report.json", {"model": model_spec, "site": site, "headline": head,
                                           "per_template_contrast": per_template_contrast(before, after),
                                           "before": before, "after": after,
                                           "changed_tensors": delta.stats()})
        stamp("writing report.html")
        _write_report(tmp, model_spec, effects, site, delta, before, after)
    stamp("done")
    return {"report": out / "report.html", "model": out / "model", "effects": out / "effects.json",
            "report_json": out / "report.json"}


def _write_report(out: Path, model_spec: str, effects, site: dict, delta, before: dict,
                  after: dict) -> Path:
    """``out/report.html``: the heatmaps, the edit, before/after and the exported model."""
    from biaslens.locate.plots import effect_figures
    from biaslens.report import Report

    from biaslens.evaluate.compare import headline, per_template_rows

    rep = Report("biaslens report", f"model: {model_spec} · method: LSDM · {time.strftime('%Y-%m-%d %H:%M')}")
    head = headline(before, after)
    if head is not None:
        rep.heading("Headline: the stereotype contrast on held-out templates")
        rep.text(_headline_html(head))
        rep.text("Per template: the mean P(female form) over female-stereotyped occupations minus the "
                 "mean over male-stereotyped ones (normalised over the template's pronoun pair), on "
                 "the edit occupations × the test templates, wordings the edit never saw. A lean of "
                 "the whole template cancels; an over-correction counts as bias (mean of |contrast|). "
                 "The cut's 95% CI is a paired bootstrap over templates "
                 "(<code>biaslens.evaluate.contrast</code>).", "note")
    rep.heading("Where the bias lives (noise corruption, restoration effect / total effect)")
    rep.text(f"{effects.n_prompts} training prompts; effect of restoring each site's clean activation, "
             "normalised by the total effect and signed by each prompt's clean direction.", "note")
    for fig in effect_figures(effects):  # heatmaps, per-layer lines (and heads when traced)
        rep.figure(fig)
    rep.heading("The edit")
    top = effects.top_sites(k=5, component="mlp")
    rep.table(["top MLP sites", "layer", "role", "effect", "95% CI"],
              [[i + 1, s.layer, s.role, f"{s.effect:.3f}", f"[{s.ci_low:.3f}, {s.ci_high:.3f}]"]
               for i, s in enumerate(top)])
    rep.text(f"LSDM edited layers <b>{site.get('layers')}</b> with keys at role <b>{site.get('role')}</b>. "
             "Changed tensors:")
    rep.table(["tensor", "shape", "‖ΔW‖", "relative"],
              [[s["name"], "×".join(map(str, s["shape"])), f"{s['l2']:.4g}", f"{s['relative_l2']:.3%}"]
               for s in delta.stats()])
    rep.heading("Before and after (95% bootstrap CIs; n = items)")
    rep.table(["metric", "before", "after", "change", "n"], before_after_rows(before, after))
    rep.figure(_bar_figure(before, after))
    per = per_template_rows(before, after)
    if per:
        rep.heading("Stereotype contrast per held-out template")
        rep.text("Signed: positive leans the way the occupation statistics lean, negative is "
                 "reversed.", "note")
        rep.table(["template", "before", "after", "change"], per)
    rep.heading("Exported model")
    rep.text("<code>model/</code> loads with <code>transformers.AutoModelForCausalLM"
             ".from_pretrained</code>; <code>delta.safetensors</code> holds the change and "
             "<code>manifest.json</code> what was changed and why.")
    return rep.write(out / "report.html")


def _headline_html(head: dict) -> str:
    """Before → after with CIs and the relative cut with its CI, as one HTML sentence."""
    def pct(x):
        return "n/a" if x is None or x != x else f"{100 * x:.0f}%"

    ci = head["ci"]
    cut = head["cut"]
    cls = "good" if cut == cut and cut > 0 else "bad"
    return (f"mean |contrast| <b>{_fmt(head['before'], ci['before'])}</b> before → "
            f"<b>{_fmt(head['after'], ci['after'])}</b> after: "
            f"<span class='{cls}'><b>cut {pct(cut)}</b></span> (95% CI {pct(ci['cut'][0])} to "
            f"{pct(ci['cut'][1])}) over {head['n']} held-out templates.")


def _bar_figure(before: dict, after: dict):
    import plotly.graph_objects as go

    labels, b, a = [], [], []
    for bench, metric, label, _ in HEADLINE:
        vb, _ = _get(before, bench, metric)
        va, _ = _get(after, bench, metric)
        if vb is None or va is None or bench == "perplexity":
            continue
        where = " (held-out)" if "test templates" in label else (
            " (validation)" if "validation templates" in label else "")
        labels.append(label.split(",")[0].replace(" (mean |contrast| over templates)", "") + where)
        b.append(vb)
        a.append(va)
    fig = go.Figure([go.Bar(name="before", x=labels, y=b), go.Bar(name="after", x=labels, y=a)])
    fig.update_layout(barmode="group", height=420, margin=dict(t=30, b=140),
                      title="Bias and retention before and after the edit")
    return fig


def _args(p: argparse.ArgumentParser) -> None:
    from biaslens.cliargs import layer_list, positive_int

    p.add_argument("--out", required=True, help="output folder for report.html, model/, effects.json")
    p.add_argument("--model", default="organism", help="model spec (default: the embedded organism)")
    p.add_argument("--layers", type=layer_list, default="auto",
                   help="edit layers: auto (from the trace) or e.g. 1,2")
    p.add_argument("--text", default=None, help="general text file for perplexity (default: the "
                                                "model's, see biaslens.defaults)")
    p.add_argument("--max-prompts", type=positive_int, default=120, help="tracing prompts (a balanced sample)")
    p.add_argument("--edit-prompts", type=positive_int, default=None,
                   help="edit with a balanced sample of this many prompts (default: all edit prompts)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="evaluate a seeded subset of this many items per prompt set (quick runs)")
    p.add_argument("--force", action="store_true", help="replace an output folder that biaslens wrote (never a folder holding your files)")


def _run(args) -> int:
    paths = run_demo(args.model, args.out, device=args.device, dtype=args.dtype, force=args.force,
                     text=args.text, layers=args.layers, trace_prompts_n=args.max_prompts,
                     limit=args.limit, edit_prompts_n=args.edit_prompts)
    print("\nbiaslens demo finished:")
    for k, v in paths.items():
        print(f"  {k:<12} {v}")
    return 0


COMMANDS = {"demo": ("run trace -> heatmap -> LSDM edit -> evaluate -> export, with report.html",
                     _args, _run)}
