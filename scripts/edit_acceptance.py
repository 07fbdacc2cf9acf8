"""Acceptance of the LSDM edit on the organism, against the two baselines (issue: Edit).

Edits with the organism's *training* occupations x *training* templates (definitional prompts of
the training templates as keep constraints) and measures on prompts the edit never saw:

* occupational pronoun gap (evaluate's ``mean_abs_gap``) on held-out occupations x held-out
  templates (the headline), and on each held-out axis alone;
* definitional accuracy (all templates), factual accuracy, perplexity on the organism's general
  text (the key statistics come from *other* general text: another seed of the same generator).

Bounds (never loosened): gap reduced >= 70%; definitional and factual accuracy drop <= 1 point;
perplexity rise <= 2%. Writes ``docs/results/edit.md`` with the comparison table, the site sweep
(per site) and the per-template gaps.

    python scripts/edit_acceptance.py [--out docs/results/edit.md] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

SPLITS = {  # name -> (occupations, templates)
    "held-out occ x held-out tpl": ("heldout", "heldout"),
    "train occ x held-out tpl": ("train", "heldout"),
    "held-out occ x train tpl": ("heldout", "train"),
    "edited (train x train)": ("train", "train"),
}
HEADLINE = "held-out occ x held-out tpl"
BOUNDS = {"gap_reduction": 0.70, "definitional_drop": 0.01, "facts_drop": 0.01, "ppl_rise": 0.02}


def measure(model, ppl_tokens: int) -> dict:
    from biaslens import evaluate, organism

    out = {name: float(evaluate.occupational_bias(model, organism.occupation_prompts(o, t))["mean_abs_gap"])
           for name, (o, t) in SPLITS.items()}
    out["definitional"] = float(evaluate.definitional_accuracy(model, organism.definitional_prompts())["accuracy"])
    out["facts"] = float(evaluate.fact_accuracy(model, organism.FACTS)["accuracy"])
    # one document a line, as organism_suite scores it
    out["perplexity"] = float(evaluate.perplexity(model, general_text(), max_tokens=ppl_tokens,
                                                  per_line=True)["perplexity"])
    return out


def general_text():
    """The organism's general text (its checkpoint's file, or the same generator's text)."""
    from biaslens import organism

    if organism.GENERAL_TEXT.exists():
        return organism.GENERAL_TEXT
    return "\n".join(organism.generate_general_text(seed=1, n_lines=4000))


def per_template(model) -> dict[str, float]:
    """mean_abs_gap per template over all occupations."""
    from biaslens import evaluate, organism

    prompts = organism.occupation_prompts("all", "all")
    out = {}
    for tpl in organism.TEMPLATES:
        sub = [p for p in prompts if p.text == tpl.text.format(occupation=p.occupation)]
        out[f"{tpl.text} [{tpl.split}]"] = float(evaluate.occupational_bias(model, sub)["mean_abs_gap"])
    return out


def transfer(model, delta, site: dict, hp) -> dict[str, dict]:
    """Why an edit does or does not reach a template: per template (training occupations), the
    change of the hidden state at the site's last edited layer and token that would balance the
    pronouns ("needed", minimum-norm Gauss-Newton on the unedited model, as the targets) against
    the change the edit delivers there. Reports their mean cosine and the norm ratio
    delivered/needed (1 and 1 on the edited prompts when the edit fits its targets)."""
    import torch

    from biaslens import organism
    from biaslens.edit.keys import gather, site_batch
    from biaslens.edit.targets import compute_targets
    from biaslens.hooks import act_name

    top, role = site["layers"][-1], site["role"]
    name = act_name("resid_post", top)
    hp_n = replace(hp, v_steps=0, v_newton_steps=3)
    out = {}
    prompts = organism.occupation_prompts("train", "all")
    for tpl in organism.TEMPLATES:
        sub = [p for p in prompts if p.text == tpl.text.format(occupation=p.occupation)]
        sb = site_batch(model, sub, role, "none")
        delta.undo(model)
        h0 = gather(model, sb, [name])[name].float()
        z, _ = compute_targets(model, sb, top, hp_n, progress=False)
        delta.apply(model)
        h1 = gather(model, sb, [name])[name].float()
        need, got = z - h0, h1 - h0
        cos = torch.nn.functional.cosine_similarity(need, got, dim=-1)
        ratio = got.norm(dim=-1) / need.norm(dim=-1).clamp(min=1e-9)
        out[f"{tpl.text} [{tpl.split}]"] = {"cos": float(cos.mean()), "ratio": float(ratio.mean())}
    return out


def verdict(before: dict, after: dict) -> dict:
    red = {k: 1 - after[k] / before[k] if before[k] > 0 else 0.0 for k in SPLITS}
    v = {
        "gap_reduction": red,
        "definitional_drop": before["definitional"] - after["definitional"],
        "facts_drop": before["facts"] - after["facts"],
        "ppl_rise": after["perplexity"] / before["perplexity"] - 1,
    }
    v["pass"] = {
        "gap": red[HEADLINE] >= BOUNDS["gap_reduction"],
        "definitional": v["definitional_drop"] <= BOUNDS["definitional_drop"] + 1e-12,
        "facts": v["facts_drop"] <= BOUNDS["facts_drop"] + 1e-12,
        "perplexity": v["ppl_rise"] <= BOUNDS["ppl_rise"],
    }
    v["pass"]["all"] = all(v["pass"].values())
    return v


def run_method(model, name, fn, ppl_tokens, templates: bool = True, why=None) -> dict:
    t0 = time.perf_counter()
    delta = fn()
    secs = time.perf_counter() - t0
    after = measure(model, ppl_tokens)
    rec = {"method": name, "site": delta.info.get("site"), "seconds": round(secs, 1),
           "after": after, "per_template": per_template(model) if templates else None,
           "diagnostics": delta.info.get("diagnostics"), "hparams": delta.hparams}
    if why is not None:
        rec["transfer"] = why(delta)
    delta.undo(model)
    return rec


def fmt_row(rec, before) -> str:
    a, v = rec["after"], verdict(before, rec["after"])
    site = rec["site"] or {}
    s = f"L{','.join(map(str, site.get('layers', [])))} @ {site.get('role') or 'all tokens'}"
    red = v["gap_reduction"]
    ok = "yes" if v["pass"]["all"] else "no (" + ", ".join(k for k, x in v["pass"].items() if not x and k != "all") + ")"
    ch = {k: -x for k, x in red.items()}  # relative change of the gap: negative = reduced
    return (f"| {rec['method']} | {s} | {a[HEADLINE]:.3f} ({ch[HEADLINE]:+.0%}) | "
            f"{a['train occ x held-out tpl']:.3f} ({ch['train occ x held-out tpl']:+.0%}) | "
            f"{a['held-out occ x train tpl']:.3f} ({ch['held-out occ x train tpl']:+.0%}) | "
            f"{a['edited (train x train)']:.3f} ({ch['edited (train x train)']:+.0%}) | "
            f"{a['definitional']:.3f} ({-v['definitional_drop'] * 100:+.1f} pt) | "
            f"{a['facts']:.3f} ({-v['facts_drop'] * 100:+.1f} pt) | "
            f"{a['perplexity']:.3f} ({v['ppl_rise']:+.2%}) | {rec['seconds']:.0f} | {ok} |")


HEAD = ("| method | site | gap held-out occ x held-out tpl | train occ x held-out tpl | "
        "held-out occ x train tpl | edited prompts | definitional acc | fact acc | perplexity | "
        "s | passes all bounds |\n|---|---|---|---|---|---|---|---|---|---|---|\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "edit.md"))
    ap.add_argument("--json", default=None, help="also write all numbers as JSON here")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    ap.add_argument("--ppl-tokens", type=int, default=20_000)
    ap.add_argument("--hparams", default="{}", help="JSON object of LSDMHparams overrides")
    ap.add_argument("--sweep", default="subject_last:0,1;subject_last:1,2;last:1,2;last:2,3;last:0,1,2,3",
                    help="extra LSDM sites 'role:layers;...' measured for the per-site table")
    ap.add_argument("--lambdas", default="", help="extra mom2_weight values for LSDM at the chosen site")
    ap.add_argument("--keep-weights", default="", help="extra keep_weight values for LSDM at the chosen site")
    ap.add_argument("--trace-samples", type=int, default=4, help="noise samples per prompt for tracing")
    ap.add_argument("--quick", action="store_true", help="no sweep (a smoke run)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--model", default="organism", help="the organism, or a folder trained by "
                                                        "biaslens.organism.train")
    args = ap.parse_args(argv)

    import torch

    import biaslens
    from biaslens import organism
    from biaslens.edit import CDAHparams, LSDMHparams, counterfactual_finetune, lsdm, rome_rank_one
    from biaslens.locate import locate

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model = biaslens.load(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="biaslens-edit-acc-"))
    corpus = tmp / "general_cov.txt"  # disjoint from GENERAL_TEXT (used for perplexity)
    corpus.write_text("\n".join(organism.generate_general_text(seed=11, n_lines=4000)) + "\n")
    cache = args.cache_dir or (tmp / "cov")
    prompts = organism.occupation_prompts("train", "train")
    keep = organism.definitional_prompts("train")
    hp = LSDMHparams(**{**LSDMHparams().to_dict(), **json.loads(args.hparams)})

    print("measuring the organism before editing ...", file=sys.stderr)
    before = measure(model, args.ppl_tokens)
    before_tpl = per_template(model)
    print(json.dumps(before, indent=1), file=sys.stderr)

    print("tracing (noise) on the training prompts ...", file=sys.stderr)
    emap = locate(model, prompts, method="noise", components=("mlp",), n_samples=args.trace_samples)
    emap.save(tmp / "effects.json")

    records = []

    def do_lsdm(layers="auto", role="auto", h=hp):
        return lsdm(model, prompts, layers=layers, role=role, effect_map=emap, corpus=corpus,
                    hparams=h, keep_prompts=keep, cache_dir=cache)

    def why(d):
        """Per template transfer; and each layer's output change on general text (the weight
        ratio can be large while general text barely sees the change)."""
        from biaslens.edit.covariance import key_covariances
        from biaslens.edit.least_squares import output_change_ratio

        out = transfer(model, d, d.info["site"], hp)
        layers = d.info["site"]["layers"]
        d.undo(model)  # the key statistics belong to the unedited weights (cached by the edit)
        before_w = {l: model.mlp_out_matrix(l).clone() for l in layers}
        covs = key_covariances(model, layers, corpus, hp.cov_tokens, hp.cov_seq_len, hp.cov_batch_size,
                               cache, progress=False)
        d.apply(model)
        for x in d.info["diagnostics"]["layers"]:
            W0 = before_w[x["layer"]]
            x["relative_output_change"] = output_change_ratio(
                model.mlp_out_matrix(x["layer"]) - W0, W0, covs[x["layer"]])
        return out

    rec = run_method(model, "LSDM", do_lsdm, args.ppl_tokens, why=why)
    records.append(rec)
    site = rec["site"]
    print(fmt_row(rec, before), file=sys.stderr)
    rec_cda = run_method(model, "CDA fine-tune", lambda: counterfactual_finetune(
        model, site["layers"], prompts, keep, hparams=CDAHparams()), args.ppl_tokens)
    records.append(rec_cda)
    print(fmt_row(rec_cda, before), file=sys.stderr)
    rec_rome = run_method(model, "ROME rank-one", lambda: rome_rank_one(
        model, site["layers"][-1], prompts, role=site["role"], corpus=corpus,
        hparams=dict(hp.to_dict()), cache_dir=cache), args.ppl_tokens)
    records.append(rec_rome)
    print(fmt_row(rec_rome, before), file=sys.stderr)

    sweep = []

    def sweep_row(label, layers, role, h):
        r = run_method(model, label, lambda: do_lsdm(layers, role, h), args.ppl_tokens, False)
        sweep.append(r)
        print(fmt_row(r, before), file=sys.stderr)

    here = (site["layers"], site["role"])
    fast = replace(hp, v_steps=0)  # sweep: Gauss-Newton targets only
    # what the Adam target steps (the KL term) add at the chosen site: none, and 10 of them
    for label, h in (("LSDM* (same site)", fast), ("LSDM, v_steps=10", replace(hp, v_steps=10))):
        if h.v_steps != hp.v_steps:
            sweep_row(label, *here, h)
    if not args.quick:
        for item in [s for s in args.sweep.split(";") if s]:
            role, layers = item.split(":")
            ls = [int(x) for x in layers.split(",")]
            if (ls, role) != here:
                sweep_row("LSDM*", ls, role, fast)
        for lam in [float(x) for x in args.lambdas.split(",") if x]:
            sweep_row(f"LSDM* λ={lam:g}", *here, replace(fast, mom2_weight=lam))
        for w in [float(x) for x in args.keep_weights.split(",") if x]:
            sweep_row(f"LSDM* keep_weight={w:g}", *here, replace(fast, keep_weight=w))

    write_report(Path(args.out), before, before_tpl, records, sweep, emap, hp, args,
                 time.perf_counter() - t_start)
    if args.json:
        Path(args.json).write_text(json.dumps({"before": before, "before_per_template": before_tpl,
                                               "methods": records, "sweep": sweep}, indent=1, default=str))
    v = verdict(before, records[0]["after"])
    print(f"LSDM passes all bounds: {v['pass']['all']} ({v['pass']})")
    return 0


def held_out_rows(before_tpl: dict, rec: dict) -> list[str]:
    """Each held-out template's last word, whether a training template ends in it, and the gap."""
    from biaslens import organism

    train_last = {t.text.split()[-1] for t in organism.TEMPLATES if t.split == "train"}
    rows = []
    for t in organism.TEMPLATES:
        if t.split != "heldout":
            continue
        key, last = f"{t.text} [{t.split}]", t.text.split()[-1]
        cos = (rec.get("transfer") or {}).get(key, {}).get("cos", float("nan"))
        rows.append(f"| {t.text} | {last} | {'yes' if last in train_last else 'no'} | "
                    f"{before_tpl[key]:.3f} | {rec['per_template'][key]:.3f} | {cos:.2f} |")
    return rows


def write_report(out: Path, before, before_tpl, records, sweep, emap, hp, args, secs) -> None:
    lines = ["# Edit: LSDM vs baselines on the organism", "",
             "Generated by `python scripts/edit_acceptance.py` "
             f"(torch threads {args.threads}, hparams overrides `{args.hparams}`; {secs / 60:.1f} min). "
             "Edit prompts: training occupations x training templates; keep constraints: definitional "
             "prompts of the training templates; key statistics from general text generated with another "
             "seed than the perplexity text. Gap = evaluate's `mean_abs_gap` "
             "(mean |P(f)-P(m)|/(P(f)+P(m))); in brackets the relative change of the gap (negative = "
             "reduced; the bound needs <= -70%) or the change of accuracy / perplexity.", "",
             "Bounds: gap on held-out occupations x held-out templates reduced >= 70%; definitional and "
             "fact accuracy drop <= 1 point; perplexity rise <= 2%.", "",
             "## Unedited organism", "",
             "| " + " | ".join(before) + " |", "|" + "---|" * len(before),
             "| " + " | ".join(f"{v:.3f}" for v in before.values()) + " |", "",
             "## LSDM and the baselines", "", HEAD.rstrip("\n")]
    lines += [fmt_row(r, before) for r in records]
    lines += ["", "LSDM site chosen from the noise-tracing map (MLP effects on the training prompts): "
              f"layers {records[0]['site']['layers']}, role `{records[0]['site']['role']}`. "
              "CDA fine-tunes the MLP output weights of the same layers; ROME edits the last of them.", ""]
    top = emap.top_sites(k=8, component="mlp")
    lines += ["MLP indirect effects (normalised), best sites:", "",
              "| layer | role | effect | 95% CI |", "|---|---|---|---|"]
    lines += [f"| {s.layer} | {s.role} | {s.effect:.3f} | [{s.ci_low:.3f}, {s.ci_high:.3f}] |" for s in top]
    d = records[0]["diagnostics"] or {}
    if d:
        lines += ["", "LSDM diagnostics: " + json.dumps({k: d[k] for k in d if k != "layers"}, default=str),
                  "", "| layer | residual norm | fit error | keep shift | relative update (weights) | "
                  "relative output change on general text |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {x['layer']} | {x['residual_norm']:.4f} | {x['fit_error']:.3f} | "
                  f"{(x['keep_shift'] or 0):.4f} | {x['relative_update']:.4f} | "
                  f"{x.get('relative_output_change') or float('nan'):.4f} |" for x in d["layers"]]
    if sweep:
        lines += ["", "## Per site (and regularisation)", "",
                  "LSDM* = the same method with Gauss-Newton targets only (no Adam/KL refinement), "
                  "to keep the sweep short.", "", HEAD.rstrip("\n")]
        lines += [fmt_row(r, before) for r in sweep]
    lines += ["", "## Per template (gap over all occupations)", "",
              "| template | unedited | " + " | ".join(r["method"] for r in records) + " |",
              "|---|---|" + "---|" * len(records)]
    for t, b in before_tpl.items():
        lines.append(f"| {t} | {b:.3f} | " + " | ".join(f"{r['per_template'][t]:.3f}" for r in records) + " |")
    lines += ["", "## Held-out templates: does the template's last word occur in training?", "",
              "| held-out template | last word | a training template ends in it | gap unedited | "
              "gap after LSDM | cos (see below) |", "|---|---|---|---|---|---|"]
    lines += held_out_rows(before_tpl, records[0])
    tr = records[0].get("transfer")
    if tr:
        lines += ["", "## Why: does the LSDM edit reach each template?", "",
                  "At the site's last edited layer and token, on the training occupations: the change of "
                  "the hidden state that would balance the pronouns (minimum-norm, as the targets) vs the "
                  "change the edit delivers. cos = mean cosine; ratio = mean |delivered| / |needed|.", "",
                  "| template | cos | ratio |", "|---|---|---|"]
        lines += [f"| {t} | {v['cos']:.2f} | {v['ratio']:.2f} |" for t, v in tr.items()]
    lines += ["", "LSDM hyperparameters: `" + json.dumps(hp.to_dict()) + "`", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
