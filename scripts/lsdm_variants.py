"""LSDM key and residual variants on an organism, each tuned on validation templates, scored on
the held-out templates (the numbers in docs/methods/lsdm.md, "What the key can and cannot do").

    python scripts/lsdm_variants.py MODEL CONFIGS_JSON [full]

``CONFIGS_JSON``: a JSON list of ``{"hparams": {...}, "grid": {...}, "layers": [...], "role": ...,
"tune": "auto"|"off", "sweep": 1}`` (every key optional): each is one ``biaslens.edit.lsdm`` call
on the model's default data; ``full`` adds definitional accuracy, facts and perplexity
(``biaslens.evaluate.suite``) to the held-out contrast. The edit is undone after each.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    import torch

    import biaslens
    from biaslens.defaults import defaults_for
    from biaslens.edit import lsdm
    from biaslens.edit.site import trace
    from biaslens.edit.tune import TuneGrid
    from edit_acceptance import contrast, measure

    torch.set_num_threads(1)
    name, configs = argv[0], json.loads(argv[1])
    full = len(argv) > 2 and argv[2] == "full"
    model = biaslens.load(name)
    emap = trace(model, defaults_for(model).occupation_prompts("edit", "edit"))
    base = contrast(model)["mean_abs_contrast"]
    print(f"{name}: base held-out contrast {base:.4f}", flush=True)
    for cfg in configs:
        t = time.perf_counter()
        kw = {k: cfg[k] for k in ("layers", "role") if k in cfg}
        if "grid" in cfg:
            kw["grid"] = TuneGrid(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg["grid"].items()})
        delta = lsdm(model, effect_map=emap, hparams=cfg.get("hparams") or None, progress=False,
                     tune=cfg.get("tune", "auto"), **kw)
        tuning = delta.info["diagnostics"].get("tuning", {})
        chosen = tuning.get("chosen", {})
        after = measure(model) if full else contrast(model)
        delta.undo(model)
        out = {k: round(v, 4) for k, v in after.items() if k != "per_template"}
        print(json.dumps(cfg), "->", delta.info["site"], f"λ={delta.hparams['mom2_weight']:g}",
              f"keep={delta.hparams['keep_weight']:g}",
              f"validation={chosen.get('validation', {}).get('contrast', float('nan')):.4f}",
              f"within={chosen.get('within_bounds')}", out,
              f"cut={1 - after['mean_abs_contrast'] / base:.3f}", f"{time.perf_counter() - t:.0f}s", flush=True)
        if cfg.get("sweep"):
            for c in tuning.get("sweep", []):
                print("   ", c.get("role", ""), c["layers"], round(c["mom2_weight"], 1), c["keep_weight"],
                      round(c["contrast"], 4), c["failed"],
                      f"share drop {c.get('definitional_share_drop', float('nan')):.4f}",
                      f"below floor {c.get('definitional_broken')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
