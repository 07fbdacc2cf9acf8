"""``biaslens unlearn``: run one unlearning method, export the result, write before/after.

    biaslens unlearn --method pcgu|task-vector|offset|masked-ascent --model M [--pairs FILE]
                     [--small-model M2] [--max-steps N] [--seed S] --out DIR [--force]

Writes an exported Hugging Face folder (for ``offset``: the offset pair, see
:func:`~biaslens.unlearn.offset.export_offset`) and ``DIR/report.json`` with the metrics before
and after. Without ``--pairs`` the model's default data are used (:mod:`biaslens.defaults`:
the organism's own stereotyped text, or the shipped bank for any other model). Every method
chooses its strength on the model's validation split under the same bounds
(:mod:`biaslens.unlearn.select`); the sweep and the choice are in ``report.json`` ("info") and
the manifest. No torch import at module level.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["METHODS", "ALPHA_MAX", "add_arguments", "unchanged_note", "run", "COMMANDS"]

METHODS = ("pcgu", "task-vector", "offset", "masked-ascent")
#: the largest |--alpha| accepted (beyond it the offset logits overflow)
ALPHA_MAX = 1e3


def add_arguments(p: argparse.ArgumentParser) -> None:
    from biaslens.cliargs import float_in, positive_int, seed_int

    p.add_argument("--method", required=True, help="pcgu | task-vector | offset | masked-ascent")
    p.add_argument("--model", required=True, help="'organism', 'organism-llama', a local Hugging Face folder, or a hub name")
    p.add_argument("--pairs", help="data: a pairs source (Winogender folder, CrowS-Pairs .csv, StereoSet "
                                   ".json, pairs .jsonl) or a span JSONL ({\"text\", \"spans\"}); "
                                   "default: the model's default stereotyped data (biaslens.defaults)")
    p.add_argument("--small-model", help="offset: the small model M_o with the same tokenizer "
                                         "(default: the model itself)")
    p.add_argument("--max-steps", type=positive_int, default=None, help="cap on training steps")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--lr", type=float_in(0, 100, lo_open=True), default=None,
                   help="learning rate in (0, 100] (default: the method's)")
    p.add_argument("--lora-rank", type=positive_int, default=None,
                   help="task-vector: fine-tune a rank-r factorised update (LoRA's parametrisation; it "
                        "still computes full weight gradients, so it saves optimiser memory only; "
                        "default: full weights)")
    p.add_argument("--loss", default="kl", help="offset: grad_ascent | grad_diff | kl (default: kl)")
    p.add_argument("--alpha", type=float_in(-ALPHA_MAX, ALPHA_MAX), default=1.0,
                   help=f"offset: strength α of the offset, in [-{ALPHA_MAX:g}, {ALPHA_MAX:g}]")
    p.add_argument("--ppl-bound", type=float_in(1.0), default=1.1,
                   help="perplexity may rise to this multiple (>= 1) of its starting value (default 1.1)")
    p.add_argument("--max-prompts", type=positive_int, default=None,
                   help="train on a seeded sample of this many pairs / forget texts, with as many "
                        "retain texts, keep and validation prompts and perplexity lines (default: all)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="evaluate a seeded subset of this many items per prompt set (quick runs)")
    p.add_argument("--out", required=True, help="output folder (new or empty; biaslens never writes into a folder of yours)")
    p.add_argument("--force", action="store_true", help="replace an output folder that biaslens wrote (never a folder holding your files)")


def _check_args(args) -> None:
    from biaslens.errors import BiasLensError

    if args.method not in METHODS:
        raise BiasLensError(f"unknown --method '{args.method}' (use one of: {', '.join(METHODS)})")
    from biaslens.cliargs import check, float_in, positive_int, seed_int

    # the parser checks these; a namespace built by hand gets the same checks here
    for flag, parse in (("--max-steps", positive_int), ("--lora-rank", positive_int),
                        ("--max-prompts", positive_int), ("--limit", positive_int),
                        ("--seed", seed_int), ("--lr", float_in(0, 100, lo_open=True)),
                        ("--alpha", float_in(-ALPHA_MAX, ALPHA_MAX)), ("--ppl-bound", float_in(1.0))):
        check(getattr(args, flag[2:].replace("-", "_"), None), parse, flag)
    if args.pairs is not None and not Path(args.pairs).exists() and args.pairs != "organism":
        raise BiasLensError(f"--pairs '{args.pairs}' does not exist; pass a data file or folder")
    from biaslens.unlearn.offset import LOSSES

    if args.loss not in LOSSES:
        raise BiasLensError(f"unknown --loss '{args.loss}' (use one of: {', '.join(LOSSES)})")
    if args.small_model and args.method != "offset":
        raise BiasLensError("--small-model is only used by --method offset")


def _run_method(model, args, data):
    """:func:`biaslens.unlearn.runs.run_method` with the command's arguments."""
    from biaslens.unlearn.runs import run_method

    return run_method(model, args.method, data, seed=args.seed, ppl_bound=args.ppl_bound,
                      max_prompts=args.max_prompts, max_steps=args.max_steps, lr=args.lr,
                      lora_rank=args.lora_rank, alpha=args.alpha, loss=args.loss,
                      small_model=args.small_model)


def unchanged_note(delta, method: str) -> str | None:
    """A note when a result changed no weight (e.g. no step lowered the validation gap, so the
    best state is the start): the export is then the base model, and says so."""
    if delta is not None and delta.names:
        return None
    info = getattr(delta, "info", None) or {}
    chosen = info.get("chosen") or {}
    where = (f"step {chosen['step']}" if "step" in chosen
             else f"lambda {chosen['lambda']:g}" if "lambda" in chosen else None)
    why = (f": the best state was {where}, none improved on the start within the bounds" if where
           else (f": {info['note']}" if info.get("note") else ""))
    return (f"{method} changed no weight{why}; the exported weights equal the base model "
            "(try a larger --lr, more --max-steps or a looser --ppl-bound)")


def run(args) -> int:
    import biaslens
    from biaslens.evaluate.runs import unlearn_measures
    from biaslens.export import export
    from biaslens.io import prepare
    from biaslens.unlearn.runs import run_data

    _check_args(args)
    out = prepare(args.out, args.force)  # fail before any work
    model = biaslens.load(args.model, device=args.device, dtype=args.dtype)
    data = run_data(model, args.pairs, seed=args.seed, max_prompts=args.max_prompts)
    user_pairs = data["pairs"] if args.pairs else None  # the preference on the user's pairs
    before = unlearn_measures(model, user_pairs, limit=args.limit)
    t0 = time.perf_counter()
    scored, result = _run_method(model, args, data)
    seconds = time.perf_counter() - t0
    note = unchanged_note(result.delta if args.method == "offset" else result, args.method)
    after = unlearn_measures(scored, user_pairs, limit=args.limit)
    report = {"method": args.method, "model": args.model, "data": str(data["source"]),
              "n_forget": len(data["forget"]), "seconds": seconds, "changed": note is None,
              "note": note, "before": before, "after": after}
    if args.method == "offset":
        from biaslens.unlearn.offset import export_offset

        report["alpha"], report["hyperparameters"] = result.alpha, result.delta.hparams
        report["info"] = {k: v for k, v in result.delta.info.items()
                          if k in ("chosen", "stopped", "alpha_sweep", "selection")}
        export_offset(result, out, force=args.force, files={"report.json": report})
    else:
        report["hyperparameters"] = result.hparams
        report["info"] = {k: v for k, v in result.info.items()
                          if k in ("lambda", "sweep", "chosen", "chosen_run", "stopped", "selection")}
        export(model, out, delta=result, force=args.force, manifest={"data": str(data["source"])},
               files={"report.json": report}, command="unlearn")
    if note:
        print(f"biaslens unlearn: note: {note}", file=sys.stderr)
    _print_summary(report, out)
    return 0


def _print_summary(report: dict, out) -> None:
    """The headline first (the stereotype contrast on held-out templates: before -> after, cut
    with a paired bootstrap CI over templates), then the occupational gaps, definitional
    accuracy and perplexity."""
    from biaslens.evaluate.compare import headline_text
    from biaslens.evaluate.runs import UNLEARN_SUMMARY_ROWS

    print(f"unlearn {report['method']}: wrote {out} in {report['seconds']:.0f}s")
    top = headline_text(report["before"], report["after"])
    if top:
        print(f"  headline: {top}")
    for bench, metric, label in UNLEARN_SUMMARY_ROWS:
        b = report["before"].get(bench, {}).get(metric)
        a = report["after"].get(bench, {}).get(metric)
        if b is not None and a is not None:
            rel = f" ({100 * (a - b) / abs(b):+.1f}%)" if b else ""
            print(f"  {label}: {b:.4g} -> {a:.4g}{rel}")


COMMANDS = {
    "unlearn": ("unlearn a bias (PCGU, task-vector negation, δ-offset, masked-span ascent) and export",
                add_arguments, run),
}
