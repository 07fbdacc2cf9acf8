"""``biaslens edit``: debias a model's MLP weights (LSDM, or a baseline), export it, report.

Writes ``OUT/model`` (a Hugging Face folder with ``delta.safetensors`` and ``manifest.json``) and
``OUT/report.json`` (bias and retention metrics before and after, the site and the diagnostics).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

__all__ = ["METHODS", "add_arguments", "read_occupations", "occupation_prompts", "run",
           "summary_line", "COMMANDS"]

METHODS = ("lsdm", "cda", "rome", "dama", "leace")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from biaslens.cliargs import positive_int
    from biaslens.edit.hparams import check_file

    p.add_argument("--method", choices=METHODS, default="lsdm",
                   help="lsdm (default), cda (counterfactual fine-tune), rome (rank-one, one layer)")
    p.add_argument("--model", required=True, help="'organism', 'organism-llama', a local Hugging Face folder, or a hub name")
    p.add_argument("--layers", default="auto",
                   help="'auto' (from --effects, else tracing) or comma-separated layers, e.g. 3,4")
    p.add_argument("--role", default="auto",
                   help="token role of the keys: auto | subject_last | subject_first | last")
    p.add_argument("--effects", help="effects.json written by `biaslens locate` to choose the site")
    p.add_argument("--occupations",
                   help="text file, one occupation per line (optionally 'name,percent_female'); "
                        "default: the 60 Winogender occupations (BLS %% female), or the organism's")
    p.add_argument("--corpus", help="general text (one document per line) for the key statistics; "
                                    "default: shipped WikiText-2 paragraphs (the organism: its own text)")
    p.add_argument("--max-prompts", type=positive_int, default=None,
                   help="edit with a seeded sample of this many prompts (and keep prompts), every "
                        "occupation equally (default: all)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="evaluate a seeded subset of this many items per prompt set (quick runs)")
    p.add_argument("--hparams", type=check_file,
                   help="JSON file of hyperparameters (LSDMHparams / CDAHparams fields); for lsdm "
                        "the mom2_weight / keep_weight it gives are used as they are, not tuned")
    p.add_argument("--tune", choices=("auto", "off"), default="auto",
                   help="lsdm: choose mom2_weight, keep_weight and the layers (those not given by "
                        "--hparams / --layers) on validation templates under retention bounds "
                        "(auto, default), or use the given/default values (off)")
    p.add_argument("--cache-dir", help="key-statistics cache (default $BIASLENS_CACHE or "
                                       "~/.cache/biaslens/cov)")
    p.add_argument("--out", required=True, help="output folder (new or empty; biaslens never writes into a folder of yours)")
    p.add_argument("--force", action="store_true", help="replace an output folder that biaslens wrote (never a folder holding your files)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def read_occupations(path: str | Path) -> list[tuple[str, float, str]]:
    """``(occupation, share female, "edit")`` rows from a file of 'name[,percent_female]' lines
    (percent female defaults to 50)."""
    from biaslens.errors import DataFormatError

    from biaslens.inputs import read_text

    path = Path(path)
    text = read_text(path, "occupations file")
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = [x.strip() for x in line.replace("\t", ",").split(",")]
        name = parts[0]
        try:
            rate = float(parts[1]) / 100.0 if len(parts) > 1 and parts[1] else 0.5
        except ValueError:
            raise DataFormatError(f"{path}:{n}: percent female must be a number, not {parts[1]!r}") from None
        if not name or not 0.0 <= rate <= 1.0 or len(parts) > 2:
            raise DataFormatError(f"{path}:{n}: expected 'occupation' or 'occupation,percent_female', "
                                  f"got {line!r}")
        rows.append((name, rate, "edit"))
    if not rows:
        raise DataFormatError(f"occupations file '{path}' lists no occupation")
    return rows


def occupation_prompts(model, rows: list[tuple[str, float, str]]) -> list:
    """The rows × the model's edit templates (:meth:`biaslens.defaults.Defaults.user_occupation_prompts`).
    An occupation the tokenizer cannot represent is refused (:meth:`BiasModel.check_words`)."""
    from biaslens.defaults import defaults_for

    if hasattr(model, "check_words"):
        model.check_words([name for name, _, _ in rows], "--occupations")
    return defaults_for(model).user_occupation_prompts(rows)


def run(args) -> int:
    import biaslens
    from biaslens.edit import counterfactual_finetune, lsdm, rome_rank_one
    from biaslens.edit.keys import check_role
    from biaslens.edit.site import parse_layers
    from biaslens.errors import BiasLensError
    from biaslens.evaluate.runs import edit_measures, edit_summary
    from biaslens.export import export
    from biaslens.io import prepare, staging

    t_start = time.perf_counter()
    out = prepare(args.out, args.force)  # fail before loading a large model
    layers = "auto" if args.layers == "auto" else parse_layers(args.layers)
    rows = read_occupations(args.occupations) if args.occupations else None
    if args.role != "auto":
        check_role(args.role)
    model = biaslens.load(args.model, device=args.device, dtype=args.dtype)
    if layers != "auto" and any(not 0 <= l < model.n_layers for l in layers):
        raise BiasLensError(f"--layers {args.layers} out of range: {args.model} has layers "
                            f"0..{model.n_layers - 1}")

    effects = args.effects
    if effects:  # a map of another model is refused now, not after measuring (warnings come later)
        from biaslens.locate import EffectMap

        effects = EffectMap.load(effects)
        effects.check_model(model, f"effect map '{args.effects}'")
    prompts = occupation_prompts(model, rows) if rows is not None else None
    keep = None
    if args.max_prompts:
        from biaslens.defaults import defaults_for

        prompts, keep = defaults_for(model).edit_sample(args.max_prompts, prompts)
    progress = not args.quiet
    print(f"biaslens edit: measuring {args.model} before the edit", file=sys.stderr)
    clock = {"load": round(time.perf_counter() - t_start, 3)}
    t = time.perf_counter()
    before = edit_measures(model, prompts, args.corpus, args.limit)
    clock["measure_before"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    if args.method == "lsdm":
        delta = lsdm(model, prompts, layers=layers, role=args.role, effect_map=effects,
                     corpus=args.corpus, hparams=args.hparams, keep_prompts=keep,
                     cache_dir=args.cache_dir, progress=progress, tune=args.tune)
    elif args.method == "rome":
        layer = layers if layers == "auto" else layers[-1]
        delta = rome_rank_one(model, layer, prompts, role=args.role, corpus=args.corpus,
                              hparams=args.hparams, effect_map=effects,
                              cache_dir=args.cache_dir, progress=progress)
    elif args.method in ("dama", "leace"):  # projection peers (biaslens.edit.projection / .erasure)
        from biaslens.edit import dama, leace

        delta = {"dama": dama, "leace": leace}[args.method](
            model, prompts, layers=layers, role=args.role, effect_map=effects,
            hparams=args.hparams, keep_prompts=keep, progress=progress)
    else:
        delta = counterfactual_finetune(model, layers, prompts, keep_prompts=keep, hparams=args.hparams,
                                        effect_map=effects, progress=progress)
    clock["edit"] = round(time.perf_counter() - t, 3)
    print("biaslens edit: measuring after the edit", file=sys.stderr)
    t = time.perf_counter()
    after = edit_measures(model, prompts, args.corpus, args.limit)
    clock["measure_after"] = round(time.perf_counter() - t, 3)
    report = {"model": args.model, "method": args.method, "site": delta.info.get("site"),
              "effect_map": delta.info.get("effect_map"), "hyperparameters": delta.hparams,
              "diagnostics": delta.info.get("diagnostics"), "changed_tensors": delta.stats(),
              "before": before, "after": after, "summary": edit_summary(before, after),
              "seconds": clock}  # wall seconds of each phase (export not included)
    from biaslens import jsonio

    with staging(out, args.force, command="edit") as tmp:  # OUT = model/ + report.json, as one
        export(model, tmp / "model", delta=delta,
               manifest={"edit": {"method": args.method, "site": delta.info.get("site")}})
        jsonio.write(tmp / "report.json", report)
    for k, v in report["summary"].items():
        print(summary_line(k, v))
    print(f"wrote {out / 'model'} and {out / 'report.json'}")
    return 0


def summary_line(key: str, row: dict) -> str:
    """One printed line of :func:`biaslens.evaluate.runs.edit_summary`: before -> after, and for
    a contrast the cut with its CI."""
    line = f"{key:<40} {row['before']:>10.4f} -> {row['after']:>10.4f}"
    if "cut" in row:
        lo, hi = row["ci"]["cut"]
        pct = lambda x: "  n/a" if x is None or x != x else f"{100 * x:+.0f}%"  # noqa: E731
        line += f"   cut {pct(row['cut'])} [CI {pct(lo)}, {pct(hi)}] over {row['n']} templates"
    elif "change" in row:
        line += f"   ({100 * row['change']:+.1f}%)"
    return line


COMMANDS = {
    "edit": ("remove a located bias from the MLP weights (LSDM, or the cda / rome baselines)",
             add_arguments, run),
}
