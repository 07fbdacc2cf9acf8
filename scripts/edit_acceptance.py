"""Acceptance of the LSDM edit on the embedded organisms (issue 15: "Edits that generalise").

For each organism (``organism``, ``organism-llama``; the same data, no special cases) the LSDM
defaults edit with the organism's template bank (training occupations × the bank's edit
templates, definitional words × the same templates as keep constraints) and tune λ, the keep
weight and the layer window on the bank's validation templates (``biaslens.edit.tune``). Measured
on what no edit or tuning saw:

* the stereotype contrast (``biaslens.evaluate.contrast``; mean |contrast| over templates) on
  training occupations × the organism's 6 held-out templates
  (``defaults_for(m).occupation_prompts("edit", "test")``), overall and per template;
* definitional accuracy, factual accuracy and perplexity from ``biaslens.evaluate.suite``.

Target (never loosened): mean |contrast| cut >= 50%, definitional and fact accuracy down <= 1
point, perplexity up <= 2%. The key variants of ``LSDMHparams.key_space`` / ``residuals`` /
``average_keys`` are measured the same way (each tuned), and for the default the best setting of
each candidate window of the tuner's sweep is re-applied to give per-site test numbers. Writes
``docs/results/edit.md`` (and ``--json``).

    python scripts/edit_acceptance.py [--models organism,organism-llama] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

NOTES = "<!-- analysis: kept when the script rewrites the tables above -->"
BOUNDS = {"contrast_cut": 0.50, "definitional_drop": 0.01, "facts_drop": 0.01, "ppl_rise": 0.02}
#: label -> LSDMHparams fields (λ, keep weight and layers are tuned in every variant)
VARIANTS = {
    "default (keys as they are)": {},
    "residuals centered": {"residuals": "centered"},
    "keys and residuals centered": {"key_space": "centered", "residuals": "centered"},
    "occupation subspace": {"key_space": "subspace"},
    "keys averaged over templates": {"average_keys": "subject"},
}


def contrast(model) -> dict:
    from biaslens.defaults import defaults_for
    from biaslens.evaluate.contrast import stereotype_contrast

    c = stereotype_contrast(model, defaults_for(model).occupation_prompts("edit", "test"))
    values = c.get("values", c)
    return {"mean_abs_contrast": float(values["mean_abs_contrast"]),
            "per_template": {k: float(v) for k, v in c["per_template"].items()}}


def measure(model) -> dict:
    from biaslens.evaluate import suite

    s = suite(model)
    return {**contrast(model), "definitional": float(s["definitional"]["accuracy"]),
            "definitional_share": float(s["definitional"]["mean_correct_share"]),
            "facts": float(s["facts"]["accuracy"]), "perplexity": float(s["perplexity"]["perplexity"])}


def verdict(before: dict, after: dict) -> dict:
    cut = 1 - after["mean_abs_contrast"] / before["mean_abs_contrast"]
    v = {"cut": cut, "definitional_drop": before["definitional"] - after["definitional"],
         "facts_drop": before["facts"] - after["facts"],
         "ppl_rise": after["perplexity"] / before["perplexity"] - 1}
    v["pass"] = {"contrast": cut >= BOUNDS["contrast_cut"],
                 "definitional": v["definitional_drop"] <= BOUNDS["definitional_drop"] + 1e-12,
                 "facts": v["facts_drop"] <= BOUNDS["facts_drop"] + 1e-12,
                 "perplexity": v["ppl_rise"] <= BOUNDS["ppl_rise"]}
    v["pass"]["all"] = all(v["pass"].values())
    return v


def run_variant(model, label: str, fields: dict, emap, cache, per_site: bool,
                extra: list[list[int]] = ()) -> dict:
    from biaslens.edit import lsdm

    t0 = time.perf_counter()
    delta = lsdm(model, effect_map=emap, hparams=fields or None, cache_dir=cache, progress=False)
    secs = time.perf_counter() - t0
    after = measure(model)
    tuning = delta.info["diagnostics"]["tuning"]
    rec = {"label": label, "fields": fields, "seconds": round(secs, 1), "after": after,
           "site": delta.info["site"], "hparams": delta.hparams, "tuning": tuning,
           "tuning_seconds": tuning["seconds"], "edit_seconds": delta.info["diagnostics"]["seconds"]}
    delta.undo(model)
    if per_site:
        rec["per_site"] = sites(model, fields, tuning, emap, cache, extra)
    print(f"  {label}: {json.dumps({k: after[k] for k in after if k != 'per_template'})} "
          f"site {rec['site']} λ={delta.hparams['mom2_weight']:.0f} keep={delta.hparams['keep_weight']:g} "
          f"{secs:.0f} s", file=sys.stderr, flush=True)
    return rec


def sites(model, fields: dict, tuning: dict, emap, cache, extra: list[list[int]] = ()) -> list[dict]:
    """Per candidate window: its best validation setting re-applied (tune off), test numbers;
    then each ``extra`` window with λ and keep weight tuned for it alone."""
    from biaslens.edit import lsdm
    from biaslens.edit.tune import Candidate

    out = []
    for w in extra:
        if w in tuning["windows"]:
            continue
        d = lsdm(model, layers=w, role=tuning["chosen"]["role"], effect_map=emap, cache_dir=cache,
                 hparams=fields or None, progress=False)
        ch = d.info["diagnostics"]["tuning"]["chosen"]
        out.append({"layers": w, "mom2_weight": ch["mom2_weight"], "keep_weight": ch["keep_weight"],
                    "validation": {"contrast": ch["validation"]["contrast"], "feasible": ch["within_bounds"],
                                   "failed": ch["validation"]["failed"]}, "after": measure(model),
                    "tuned_alone": True})
        d.undo(model)
    for w in tuning["windows"]:
        cands = [Candidate(**c) for c in tuning["sweep"] if c["layers"] == w]
        best = min(cands, key=Candidate.rank)
        d = lsdm(model, layers=w, role=tuning["chosen"]["role"], effect_map=emap, cache_dir=cache,
                 hparams={**fields, "mom2_weight": best.mom2_weight, "keep_weight": best.keep_weight},
                 progress=False)
        out.append({"layers": w, "mom2_weight": best.mom2_weight, "keep_weight": best.keep_weight,
                    "validation": {"contrast": best.contrast, "feasible": best.feasible,
                                   "failed": best.failed}, "after": measure(model)})
        d.undo(model)
    return out


def organism_run(name: str, args) -> dict:
    import biaslens
    from biaslens.defaults import defaults_for
    from biaslens.edit.site import trace

    model = biaslens.load(name)
    d = defaults_for(model)
    t0 = time.perf_counter()
    before = measure(model)
    print(f"{name}: before {json.dumps({k: before[k] for k in before if k != 'per_template'})}",
          file=sys.stderr, flush=True)
    emap = trace(model, d.occupation_prompts("edit", "edit"))
    quick = args.quick or name not in args.variants_on.split(",")
    variants = dict(list(VARIANTS.items())[:1]) if quick else VARIANTS
    extra = [[int(x) for x in w.split(",")] for w in args.sites.split(";") if w]
    recs = [run_variant(model, label, f, emap, args.cache_dir, per_site=(i == 0), extra=extra)
            for i, (label, f) in enumerate(variants.items())]
    mlp = emap.effects["mlp"]
    roles = list(emap.roles)
    return {"model": name, "before": before, "variants": recs, "seconds": time.perf_counter() - t0,
            "effects_last": {int(l): float(mlp[i, roles.index("last")]) for i, l in enumerate(emap.layers)},
            "n_edit_prompts": len(d.occupation_prompts("edit", "edit")),
            "n_keep_prompts": len(d.definitional_prompts("edit")),
            "n_validation_templates": len({p.text.replace(p.occupation, "{o}")
                                           for p in d.occupation_prompts("edit", "validation")})}


def pct(x: float) -> str:
    return f"{100 * x:+.0f}%"


def row(label: str, before: dict, after: dict, extra: str = "") -> str:
    v = verdict(before, after)
    ok = "yes" if v["pass"]["all"] else "no (" + ", ".join(k for k, x in v["pass"].items() if not x and k != "all") + ")"
    return (f"| {label} | {extra}{after['mean_abs_contrast']:.3f} ({pct(-v['cut'])}) | "
            f"{after['definitional']:.3f} ({-100 * v['definitional_drop']:+.1f} pt) | "
            f"{after['facts']:.3f} ({-100 * v['facts_drop']:+.1f} pt) | "
            f"{after['perplexity']:.3f} ({100 * v['ppl_rise']:+.2f}%) | {ok} |")


def write(out: Path, runs: list[dict], args, secs: float) -> None:
    L = ["# Edit: LSDM on the organisms, on templates no edit or tuning saw", "",
         f"Generated by `python scripts/edit_acceptance.py` (torch threads {args.threads}; "
         f"{secs / 60:.1f} min). Each organism: edit prompts = training occupations × the organism "
         "bank's edit templates (src/data/organism_bank.json), keep constraints = definitional words × "
         "the same templates; λ (mom2_weight), keep weight and layer window tuned on the bank's "
         "validation templates (`biaslens.edit.tune`, the default `tune=\"auto\"`); measured on "
         "training occupations × the 6 held-out templates (`defaults_for(m).occupation_prompts(\"edit\", "
         "\"test\")`). Contrast = mean |stereotype contrast| over templates "
         "(src/evaluate/contrast.py); definitional, facts and perplexity from `biaslens.evaluate.suite`.", "",
         "Target: contrast cut >= 50%, definitional and fact accuracy down <= 1 point, perplexity up <= 2%.", ""]
    head = ("| LSDM | held-out contrast (change) | definitional | facts | perplexity | within target |\n"
            "|---|---|---|---|---|---|")
    for r in runs:
        b = r["before"]
        d0 = r["variants"][0]
        L += [f"## {r['model']}", "",
              f"{r['n_edit_prompts']} edit prompts, {r['n_keep_prompts']} keep prompts, "
              f"{r['n_validation_templates']} validation templates. MLP effect at the last token "
              f"(noise tracing on the edit prompts): " +
              ", ".join(f"L{l} {e:.3f}" for l, e in r["effects_last"].items()) + ".", "",
              f"Unedited: held-out contrast {b['mean_abs_contrast']:.3f}, definitional {b['definitional']:.3f} "
              f"(mean correct share {b['definitional_share']:.3f}), facts {b['facts']:.3f}, perplexity "
              f"{b['perplexity']:.3f}.", "", "### Defaults and key variants (each tuned)", "", head]
        for v in r["variants"]:
            s, hp = v["site"], v["hparams"]
            L.append(row(f"{v['label']}: L{','.join(map(str, s['layers']))} λ={hp['mom2_weight']:.0f} "
                         f"keep={hp['keep_weight']:g}", b, v["after"]))
        ch = d0["tuning"]["chosen"]
        L += ["", f"Default edit: {d0['seconds']:.0f} s in all on {args.threads} threads (tuning "
              f"{d0['tuning_seconds']:.0f} s, {len(d0['tuning']['sweep'])} candidates; edit "
              f"{json.dumps(d0['edit_seconds'])}). The tuner's choice is "
              f"{'within' if ch['within_bounds'] else 'OUTSIDE'} its validation bounds "
              f"({json.dumps(d0['tuning']['bounds'])}).", "",
              "### Per held-out template (contrast)", "",
              "| template | unedited | " + " | ".join(v["label"] for v in r["variants"]) + " |",
              "|---|---|" + "---|" * len(r["variants"])]
        for t, x in b["per_template"].items():
            L.append(f"| {t} | {x:.3f} | " + " | ".join(f"{v['after']['per_template'][t]:.3f}"
                                                         for v in r["variants"]) + " |")
        if d0.get("per_site"):
            L += ["", "### Per site (default key space; the tuner's windows at their best validation "
                  "setting, other windows (*) tuned alone)", "",
                  "| window | λ | keep | validation contrast (within bounds) | held-out contrast (change) | "
                  "definitional | facts | perplexity | within target |", "|---|---|---|---|---|---|---|---|---|"]
            for p in d0["per_site"]:
                a, v = p["after"], verdict(b, p["after"])
                ok = "yes" if v["pass"]["all"] else "no"
                val = p["validation"]
                star = " *" if p.get("tuned_alone") else ""
                L.append(f"| L{','.join(map(str, p['layers']))}{star} | {p['mom2_weight']:.0f} | {p['keep_weight']:g} | "
                         f"{val['contrast']:.3f} ({'yes' if val['feasible'] else 'no: ' + ', '.join(val['failed'])}) | "
                         f"{a['mean_abs_contrast']:.3f} ({pct(-v['cut'])}) | {a['definitional']:.3f} | "
                         f"{a['facts']:.3f} | {a['perplexity']:.3f} | {ok} |")
        L += ["", "### The default's tuning sweep (validation)", "",
              f"Base: {json.dumps(d0['tuning']['base'])}; validation data: "
              f"{json.dumps(d0['tuning']['validation'])}.", "",
              "| window | λ | keep | contrast | definitional share drop | below floor | facts lost | "
              "perplexity | within bounds |", "|---|---|---|---|---|---|---|---|---|"]
        for c in d0["tuning"]["sweep"]:
            L.append(f"| L{','.join(map(str, c['layers']))} | {c['mom2_weight']:.0f} | {c['keep_weight']:g} | "
                     f"{c['contrast']:.4f} | {c['definitional_share_drop']:.4f} | {c['definitional_broken']} | "
                     f"{c['facts_lost']} | {100 * c['ppl_rise']:+.2f}% | "
                     f"{'yes' if c['feasible'] else 'no: ' + ', '.join(c['failed'])} |")
        L.append("")
    notes = ""  # hand-written analysis below the marker survives a regeneration
    if out.exists() and NOTES in out.read_text(encoding="utf-8"):
        notes = out.read_text(encoding="utf-8").split(NOTES, 1)[1]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(L) + "\n" + NOTES + notes, encoding="utf-8")
    print(f"wrote {out}", file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "edit.md"))
    ap.add_argument("--json", default=None, help="also write every number as JSON here")
    ap.add_argument("--models", default="organism,organism-llama")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="the default only (no key variants)")
    ap.add_argument("--sites", default="1;0,1",
                    help="windows measured per site besides the tuner's ('a,b;c'), each tuned alone")
    ap.add_argument("--variants-on", default="organism",
                    help="models on which the key variants are measured too (comma-separated)")
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    runs = [organism_run(name, args) for name in args.models.split(",") if name]
    write(Path(args.out), runs, args, time.perf_counter() - t0)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1, default=str))
    for r in runs:
        v = verdict(r["before"], r["variants"][0]["after"])
        print(f"{r['model']}: LSDM defaults within target: {v['pass']['all']} ({v['pass']}, cut {v['cut']:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
