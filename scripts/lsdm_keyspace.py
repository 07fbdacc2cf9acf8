"""Why LSDM's cut and definitional retention trade off at one site: the key-space geometry of the
occupations' stereotype and the definitional words' gender, and edits held off the definitional
subspace (the numbers in docs/methods/lsdm.md, "The stereotype and definitional gender share a
key direction").

    python scripts/lsdm_keyspace.py MODEL LAYER SETTINGS_JSON

At ``LAYER``'s MLP key (the ``last`` role), per edit template: the occupations' stereotype
direction (mean key of female-stereotyped minus male-stereotyped occupations) and the
definitional gender direction (female words minus male words). Prints their cosine and how much
of the stereotype directions' energy lies in the leading definitional directions.

``SETTINGS_JSON``: a list of ``{"lam": λ, "keep": keep weight, "residuals": "full"|"centered",
"project": r}``; each is one ``biaslens.edit.lsdm`` call at that layer with tuning off. With
``project`` r > 0 the solve is restricted to the complement of the leading r definitional
directions (ΔW P = 0: the edit cannot read the definitional gender there). Each edit is scored on
the held-out templates (mean |contrast| cut; definitional accuracy on every definitional prompt)
and on the tuner's own validation data (share drop of separated definitional prompts, how many
fell below the floor, per template and gender), then undone.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    import numpy as np
    import torch

    import biaslens
    import biaslens.edit.least_squares as LS
    from biaslens.defaults import defaults_for
    from biaslens.edit import lsdm
    from biaslens.edit.keys import gather, site_batch
    from biaslens.edit.solve import least_squares_update
    from biaslens.edit.tune import TuneBounds, default_validation
    from biaslens.evaluate.contrast import template_of
    from biaslens.hooks import act_name
    from edit_acceptance import measure

    torch.set_num_threads(1)
    model = biaslens.load(argv[0])
    layer, settings = int(argv[1]), json.loads(argv[2])
    d = defaults_for(model)
    occ, keep = d.occupation_prompts("edit", "edit"), d.definitional_prompts("edit")
    name = act_name("mlp_key", layer)

    def keys(prompts):
        return gather(model, site_batch(model, prompts, "last", "none"), [name], 256)[name].double()

    def directions(prompts, K):
        by: dict[str, list[list]] = {}
        for p, k in zip(prompts, K):
            if p.female_rate != 0.5:
                by.setdefault(template_of(p), [[], []])[int(p.female_rate > 0.5)].append(k)
        return {t: torch.stack(f).mean(0) - torch.stack(m).mean(0) for t, (m, f) in by.items() if m and f}

    go, gd = directions(occ, keys(occ)), directions(keep, keys(keep))
    common = sorted(set(go) & set(gd))
    Go, Gd = torch.stack([go[t] for t in common]), torch.stack([gd[t] for t in common])
    per = torch.nn.functional.cosine_similarity(Go, Gd, dim=1)
    mo, md = Go.mean(0), Gd.mean(0)
    _, S, Vh = torch.linalg.svd(Gd, full_matrices=False)
    print(f"{argv[0]} L{layer} @last, {len(common)} edit templates: cosine of the mean stereotype and "
          f"mean definitional directions {float(mo @ md / mo.norm() / md.norm()):.3f}; per template "
          f"median {float(per.median()):.3f} (min {float(per.min()):.3f}); norm ratio stereotype/"
          f"definitional {float(Go.norm(dim=1).mean() / Gd.norm(dim=1).mean()):.3f}")
    for r in (1, 2, 4, 8):
        P = Vh[:r].T
        print(f"  energy of the stereotype directions in the leading {r} definitional direction(s): "
              f"{float(((Go @ P).norm(dim=1) ** 2).sum() / (Go.norm(dim=1) ** 2).sum()):.3f} "
              f"(those directions hold {float((S[:r] ** 2).sum() / (S ** 2).sum()):.3f} of the definitional ones)")

    bounds = TuneBounds()
    val = default_validation(model, occ, keep, d.corpus, 50_000)
    vbase = val.prepare(model, bounds)
    s0 = 1 / (1 + np.exp(-val._def_margin0))
    groups = [("F" if p.female_rate >= 0.5 else "M") + " " + template_of(p) for p in val.definitional]
    base = measure(model)
    print(f"base: held-out contrast {base['mean_abs_contrast']:.4f}, definitional {base['definitional']:.4f}, "
          f"validation contrast {vbase['contrast']:.4f}, {len(s0)} separated validation definitional prompts",
          flush=True)

    solve = LS.solve_layer
    state = {"r": 0}

    def held_off(K, R, Kk, site, cov, hp, factor=None):
        r = state["r"]
        if r == 0:
            return solve(K, R, Kk, site, cov, hp, factor)
        if hp.residuals == "centered":
            R = R - LS.template_mean(R, site)
        P = Vh[:r].T.to(torch.float64)
        Pc = torch.eye(P.shape[0], dtype=torch.float64) - P @ P.T
        M = least_squares_update(K.double() @ Pc, R, Pc @ cov.double() @ Pc, hp.mom2_weight,
                                 Kk.double() @ Pc if Kk is not None else None, hp.keep_weight, hp.ridge)
        return M @ Pc, {"held_off_rank": r}

    LS.solve_layer = held_off
    try:
        for cfg in settings:
            state["r"] = int(cfg.get("project", 0))
            t = time.perf_counter()
            delta = lsdm(model, layers=[layer], role="last", tune="off", progress=False,
                         hparams={"mom2_weight": cfg["lam"], "keep_weight": cfg["keep"],
                                  "residuals": cfg.get("residuals", "full")})
            a = measure(model)
            v = val.score(model, bounds)
            s1 = 1 / (1 + np.exp(-val._def_margins(model, val.definitional)))
            delta.undo(model)
            drops: dict[str, list[float]] = {}
            for g, x0, x1 in zip(groups, s0, s1):
                drops.setdefault(g, []).append(x0 - x1)
            worst = sorted(((float(np.sum(x)) / len(s0), g) for g, x in drops.items()), reverse=True)[:4]
            print(json.dumps(cfg), f"held-out cut {1 - a['mean_abs_contrast'] / base['mean_abs_contrast']:.3f}",
                  f"definitional {100 * (a['definitional'] - base['definitional']):+.1f} pt",
                  f"facts {a['facts']:.3f} ppl {100 * (a['perplexity'] / base['perplexity'] - 1):+.2f}% |",
                  f"validation contrast {v['contrast']:.4f}, share drop {v['definitional_share_drop']:.4f}"
                  f" (bound {bounds.definitional_share_drop}), below floor {v['definitional_broken']} |",
                  f"{time.perf_counter() - t:.0f}s", flush=True)
            print("   largest parts of the share drop:",
                  "; ".join(f"{g} {x:.4f}" for x, g in worst), flush=True)
    finally:
        LS.solve_layer = solve
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
