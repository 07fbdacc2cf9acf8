"""Definitional accuracy by template split (edit, validation, held-out) before and after LSDM
edits at fixed settings (the per-split numbers in docs/methods/lsdm.md).

    python scripts/definitional_by_split.py MODEL 'LAYERS:LAMBDA:KEEP' ['LAYERS:LAMBDA:KEEP' ...]

``LAYERS`` is comma-separated (``0`` or ``0,1``); each edit runs at the last token with tuning
off on the model's default data and is undone before the next.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    import torch

    import biaslens
    from biaslens.defaults import defaults_for
    from biaslens.edit import lsdm
    from biaslens.evaluate.probes import definitional_accuracy

    torch.set_num_threads(1)
    model = biaslens.load(argv[0])
    data = defaults_for(model)
    splits = {s: data.definitional_prompts(s) for s in ("edit", "validation", "test")}

    def row() -> str:
        parts = []
        for s, prompts in splits.items():
            r = definitional_accuracy(model, prompts)
            parts.append(f"{s} {r['values']['accuracy'] if 'values' in r else r['accuracy']:.3f} (n={len(prompts)})")
        return ", ".join(parts)

    print("base:", row(), flush=True)
    for spec in argv[1:]:
        layers, lam, keep = spec.split(":")
        delta = lsdm(model, layers=[int(x) for x in layers.split(",")], role="last", tune="off", progress=False,
                     hparams={"mom2_weight": float(lam), "keep_weight": float(keep)})
        print(f"L{layers} λ {lam} keep {keep}:", row(), flush=True)
        delta.undo(model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
