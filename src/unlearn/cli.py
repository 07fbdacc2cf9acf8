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
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["METHODS", "ALPHA_MAX", "add_arguments", "load_data", "measure", "validation",
           "unchanged_note", "run", "COMMANDS"]

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


def _is_span_file(path: Path) -> bool:
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    first = next((ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()), "")
    try:
        return "text" in json.loads(first)
    except (json.JSONDecodeError, TypeError):
        return False


def load_data(args, model) -> dict[str, Any]:
    """Pairs (for PCGU), forget texts with spans, retain texts, validation prompts and the
    perplexity texts used for model selection: the model's defaults
    (:meth:`biaslens.defaults.Defaults.unlearn_data`), with ``--pairs`` replacing the pairs and
    forget texts; ``keep``: the definitional prompts of the edit templates (the keep term's)."""
    from biaslens.defaults import defaults_for
    from biaslens.unlearn import data as D
    from biaslens.unlearn.pairs import load_pairs

    out = defaults_for(model).unlearn_data(seed=args.seed)
    if args.pairs is not None:
        out["source"] = args.pairs
        if args.pairs != "organism" and _is_span_file(Path(args.pairs)):
            out["forget"], out["pairs"] = D.read_span_jsonl(args.pairs), None
        else:
            out["pairs"] = load_pairs(args.pairs)
            out["forget"] = D.from_pairs(out["pairs"])
    out["keep"] = defaults_for(model).definitional_prompts("edit")  # the keep term's prompts
    n = args.max_prompts
    if n:
        import random

        out["ppl_texts"] = out["ppl_texts"][:n]
        if out["val_prompts"] and len(out["val_prompts"]) > n:
            # the contrast needs templates with both stereotype sides, so not a plain sample
            from biaslens.evaluate.suite import contrast_sample

            vp = out["val_prompts"]
            out["val_prompts"] = [vp[i] for i in contrast_sample(vp, n, seed=args.seed)]
        for key in ("pairs", "retain", "keep"):
            if out[key] and len(out[key]) > n:
                out[key] = random.Random(args.seed).sample(out[key], n)
        if out["pairs"]:
            out["forget"] = D.from_pairs(out["pairs"])
        elif len(out["forget"]) > n:
            out["forget"] = random.Random(args.seed).sample(out["forget"], n)
    return out


def measure(model, args, data) -> dict[str, Any]:
    """Before/after numbers: the model's default suite (:func:`biaslens.evaluate.suite`), and
    with ``--pairs`` the preference for the advantaged side of the user's pairs."""
    import torch

    from biaslens.evaluate import suite

    res: dict[str, Any] = suite(model, limit=args.limit)
    if args.pairs and data["pairs"]:
        with torch.no_grad():
            adv = model.sequence_logprobs([p.advantaged for p in data["pairs"]])
            dis = model.sequence_logprobs([p.disadvantaged for p in data["pairs"]])
        res["pairs"] = {"advantaged_preferred": float((adv > dis).float().mean()), "n": len(data["pairs"])}
    return res


def validation(model, args, data):
    """The validation every method chooses its strength on (:mod:`biaslens.unlearn.select`): the
    model's whole validation split (``occupation_prompts("edit", "validation")``) and its
    definitional validation prompts (with ``--max-prompts``: at most that many of each,
    :func:`~biaslens.unlearn.select.sample_prompts`), and the perplexity texts, under
    ``--ppl-bound`` and the definitional bounds."""
    from biaslens.defaults import defaults_for
    from biaslens.unlearn.select import Bounds, Validation, sample_prompts

    d = defaults_for(model)
    prompts, definitional = d.occupation_prompts("edit", "validation"), d.definitional_prompts("validation")
    if args.max_prompts:  # templates x a few occupations (words) of both directions: still a contrast
        prompts = sample_prompts(prompts, args.max_prompts, args.seed)
        definitional = sample_prompts(definitional, args.max_prompts, args.seed)
    return Validation(model, prompts=prompts, definitional=definitional, ppl_texts=data["ppl_texts"],
                      bounds=Bounds.from_ppl_bound(args.ppl_bound))


def _run_method(model, args, data):
    """Run the method with its strength chosen on the validation split; returns
    ``(scored_model, delta_or_offset)``."""
    from biaslens.errors import BiasLensError

    steps = args.max_steps
    val = validation(model, args, data)
    common = {"seed": args.seed, "ppl_bound": args.ppl_bound, "validation": val, "keep_prompts": data["keep"]}
    if args.method == "pcgu":
        from biaslens.unlearn.partitioned import pcgu

        if not data["pairs"]:
            raise BiasLensError("PCGU needs contrast pairs; pass --pairs with pairs, not a span file")
        kw = {"lrs": [args.lr]} if args.lr else {}
        return model, pcgu(model, data["pairs"], max_steps=steps, **common, **kw)
    if args.method == "task-vector":
        from biaslens.unlearn.task_vector import task_vector_negation

        kw = {"lr": args.lr} if args.lr else {}
        return model, task_vector_negation(model, data["forget"], lora_rank=args.lora_rank,
                                           steps=steps or 150, **common, **kw)
    if args.method == "masked-ascent":
        from biaslens.unlearn.masked_ascent import masked_span_ascent

        kw = {"lrs": [args.lr]} if args.lr else {}
        return model, masked_span_ascent(model, data["forget"], max_steps=steps or 200, **common, **kw)
    from biaslens.unlearn.offset import offset_unlearn

    kw = {"lr": args.lr} if args.lr else {}
    small = args.small_model or model
    om = offset_unlearn(model, small, data["forget"], data["retain"], alpha=args.alpha, loss=args.loss,
                        max_steps=steps or 200, **common, **kw)
    return om, om


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
    from biaslens.export import export
    from biaslens.outdir import prepare

    _check_args(args)
    out = prepare(args.out, args.force)  # fail before any work
    model = biaslens.load(args.model, device=args.device, dtype=args.dtype)
    data = load_data(args, model)
    before = measure(model, args, data)
    t0 = time.perf_counter()
    scored, result = _run_method(model, args, data)
    seconds = time.perf_counter() - t0
    note = unchanged_note(result.delta if args.method == "offset" else result, args.method)
    after = measure(scored, args, data)
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

    print(f"unlearn {report['method']}: wrote {out} in {report['seconds']:.0f}s")
    top = headline_text(report["before"], report["after"])
    if top:
        print(f"  headline: {top}")
    for bench, metric, label in (("occupations_heldout_templates", "mean_abs_gap",
                                  "occupational gap, held-out templates"),
                                 ("occupations", "mean_abs_gap", "occupational gap, held-out occupations"),
                                 ("definitional", "accuracy", "definitional accuracy"),
                                 ("perplexity", "perplexity", "perplexity")):
        b = report["before"].get(bench, {}).get(metric)
        a = report["after"].get(bench, {}).get(metric)
        if b is not None and a is not None:
            rel = f" ({100 * (a - b) / abs(b):+.1f}%)" if b else ""
            print(f"  {label}: {b:.4g} -> {a:.4g}{rel}")


COMMANDS = {
    "unlearn": ("unlearn a bias (PCGU, task-vector negation, δ-offset, masked-span ascent) and export",
                add_arguments, run),
}
