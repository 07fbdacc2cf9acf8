"""Acceptance of the unlearning methods (issue 15, item 5) on both embedded organisms.

    python scripts/unlearn_acceptance.py [--organisms organism,organism-llama] [--methods ...]
                                         [--out docs/results/unlearn.md] [--merge]

For each organism (``biaslens.load("organism")``, a GPT-2, and ``biaslens.load("organism-llama")``,
a LLaMA, when it is there) and each unlearning method — PCGU, task-vector negation, masked-span
ascent, δ-offset (M_o = the model itself, the CLI default) — starting from the same weights: run
the method with its library defaults on ``defaults_for(model).unlearn_data()`` (the same call for
every model; no per-model setting), each choosing its strength on the validation split
(``occupation_prompts("edit", "validation")``) under the same bounds
(:mod:`biaslens.unlearn.select`); measure; undo; check the weights are back bit for bit.

Measured (never used for choosing):

* the stereotype contrast (:func:`biaslens.evaluate.contrast.stereotype_contrast`) on edit
  (training) occupations × test (held-out) templates — mean |contrast| with its CI, the cut with a
  paired CI over templates, and every template's signed contrast;
* definitional accuracy and mean matching-pronoun share on the held-out templates and on all of
  the organism's templates; factual probes; perplexity of the organism's general text.

Bounds (issue 15, never loosened): cut ≥ 40%, perplexity up ≤ 10%, definitional accuracy down
≤ 2 points (checked on the held-out templates and on all templates). Writes the markdown
(``--out``) and ``unlearn.json`` next to it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]

ORGANISMS = ("organism", "organism-llama")
BOUNDS = {"cut": 0.40, "ppl_rise": 0.10, "definitional_drop": 0.02}


# ------------------------------------------------------------------------------- methods


def run_pcgu(model, data, progress):
    from biaslens.unlearn.partitioned import pcgu

    d = pcgu(model, data["pairs"], progress=progress)
    return model, d, model


def run_task_vector(model, data, progress):
    from biaslens.unlearn.task_vector import task_vector_negation

    d = task_vector_negation(model, data["forget"], progress=progress)
    return model, d, model


def run_masked(model, data, progress):
    from biaslens.unlearn.masked_ascent import masked_span_ascent

    d = masked_span_ascent(model, data["forget"], progress=progress)
    return model, d, model


def run_offset(model, data, progress):
    from biaslens.unlearn.offset import offset_unlearn

    om = offset_unlearn(model, model, data["forget"], data["retain"], progress=progress)
    return om, om.delta, om.offset


METHODS: dict[str, Callable] = {
    "PCGU": run_pcgu,
    "task vector": run_task_vector,
    "masked-span ascent": run_masked,
    "δ-offset (M_o = model)": run_offset,
}


# ------------------------------------------------------------------------------ measuring


def measure(model, defaults) -> dict[str, Any]:
    """Held-out numbers of ``model`` (any scorer: a BiasModel or an OffsetModel)."""
    from biaslens.evaluate import definitional_accuracy, fact_accuracy, perplexity, stereotype_contrast
    from biaslens.evaluate.suite import SUITE_PPL_TOKENS

    test = defaults.occupation_prompts("edit", "test")
    dprompts = defaults.definitional_prompts("test")
    dt = definitional_accuracy(model, dprompts)
    dt["per_template"] = _definitional_per_template(model, dprompts)
    da = definitional_accuracy(model, defaults.definitional_prompts("all"))
    return {
        "contrast": stereotype_contrast(model, test),
        "definitional_test": {"accuracy": dt["accuracy"], "share": dt["mean_correct_share"], "n": dt["n"],
                              "per_template": dt["per_template"]},
        "definitional_all": {"accuracy": da["accuracy"], "share": da["mean_correct_share"], "n": da["n"]},
        "facts": fact_accuracy(model, defaults.facts())["accuracy"],
        "ppl": perplexity(model, defaults.ppl_text, max_tokens=SUITE_PPL_TOKENS, per_line=True)["perplexity"],
    }


def _definitional_per_template(model, prompts) -> dict[str, float]:
    """Definitional argmax accuracy per held-out template."""
    from collections import defaultdict

    from biaslens.evaluate.contrast import template_of
    from biaslens.unlearn.select import definitional_shares

    by: dict[str, list[bool]] = defaultdict(list)
    for p, share in zip(prompts, definitional_shares(model, prompts)):
        by[template_of(p)].append(bool(share > 0.5))
    return {t: sum(v) / len(v) for t, v in by.items()}


def verdict(before: dict, after: dict) -> dict[str, Any]:
    from biaslens.evaluate.contrast import contrast_change

    ch = contrast_change(before["contrast"], after["contrast"])
    out = {
        "cut": ch["cut"], "cut_ci": ch["ci"]["cut"], "per_template": ch["per_template"],
        "ppl_rise": after["ppl"] / before["ppl"] - 1.0,
        "definitional_test_drop": before["definitional_test"]["accuracy"] - after["definitional_test"]["accuracy"],
        "definitional_all_drop": before["definitional_all"]["accuracy"] - after["definitional_all"]["accuracy"],
        "facts_drop": before["facts"] - after["facts"],
    }
    eps = 1e-12
    out["pass"] = {
        "cut": out["cut"] >= BOUNDS["cut"] - eps,
        "ppl": out["ppl_rise"] <= BOUNDS["ppl_rise"] + eps,
        "definitional": max(out["definitional_test_drop"], out["definitional_all_drop"])
        <= BOUNDS["definitional_drop"] + eps,
    }
    out["passes"] = all(out["pass"].values())
    return out


def chosen_setting(delta) -> dict[str, Any]:
    """What the method chose on the validation split, from its record."""
    info = delta.info
    sel = info.get("selection") or {}
    chosen = sel.get("chosen") or {}
    keys = ("lambda", "lr", "k", "variant", "alpha", "step")
    setting = {k: chosen[k] for k in keys if k in chosen}
    base = sel.get("base") or {}
    nums = ("contrast", "definitional", "margin", "ppl")
    sweep = [{**{k: p[k] for k in keys if k in p}, **{k: p.get(k) for k in nums}, "ok": p.get("ok"),
              "why": p.get("why")} for p in sel.get("sweep") or []]
    return {"setting": setting, "validation": {k: chosen.get(k) for k in nums},
            "validation_base": {k: base.get(k) for k in nums}, "validation_per_template": chosen.get("per_template"),
            "n_candidates": len(sweep), "bounds": sel.get("bounds"), "changed": sel.get("changed"),
            "stopped": info.get("stopped"), "refused": _refusals(sweep), "sweep": sweep}


def _refusals(sweep: list[dict]) -> dict[str, int]:
    """How many candidates each bound refused (by the first bound each broke)."""
    out: dict[str, int] = {}
    for p in sweep:
        why = p.get("why") or ""
        if p.get("ok") or not why:
            continue
        key = next((k for k in ("definitional margin", "definitional accuracy", "perplexity") if why.startswith(k)),
                   why.split(":")[0])
        out[key] = out.get(key, 0) + 1
    return out


def run_organism(name: str, methods: list[str], progress: bool) -> dict[str, Any]:
    import biaslens
    from biaslens.defaults import defaults_for

    model = biaslens.load(name)
    defaults = defaults_for(model)
    data = defaults.unlearn_data(seed=0)
    t0 = time.perf_counter()
    before = measure(model, defaults)
    print(f"{name}: before: contrast {before['contrast']['mean_abs_contrast']:.3f}, "
          f"definitional {before['definitional_test']['accuracy']:.3f} (held-out templates), "
          f"ppl {before['ppl']:.3f} ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    h0 = model.weight_hash()
    rows = []
    for m in methods:
        t = time.perf_counter()
        try:
            scored, delta, owner = METHODS[m](model, data, progress)
        except Exception as exc:  # a failing method is a row, not the end of the run
            traceback.print_exc()
            rows.append({"method": m, "error": f"{type(exc).__name__}: {exc}"})
            continue
        seconds = time.perf_counter() - t
        after = measure(scored, defaults)
        delta.undo(owner)
        row = {"method": m, "seconds": seconds, "after": after, **verdict(before, after),
               "chosen": chosen_setting(delta), "undo_exact": model.weight_hash() == h0,
               "n_tensors_changed": len(delta.names)}
        rows.append(row)
        print(f"{name} / {m}: contrast {before['contrast']['mean_abs_contrast']:.3f} -> "
              f"{after['contrast']['mean_abs_contrast']:.3f} (cut {100 * row['cut']:.0f}%), ppl "
              f"{100 * row['ppl_rise']:+.1f}%, definitional {-100 * row['definitional_test_drop']:+.1f} pt, "
              f"chose {row['chosen']['setting']} in {seconds:.0f}s", file=sys.stderr, flush=True)
    return {"organism": name, "spec": model.spec, "before": before, "rows": rows,
            "validation": {"n_templates": len({p.text.replace(p.subject, '{occupation}', 1)
                                               for p in defaults.occupation_prompts("edit", "validation")}),
                           "n_prompts": len(defaults.occupation_prompts("edit", "validation"))},
            "n_forget": len(data["forget"]), "n_pairs": len(data["pairs"] or [])}


# ------------------------------------------------------------------------------- writing


def _f(x, fmt="{:.3f}"):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return fmt.format(x)


def markdown(record: dict) -> str:
    lines = [
        "# Unlearning on both organisms: the stereotype contrast on held-out templates",
        "",
        f"Produced by `python scripts/unlearn_acceptance.py` ({record['date']}, {record['threads']} CPU "
        "thread(s) on a shared machine, so wall times are rough). Every method runs with its library "
        "defaults on `defaults_for(model).unlearn_data()` and chooses its strength on the validation split "
        "(`occupation_prompts(\"edit\", \"validation\")`, never a test template) under the same bounds "
        "(`biaslens.unlearn.select`: validation perplexity up ≤ 10%, definitional accuracy down ≤ 2 points, "
        "and the mean matching-pronoun share on the definitional prompts the base model separates (share ≥ 0.9) "
        "down ≤ 2 points). Each result is undone afterwards (column *undo*: bit-exact).",
        "",
        "Measured here, never used for choosing: **contrast** = mean |stereotype contrast| over the held-out "
        "templates on the training occupations (`occupation_prompts(\"edit\", \"test\")`); definitional "
        "accuracy (argmax) and mean matching share on the held-out templates (*def. held-out*) and on all "
        "templates (*def. all*); factual probes; perplexity of the organism's general text. Pass = cut ≥ 40%, "
        "perplexity up ≤ 10%, definitional accuracy down ≤ 2 points on both definitional sets.",
        "",
    ]
    for org in record["organisms"]:
        b = org["before"]
        bc = b["contrast"]
        lines += [
            f"## {org['organism']}",
            "",
            f"Before: contrast {_f(bc['mean_abs_contrast'])} (CI {_f(bc['ci']['mean_abs_contrast'][0])}–"
            f"{_f(bc['ci']['mean_abs_contrast'][1])}, {bc['n']} templates), def. held-out "
            f"{_f(b['definitional_test']['accuracy'])} (share {_f(b['definitional_test']['share'])}), def. all "
            f"{_f(b['definitional_all']['accuracy'])}, facts {_f(b['facts'])}, perplexity {_f(b['ppl'])}. "
            f"Validation: {org['validation']['n_templates']} templates, {org['validation']['n_prompts']} prompts; "
            f"forget data: {org['n_forget']} texts.",
            "",
            "| method | contrast after | cut (95% CI) | perplexity | def. held-out (share) | def. all | facts | "
            "chosen on validation | validation contrast | time | undo | pass |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in org["rows"]:
            if "error" in r:
                lines.append(f"| {r['method']} | error: {r['error']} | | | | | | | | | | |")
                continue
            a, ch = r["after"], r["chosen"]
            val = ch["validation"]
            vb = ch["validation_base"]
            fails = [k for k, ok in r["pass"].items() if not ok]
            lines.append(
                f"| {r['method']} | {_f(a['contrast']['mean_abs_contrast'])} | {_f(100 * r['cut'], '{:.0f}%')} "
                f"({_f(100 * r['cut_ci'][0], '{:.0f}')}–{_f(100 * r['cut_ci'][1], '{:.0f}')}%) | "
                f"{_f(100 * r['ppl_rise'], '{:+.1f}%')} | {_f(a['definitional_test']['accuracy'])} "
                f"({_f(a['definitional_test']['share'])}) | {_f(a['definitional_all']['accuracy'])} | "
                f"{_f(a['facts'])} | {json.dumps(_short(ch['setting']))} | {_f(vb.get('contrast'))} → "
                f"{_f(val.get('contrast'))} | {r['seconds']:.0f} s | {'exact' if r['undo_exact'] else 'NOT exact'} | "
                f"{'yes' if r['passes'] else 'no (' + ', '.join(fails) + ')'} |")
        ok_rows = [r for r in org["rows"] if "error" not in r]
        lines += ["", "How each choice was made (validation split; *refused*: candidates out of bounds, by the "
                      "first bound each broke):", ""]
        for r in ok_rows:
            ch = r["chosen"]
            lines.append(f"- **{r['method']}**: {ch['n_candidates']} candidates, refused {json.dumps(ch.get('refused', {}))}; "
                         f"chose {json.dumps(_short(ch['setting']))} (validation definitional "
                         f"{_f(ch['validation_base'].get('definitional'))} → {_f(ch['validation'].get('definitional'))}, "
                         f"margin {_f(ch['validation_base'].get('margin'))} → {_f(ch['validation'].get('margin'))}, "
                         f"perplexity {_f(ch['validation_base'].get('ppl'))} → {_f(ch['validation'].get('ppl'))}); "
                         f"stopped: {ch.get('stopped') or 'n/a'}.")
        if ok_rows:
            templates = [t["template"] for t in ok_rows[0]["per_template"]]
            lines += ["", "Per held-out template: signed contrast (base → after each method), then definitional "
                          "accuracy on that template:", ""]
            lines.append("| template | base | " + " | ".join(r["method"] for r in ok_rows) + " |")
            lines.append("|---|---|" + "---|" * len(ok_rows))
            for i, t in enumerate(templates):
                cells = [_f(r["per_template"][i]["after"]) for r in ok_rows]
                lines.append(f"| {t} | {_f(ok_rows[0]['per_template'][i]['before'])} | " + " | ".join(cells) + " |")
            base_def = b["definitional_test"].get("per_template") or {}
            if base_def:
                lines += ["", "| template (definitional accuracy) | base | " + " | ".join(r["method"] for r in ok_rows)
                          + " |", "|---|---|" + "---|" * len(ok_rows)]
                for t, v in base_def.items():
                    cells = [_f((r["after"]["definitional_test"].get("per_template") or {}).get(t), "{:.2f}")
                             for r in ok_rows]
                    lines.append(f"| {t} | {_f(v, '{:.2f}')} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += notes(record)
    return "\n".join(lines) + "\n"


def notes(record: dict) -> list[str]:
    summary = []
    for org in record["organisms"]:
        ok = [r["method"] for r in org["rows"] if r.get("passes")]
        short = [r["method"] for r in org["rows"] if "error" not in r and not r.get("passes")]
        summary.append(f"{org['organism']}: within every bound with a cut ≥ 40%: {', '.join(ok) or 'none'}; "
                       f"short: {', '.join(short) or 'none'}")
    return [
        "## Reading the numbers",
        "",
        "- " + "; ".join(summary) + ".",
        "- Why the methods failed before (read from the code and measured on the GPT-2 organism): PCGU's defaults "
        "(k = 10,000 units, plain SGD at lr 1e-5, every parameter) barely moved a weight, and with the embeddings "
        "its most contrastive units are the pronouns' own tied unembedding rows; masked-span ascent ran 100 steps "
        "at lr 1e-5; the task-vector λ grid started at 0.25, so a task vector strong enough to break the "
        "perplexity bound at every λ (a full fine-tune of a real GPT-2) kept λ = 0 — the grid now halves below "
        "its smallest λ and bisects next to the best (tested in `tests/unit/test_unlearn_parts.py`; the planted-bias "
        "GPT-2 itself is not in this repository). Every method chose on the occupational *gap* (which a template's "
        "lean moves) on the *training* templates, and only perplexity was bounded: the CLI's task vector never "
        "saw a definitional check, hence −80% with definitional accuracy 0.979 → 0.844.",
        "- The cause behind the definitional damage: on the organisms the stereotype and definitional gender share "
        "one path (the subject's gender read at the last token), so ascent on the stereotyped pronoun, a negated "
        "stereotype task vector and PCGU's most contrastive units blur \"The king said that he\" as fast as the "
        "stereotype. Measured while developing (GPT-2 organism, before the keep term): the plain task vector "
        "cut the held-out contrast 40% only where held-out definitional accuracy had fallen 2.6 points "
        "(λ = 0.35), and plain masked-span ascent's definitional margin fell 8 points by a 44% cut. Each method "
        "now adds one definitional keep term (`biaslens.unlearn.common.KeepTerm`: KL to the unchanged model over "
        "{matching pronoun, other pronoun, rest} after the definitional prompts of the *edit* templates, weight "
        "30; `keep_weight=0` is the published objective). For the task vector it is evaluated at the *negated* "
        "weights during the fine-tune (negation is where definitional gender breaks; the same term at the "
        "fine-tuned weights protected less: held-out definitional accuracy fell 2.1 points at a 43% cut).",
        "- PCGU stays short: its update is plain SGD on the most contrastive units, which are the shared gender "
        "units; with the keep term the step must stay small to be stable (at lr 3e-2 the keep gradient made it "
        "diverge, perplexity × 40), and PCGU's alternatives tried here (projecting the step off the definitional "
        "margin gradients; alternating keep steps, as in SCRUB) either left held-out definitional accuracy "
        "unprotected or undid the cut.",
        "- The validation templates are the organism bank's (new combinations of the corpus's words); the "
        "held-out templates are the organism's own, with rare endings (\"whispered that\", \"checked\") where "
        "the pronoun mass is small. The validation numbers do not predict the held-out ones well in either "
        "direction. On the GPT-2 organism the definitional-margin bound (2 points) stops masked-span ascent while "
        "held-out definitional accuracy is unchanged, and δ-offset is stopped by perplexity (its forget loss is "
        "ascent on whole sentences, as in the paper). Where a method passes validation but not the held-out "
        "definitional bound (organism-llama: masked-span ascent, PCGU), the per-template table shows the cause: "
        "a held-out template stops reading the subject's gender (\"whispered that\", \"checked\": definitional "
        "accuracy falls towards 0.5, every subject gets one pronoun), while on the bank's validation templates, "
        "where the keep term (trained on the bank's edit templates) holds, definitional accuracy even rose. "
        "Neither the bounds nor the organisms were changed to close these gaps.",
        "- PCGU on the GPT-2 organism ran out of steps, not bounds (its lr 3e-3 run never broke one in 280 steps; "
        "the lr 1e-2 run did): more epochs would likely cut more (not run: the default is 3 epochs).",
        "",
    ]


def _short(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _short(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_short(v) for v in d]
    return float(f"{d:.4g}") if isinstance(d, float) else d


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "unlearn.md")
    ap.add_argument("--organisms", default=",".join(ORGANISMS), help="comma-separated: organism, organism-llama")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared machine)")
    ap.add_argument("--merge", action="store_true", help="keep the organisms / rows not run now from the last JSON")
    ap.add_argument("--render-only", action="store_true", help="rewrite the markdown from the last JSON record")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    record_path = args.out.with_suffix(".json")
    if args.render_only:
        args.out.write_text(markdown(json.loads(record_path.read_text())), encoding="utf-8")
        print(f"wrote {args.out}")
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"unknown method(s) {unknown}; choose from {list(METHODS)}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    from biaslens import organism

    organisms = []
    for name in [o.strip() for o in args.organisms.split(",") if o.strip()]:
        folder = organism.ORGANISMS.get(name) if hasattr(organism, "ORGANISMS") else None
        if folder is None or not (Path(folder) / "model.safetensors").exists():
            print(f"{name}: not there (no checkpoint); skipped", file=sys.stderr)
            continue
        organisms.append(run_organism(name, methods, not args.no_progress))
    if args.merge and record_path.exists():
        old = json.loads(record_path.read_text())
        by = {o["organism"]: o for o in old.get("organisms", [])}
        for o in organisms:
            prev = by.get(o["organism"])
            if prev:
                ran = {r["method"] for r in o["rows"]}
                o["rows"] = sorted([r for r in prev["rows"] if r["method"] not in ran] + o["rows"],
                                   key=lambda r: list(METHODS).index(r["method"]) if r["method"] in METHODS else 99)
            by[o["organism"]] = o
        organisms = [by[k] for k in ORGANISMS if k in by] + [v for k, v in by.items() if k not in ORGANISMS]
    record = {"date": datetime.date.today().isoformat(), "threads": torch.get_num_threads(), "bounds": BOUNDS,
              "organisms": organisms}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")
    args.out.write_text(markdown(record), encoding="utf-8")
    print(f"wrote {args.out} and {record_path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
