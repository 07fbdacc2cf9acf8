"""``biaslens evaluate`` and ``biaslens compare`` (no torch import at module level)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["BENCH_HELP", "COMMANDS"]

BENCH_HELP = ("contrast_test, contrast_edit, contrast_validation, occupations, stereoset, crows, "
              "winobias, winogender, perplexity, knowledge")


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    from biaslens.cliargs import int_in, positive_int, seed_int

    p.add_argument("--model", required=True, help="'organism', 'organism-llama', a local Hugging Face folder, or a hub name")
    p.add_argument("--benchmarks", default=None,
                   help=f"comma-separated subset of {BENCH_HELP} (the organism also has "
                        "occupations_train, occupations_heldout_templates, definitional, "
                        "second_bias); default: the stereotype contrasts (contrast_test, the "
                        "held-out-template contrast, is the headline), then the organism's own "
                        "probes for the organism, else every benchmark (the data shipped with "
                        "biaslens, or --data-dir)")
    p.add_argument("--data-dir", default=None,
                   help="folder laid out like the public data folder (crows-pairs/, stereoset/, "
                        "winobias/, winogender/, wikitext-2-raw/); default: the copies shipped "
                        "with biaslens")
    p.add_argument("--text", default=None, help="text file for perplexity (default: WikiText-2 in "
                                                "the data folder, or the organism's general text)")
    p.add_argument("--probes", default=None,
                   help='JSONL of knowledge probes, {"prompt": ..., "answer": ...} a line '
                        "(default: the model's probes, see biaslens.defaults)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="score a seeded random subset of N items per benchmark (quick runs)")
    p.add_argument("--max-tokens", type=int_in(2), default=None,
                   help="perplexity: score only the first N (>= 2) tokens")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--seed", type=seed_int, default=0, help="bootstrap and subsampling seed (default 0)")
    p.add_argument("--threads", type=int_in(1, 1024), default=None,
                   help="torch CPU threads (default: torch's choice; 1 is often fastest for small "
                        "models on a busy machine)")
    p.add_argument("--json", required=True, help="write the results here (JSON)")
    p.add_argument("--html", default=None, help="also write a plotly chart of the results")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")


def _check_out(paths: dict, force: bool) -> None:
    """Each output file (flag -> path): its folder exists and is writable, and it does not exist
    unless ``force`` (:func:`biaslens.io.check_file`)."""
    from biaslens.io import check_file

    for what, p in paths.items():
        check_file(p, force, what)


def _evaluate(args) -> int:
    import biaslens
    from biaslens.evaluate.compare import compare_figure
    from biaslens.evaluate.suite import evaluate

    _check_out({"--json": args.json, "--html": args.html}, args.force)  # fail before loading a model
    names = [b.strip() for b in args.benchmarks.split(",") if b.strip()] if args.benchmarks else None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = biaslens.load(args.model, device=args.device, dtype=args.dtype)
    res = evaluate(model, names, data_dir=args.data_dir, text=args.text, probes=args.probes,
                   limit=args.limit, max_tokens=args.max_tokens, batch_size=args.batch_size,
                   seed=args.seed)
    from biaslens import jsonio
    from biaslens.io import write_text
    from biaslens.report import write_figures

    text = jsonio.dumps({"written_by": "biaslens", **res})  # strict JSON, non-finite values listed
    res = json.loads(text)  # the summary and chart show what the file holds
    write_text(args.json, text)
    print(_summary(res))
    if args.html:
        write_figures(compare_figure(res), args.html, title=f"biaslens evaluate · {args.model}")
    print(f"wrote {args.json}" + (f" and {args.html}" if args.html else ""))
    return 0


def _summary(res: dict) -> str:
    """The headline line (the stereotype contrast on held-out templates, when run), then one
    row per metric."""
    from biaslens.evaluate.compare import fmt_value, fmt_ci, flatten, headline_text

    rows = [(b, m, fmt_value(v["value"]), fmt_ci(v["ci"]), str(v["n"])) for (b, m), v in flatten(res).items()]
    head = ("benchmark", "metric", "value", "95% CI", "n")
    w = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    top = headline_text(res)
    table = "\n".join("  ".join(c.ljust(x) for c, x in zip(r, w)) for r in [head, *rows])
    return f"headline: {top}\n\n{table}" if top else table


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("before", help="JSON written by `biaslens evaluate` before the change")
    p.add_argument("after", help="JSON written by `biaslens evaluate` after the change")
    p.add_argument("--html", default=None, help="write a plotly before/after chart here")
    p.add_argument("--force", action="store_true", help="overwrite an existing --html file")


def _read(path: str) -> dict:
    from biaslens.errors import BiasLensError

    p = Path(path)
    if not p.is_file():
        raise BiasLensError(f"results file '{p}' does not exist; pass a JSON written by `biaslens evaluate`")
    try:
        res = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BiasLensError(f"'{p}' is not JSON ({exc.msg}, line {exc.lineno}); pass a JSON written "
                            "by `biaslens evaluate`") from None
    if not isinstance(res, dict) or not isinstance(res.get("benchmarks", res), dict):
        raise BiasLensError(f"'{p}' has no benchmarks; pass a JSON written by `biaslens evaluate`")
    return res


def _compare(args) -> int:
    from biaslens.evaluate.compare import compare_figure, compare_table

    _check_out({"--html": args.html}, args.force)
    before, after = _read(args.before), _read(args.after)
    print(compare_table(before, after))
    if args.html:
        from biaslens.report import write_figures

        write_figures(compare_figure(before, after), args.html, title="biaslens compare")
        print(f"wrote {args.html}")
    return 0


COMMANDS = {
    "evaluate": ("bias benchmarks and capability retention of a model, with bootstrap CIs",
                 _evaluate_args, _evaluate),
    "compare": ("before/after table and chart of two `biaslens evaluate` results",
                _compare_args, _compare),
}
