"""``biaslens locate``: trace a bias and write ``effects.json`` and ``heatmap.html``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from biaslens.errors import DataFormatError

__all__ = ["MAX_PROMPTS_BYTES", "MAX_PROMPT_CHARS", "read_prompts", "COMMANDS"]


#: prompts are sentences; a larger file is a mistake (a corpus passed as prompts), refused unread
MAX_PROMPTS_BYTES = 50 * 10**6
#: the longest prompt line read (characters); longer lines are refused before any tokenisation
MAX_PROMPT_CHARS = 20_000


def read_prompts(path: str | Path) -> list[Any]:
    """Prompts from a JSONL file: one ``{"text", "subject", optional "male", "female"}`` per line.

    Blank lines are skipped; a malformed line raises :class:`DataFormatError` naming file and line.
    """
    from biaslens.prompts import Prompt

    from biaslens.inputs import read_text

    path = Path(path)
    text = read_text(path, "prompts file", MAX_PROMPTS_BYTES,
                     "a prompts file holds short prompts; split it or pass a sample")
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if len(line) > MAX_PROMPT_CHARS:
            raise DataFormatError(f"{path}:{n}: a prompt line of {len(line):,} characters (at most "
                                  f"{MAX_PROMPT_CHARS:,}): prompts are sentences, not documents")
        try:
            d = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
        if not isinstance(d, dict) or not isinstance(d.get("text"), str) or not isinstance(d.get("subject"), str):
            raise DataFormatError(
                f'{path}:{n}: each line must be an object with string "text" and "subject" '
                '(and optionally "male", "female")')
        if d["subject"] not in d["text"]:
            raise DataFormatError(f"{path}:{n}: subject {d['subject']!r} does not occur in the text")
        for k in ("male", "female"):
            if k in d and not isinstance(d[k], str):
                raise DataFormatError(f'{path}:{n}: "{k}" must be a string such as " he"')
        meta = {k: v for k, v in d.items() if k not in ("text", "subject")}
        out.append(Prompt(d["text"], d["subject"], meta))
    if not out:
        raise DataFormatError(f"{path}: no prompts in the file")
    return out


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from biaslens.cliargs import float_in, nonneg_int, positive_int, seed_int

    p.add_argument("--model", required=True, help="'organism', 'organism-llama', a local Hugging Face folder, or a hub name")
    p.add_argument("--method", default="noise", choices=("noise", "swap", "attribution"),
                   help="noise restoration (ROME), counterfactual swap (Vig), or attribution patching")
    p.add_argument("--prompts", help='JSONL file of {"text", "subject", optional "male", "female"} '
                                     "(default: the model's edit prompts, see biaslens.defaults)")
    p.add_argument("--max-prompts", type=nonneg_int, default=120,
                   help="with the default prompts: a seeded sample of this many, every "
                        "occupation equally (0 = all)")
    p.add_argument("--components", default="resid,mlp,attn", help="comma-separated: resid,mlp,attn")
    p.add_argument("--window", type=positive_int, default=1, help="restore K consecutive MLP/attention layers")
    p.add_argument("--samples", type=positive_int, default=10, help="noise samples per prompt (noise, attribution)")
    p.add_argument("--noise-scale", type=float_in(0, 100, lo_open=True), default=3.0,
                   help="noise std in units of the embedding std, in (0, 100]")
    p.add_argument("--swap", help="replacement subject for --method swap (default: 'man' for "
                                  "female-leaning occupations, 'woman' for male-leaning)")
    p.add_argument("--top-n", type=positive_int, default=20, help="neurons to keep (--method swap)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--compare-exact", action="store_true",
                   help="with --method attribution: also run exact noise tracing and report agreement")
    p.add_argument("--out", required=True, help="output folder (new or empty; biaslens never writes into a folder of yours)")
    p.add_argument("--force", action="store_true", help="replace an output folder that biaslens wrote (never a folder holding your files)")


def _run(args) -> int:
    from biaslens.io import prepare, staging

    out = prepare(args.out, args.force)  # fail before loading a model
    components = tuple(c.strip() for c in args.components.split(",") if c.strip())
    prompts = read_prompts(args.prompts) if args.prompts else None
    import biaslens
    from biaslens.locate import agreement, locate
    from biaslens.locate.plots import effect_figures, write_html

    model = biaslens.load(args.model, device=args.device, dtype=args.dtype)
    kw: dict[str, Any] = {}
    if args.method in ("noise", "attribution"):
        kw.update(n_samples=args.samples, noise_scale=args.noise_scale)
    if args.method == "swap":
        kw.update(top_n=args.top_n, swaps=args.swap)
    effects = locate(model, prompts, method=args.method, components=components, window=args.window,
                     seed=args.seed, max_prompts=args.max_prompts or None, **kw)
    if args.method == "attribution" and args.compare_exact:
        exact = locate(model, prompts, method="noise", components=components, seed=args.seed,
                       max_prompts=args.max_prompts or None, n_samples=args.samples,
                       noise_scale=args.noise_scale)
        effects.meta["agreement_with_exact"] = agreement(effects, exact)
    with staging(out, args.force, command="locate") as tmp:
        effects.save(tmp / "effects.json")
        write_html(effect_figures(effects), tmp / "heatmap.html", title=f"biaslens locate · {args.model}")
    for s in effects.top_sites(5):
        print(f"{s.component:>5} layer {s.layer:>2} {s.role:<14} effect {s.effect:+.3f} "
              f"[{s.ci_low:+.3f}, {s.ci_high:+.3f}]")
    print(f"wrote {out / 'effects.json'} and {out / 'heatmap.html'}")
    return 0


COMMANDS = {
    "locate": ("trace where a model carries a bias (causal mediation) and draw the heatmaps",
               _add_arguments, _run),
}
