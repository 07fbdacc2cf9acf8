"""Where does the organism carry its planted occupation → pronoun bias? (causal tracing)

    python scripts/locate_organism.py [--prompts 120] [--samples 10] [--out docs/results/locate_organism.md]
                                      [--maps DIR]

Runs noise tracing (ROME-style), attribution patching (with its agreement with exact tracing)
and a Vig-style swap (occupation → "man" for female-leaning occupations, "woman" otherwise) on the
organism's training occupation prompts (a seeded sample with every occupation equally), and
writes a markdown report: total effects, the best token role per component, the top sites, the
layers × roles tables, top neurons and heads. Compare with Cai et al. 2024: bottom MLPs at the
last subject token and top attention at the last token carry the bias. ``--maps DIR`` also saves
each EffectMap (JSON) and the heatmaps (HTML).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


def _table(em, component: str) -> list[str]:
    head = "| layer | " + " | ".join(em.roles) + " |"
    rows = [head, "|---" * (len(em.roles) + 1) + "|"]
    for i, layer in enumerate(em.layers):
        cells = []
        for j in range(len(em.roles)):
            v = em.effects[component][i, j]
            cells.append("–" if v != v else f"{v:+.3f} [{em.ci_low[component][i, j]:+.2f}, "
                                              f"{em.ci_high[component][i, j]:+.2f}]")
        rows.append(f"| {layer} | " + " | ".join(cells) + " |")
    return rows


def _sites(em, k=5) -> list[str]:
    return [f"- {s.component} layer {s.layer} at `{s.role}`: {s.effect:+.3f} "
            f"(95% CI {s.ci_low:+.3f} … {s.ci_high:+.3f})" for s in em.top_sites(k)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=120)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "locate_organism.md")
    ap.add_argument("--maps", type=Path, help="also save effect maps and heatmaps here")
    args = ap.parse_args(argv)

    import biaslens
    from biaslens.locate.noise import trace_noise
    from biaslens.locate.swap import trace_swap
    from biaslens.locate.attribution import attribution_patch
    from biaslens.locate import agreement, default_prompts, default_swap
    from biaslens.locate.plots import effect_figures, write_html

    model = biaslens.load("organism")
    prompts = default_prompts(model, args.prompts, args.seed)
    timings, maps = {}, {}
    t = time.perf_counter()
    maps["noise"] = trace_noise(model, prompts, n_samples=args.samples, seed=args.seed)
    timings["noise"] = time.perf_counter() - t
    t = time.perf_counter()
    maps["attribution"] = attribution_patch(model, prompts, n_samples=args.samples, seed=args.seed)
    timings["attribution"] = time.perf_counter() - t
    t = time.perf_counter()
    neuron_role = maps["noise"].best_role("mlp")  # neurons where noise tracing puts the MLP effect
    maps["swap"] = trace_swap(model, prompts, default_swap, top_n=10, seed=args.seed, neuron_role=neuron_role)
    timings["swap"] = time.perf_counter() - t
    noise, attr, swap = maps["noise"], maps["attribution"], maps["swap"]
    agree = agreement(attr, noise)

    lines = [
        "# Locating the organism's occupational gender bias",
        "",
        f"Model: the embedded organism ({model.n_layers} layers, d_model {model.d_model}). Prompts: "
        f"{len(prompts)} training occupation prompts (seeded sample, every occupation equally). "
        f"Metric: {noise.metric} at the last token, signed by each prompt's clean direction. "
        f"Command: `python scripts/locate_organism.py --prompts {args.prompts} --samples {args.samples}`.",
        "",
        "## Noise tracing (ROME-style; IE / TE)",
        "",
        f"Noise on the subject tokens: ν = {noise.meta['noise_std']:.4f} (3 × embedding std), "
        f"{args.samples} samples per prompt. Total effect TE = {noise.meta['te']:.3f} "
        f"(metric units, mean over prompts). Time {timings['noise']:.0f} s.",
        "",
        f"Best role: MLP → `{noise.best_role('mlp')}` (layers {noise.best_layers('mlp')}), "
        f"attention → `{noise.best_role('attn')}` (layers {noise.best_layers('attn')}), "
        f"residual → `{noise.best_role('resid')}`.",
        "",
        "Top sites:", "", *_sites(noise), "",
    ]
    for c in ("mlp", "attn", "resid"):
        lines += [f"### {c}", "", *_table(noise, c), ""]
    lines += [
        "## Attribution patching vs exact", "",
        f"Time {timings['attribution']:.1f} s (exact: {timings['noise']:.0f} s). Agreement with the "
        "exact noise map: " + ", ".join(f"{c}: r = {v['pearson']:.3f}, top-5 overlap {v['top5_overlap']:.0%}"
                                       for c, v in agree.items()) + ".",
        "", "Top sites (attribution):", "", *_sites(attr), "",
        "## Counterfactual swap (Vig-style; NIE)", "",
        f"Occupation → \"man\" (female-leaning) / \"woman\" (male-leaning). TE = {swap.meta['te']:.3f} "
        f"(95% CI {swap.meta['te_ci'][0]:.3f} … {swap.meta['te_ci'][1]:.3f}); effects are Vig's ratio "
        "y(u)/y(original) − 1 with y = P(anti-stereotypical)/P(stereotypical), so a swap that flips a "
        f"confident model gives values in the hundreds. Time {timings['swap']:.0f} s.",
        "", f"Best role by NIE: MLP → `{swap.best_role('mlp')}`, attention → `{swap.best_role('attn')}`.",
        "", "Top sites (NIE):", "", *_sites(swap), "",
        f"Top MLP neurons (NIE at `{neuron_role}`, the MLP's best role in the noise map):", "",
        *[f"- layer {n['layer']} neuron {n['neuron']}: NIE {n['effect']:+.3f} "
          f"[{n['ci_low']:+.3f}, {n['ci_high']:+.3f}], NDE {n['nde']:+.3f}" for n in swap.neurons[:10]],
        "",
    ]
    if swap.heads:
        import numpy as np

        h = np.asarray(swap.heads["effects"])
        order = np.dstack(np.unravel_index(np.argsort(-np.nan_to_num(h, nan=-np.inf), axis=None), h.shape))[0][:5]
        lines += ["Top heads (NIE at the last token):", "",
                  *[f"- layer {l} head {k}: {h[l, k]:+.4f}" for l, k in order], ""]
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    if args.maps:
        args.maps.mkdir(parents=True, exist_ok=True)
        for name, em in maps.items():
            em.save(args.maps / f"{name}.json")
            write_html(effect_figures(em), args.maps / f"{name}.html", title=f"organism · {name}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
