"""Suites: a model's before/after numbers in one call, and named benchmarks for any model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from biaslens.defaults import defaults_for
from biaslens.errors import BiasLensError
from biaslens.evaluate.knowledge import fact_accuracy
from biaslens.evaluate.occupations import definitional_accuracy, occupational_bias
from biaslens.evaluate.perplexity import perplexity
from biaslens.evaluate.stats import LEVEL, N_BOOT, SEED

if TYPE_CHECKING:
    from biaslens.model import BiasModel

#: Tokens of the organism's general text scored by :func:`organism_suite` (keeps it a few seconds).
SUITE_PPL_TOKENS = 20_000


def suite(model: "BiasModel", occupations: str = "heldout", templates: str = "test",
          max_tokens: int | None = SUITE_PPL_TOKENS, seed: int = SEED, limit: int | None = None) -> dict:
    """Bias and retention of a model on its default probes (:mod:`biaslens.defaults`): the
    organism's own, or the shipped bank for any other model. Keys:

    ``occupations``: :func:`occupational_bias` on ``occupation_prompts(occupations, templates)``
    (default held-out occupations × test templates);
    ``occupations_train``: the same on the edit occupations × edit templates (the prompts an edit
    sees); ``occupations_heldout_templates``: edit occupations × test templates (the bias on
    wordings no edit saw; for the organism, held-out *occupations* never occur with a pronoun in
    its corpus, so they carry no planted rate and this is its headline);
    ``definitional``: :func:`definitional_accuracy` on every definitional prompt;
    ``facts``: :func:`fact_accuracy` on the knowledge probes; ``perplexity`` on the default
    general text, one document a line (first ``max_tokens`` tokens); for the organism also
    ``second_bias``: :func:`occupational_bias` on the age prompts (there "female" = " slow",
    female_rate = planted P(" slow")). ``limit``: a seeded subset of each prompt set and the first
    ``limit`` documents of the perplexity text (quick runs).
    """
    from biaslens.defaults import defaults_for

    d = defaults_for(model)
    sub = lambda xs: _subsample(list(xs), limit, seed)  # noqa: E731
    out = {
        "occupations": occupational_bias(model, sub(d.occupation_prompts(occupations, templates)), seed=seed),
        "occupations_train": occupational_bias(model, sub(d.occupation_prompts("edit", "edit")), seed=seed),
        "occupations_heldout_templates": occupational_bias(
            model, sub(d.occupation_prompts("edit", "test")), seed=seed),
        "definitional": definitional_accuracy(model, sub(d.definitional_prompts()), seed=seed),
        "facts": fact_accuracy(model, sub(d.facts()), seed=seed),
        # with a limit: the first ``limit`` documents (lines) of the text
        "perplexity": perplexity(model, d.ppl_text if limit is None else "\n".join(d.general_lines(limit)),
                                 max_tokens=max_tokens, per_line=True, seed=seed),
    }
    if d.organism:
        from biaslens import organism as org

        out["second_bias"] = occupational_bias(model, sub(org.second_bias_prompts()), seed=seed)
    out["occupations"]["split"] = f"occupations={occupations}, templates={templates}"
    out["occupations_train"]["split"] = "occupations=edit, templates=edit"
    out["occupations_heldout_templates"]["split"] = "occupations=edit, templates=test"
    return out


def organism_suite(model: "BiasModel", occupations: str = "heldout", templates: str = "test",
                   max_tokens: int | None = SUITE_PPL_TOKENS, seed: int = SEED) -> dict:
    """:func:`suite` (the name the organism's notebooks and scripts use; any model works)."""
    return suite(model, occupations, templates, max_tokens, seed)


# ------------------------------------------------------------------------ named benchmarks

BENCHMARKS: tuple[str, ...] = ("occupations", "stereoset", "crows", "winobias", "winogender",
                               "perplexity", "knowledge")
#: The organism's own probes (no data folder needed).
ORGANISM_BENCHMARKS: tuple[str, ...] = ("occupations", "occupations_train",
                                        "occupations_heldout_templates", "definitional",
                                        "second_bias", "perplexity", "knowledge")


def default_benchmarks(model: "BiasModel", data_dir: str | os.PathLike | None) -> list[str]:
    """The organism's own probes for the organism; otherwise every benchmark whose data exists in
    ``data_dir`` (default: the benchmark files shipped with biaslens), and the knowledge probes."""
    d = defaults_for(model)
    if d.organism and data_dir is None:
        return list(ORGANISM_BENCHMARKS)
    folder = Path(data_dir) if data_dir is not None else d.data_dir
    return [b for b in BENCHMARKS if b == "knowledge" or _has_data(folder, b)]


def _has_data(d: Path, bench: str) -> bool:
    try:
        _data_files(d, bench)
        return True
    except BiasLensError:
        return False


def _first(d: Path, candidates: Sequence[str], bench: str) -> Path:
    for c in candidates:
        hits = sorted(d.glob(c))
        if hits:
            return hits[0]
    raise BiasLensError(f"{bench} needs one of {', '.join(candidates)} under the data folder '{d}'; "
                        "pass --data-dir laid out like the public data folder (see the README)")


def _data_files(d: Path, bench: str) -> dict[str, Any]:
    """Where each benchmark's files live in a data folder laid out like :mod:`biaslens.data`."""
    if bench == "crows":
        return {"csv": _first(d, ["crows-pairs/crows_pairs_anonymized.csv"], bench)}
    if bench == "stereoset":
        try:
            return {"files": [_first(d, ["stereoset/*.jsonl", "stereoset/dev.json",
                                         "stereoset/test.json"], bench)]}
        except BiasLensError:
            files = sorted(d.glob("stereoset/editbias/*.json"))
            if not files:
                raise
            return {"files": files}
    if bench == "winobias":
        out = {}
        for t in (1, 2):
            out[t] = tuple(_first(d, [f"winobias/{s}_stereotyped_type{t}.txt.dev",
                                      f"winobias/{s}_stereotyped_type{t}.txt.test"], bench)
                           for s in ("pro", "anti"))
        return out
    if bench == "winogender":
        return {"sentences": _first(d, ["winogender/all_sentences.tsv"], bench),
                "stats": _first(d, ["winogender/occupations-stats.tsv"], bench)}
    if bench == "occupations":
        return {"stats": _first(d, ["winogender/occupations-stats.tsv",
                                    "vig-causal-mediation/winogender_occupation_stats.tsv"], bench)}
    if bench == "perplexity":
        return {"text": _first(d, ["wikitext-2-raw/wiki.test.raw"], bench)}
    raise BiasLensError(f"unknown benchmark '{bench}' (choose from {', '.join(BENCHMARKS)})")


def _subsample(items: list, limit: int | None, seed: int) -> list:
    """A seeded random subset of ``limit`` items (in their original order), or all of them."""
    if limit is None or limit >= len(items):
        return items
    import random

    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def evaluate(model: "BiasModel", benchmarks: Sequence[str] | None = None,
             data_dir: str | os.PathLike | None = None, text: str | os.PathLike | None = None,
             probes: str | os.PathLike | None = None, limit: int | None = None,
             max_tokens: int | None = None, batch_size: int = 32, seed: int = SEED) -> dict:
    """Run named benchmarks → ``{"model", "benchmarks": {name: result}, "settings"}``.

    ``benchmarks`` from :data:`BENCHMARKS` (and, for the organism, :data:`ORGANISM_BENCHMARKS`);
    default: :func:`default_benchmarks`. ``data_dir`` is laid out like the public data folder;
    ``text`` is the perplexity text (default: WikiText-2 test in ``data_dir``, or the organism's
    general text); ``probes`` a JSONL of prompt → answer for ``knowledge`` (default for the
    organism: its FACTS). ``limit`` keeps a seeded random subset of each benchmark's items.
    """
    from biaslens.evaluate import benchmarks as bm
    from biaslens.evaluate import loaders as ld

    names = list(benchmarks) if benchmarks else default_benchmarks(model, data_dir)
    if not names:
        raise BiasLensError("no benchmarks to run: pass --data-dir with the benchmark files, "
                            "or choose --benchmarks perplexity/knowledge with --text/--probes")
    defaults = defaults_for(model)
    organism = defaults.organism
    allowed = set(BENCHMARKS) | (set(ORGANISM_BENCHMARKS) if organism else set())
    unknown = [b for b in names if b not in allowed]
    if unknown:
        raise BiasLensError(f"unknown benchmark(s) {', '.join(unknown)}; choose from "
                            f"{', '.join(sorted(allowed))}")
    d = Path(data_dir).expanduser() if data_dir is not None else defaults.data_dir
    if d is not None and not d.is_dir():
        raise BiasLensError(f"data folder '{d}' does not exist; pass a folder laid out like the public data")

    def files(b):
        if d is None:
            raise BiasLensError(f"{b} needs --data-dir (a folder laid out like the public data folder)")
        return _data_files(d, b)

    sub = lambda xs: _subsample(list(xs), limit, seed)  # noqa: E731
    out: dict[str, dict] = {}
    for b in names:
        if b == "occupations" and organism and d is None:
            from biaslens import organism as org

            out[b] = occupational_bias(model, sub(org.occupation_prompts("heldout", "heldout")), seed=seed)
            out[b]["split"] = "organism: occupations=heldout, templates=heldout"
        elif b == "occupations":
            rates = ld.load_occupation_stats(files(b)["stats"])
            out[b] = bm.occupations(model, dict(sub(rates.items())), batch_size=batch_size, seed=seed)
        elif b in ("occupations_train", "occupations_heldout_templates", "definitional", "second_bias"):
            from biaslens import organism as org

            prompts = {"occupations_train": lambda: org.occupation_prompts("train", "train"),
                       "occupations_heldout_templates": lambda: org.occupation_prompts("train", "heldout"),
                       "definitional": org.definitional_prompts,
                       "second_bias": org.second_bias_prompts}[b]()
            fn = definitional_accuracy if b == "definitional" else occupational_bias
            out[b] = fn(model, sub(prompts), seed=seed)
        elif b == "crows":
            pairs = sub(ld.load_crows_pairs(files(b)["csv"]))
            out[b] = bm.crows_pairs(model, pairs, batch_size=batch_size, seed=seed)
        elif b == "stereoset":
            items = [x for f in files(b)["files"] for x in ld.load_stereoset(f)]
            out[b] = bm.stereoset(model, sub(items), batch_size=batch_size, seed=seed)
        elif b == "winobias":
            wb = {}
            for t, (pro, anti) in files(b).items():
                pro_i, anti_i = ld.load_winobias(pro), ld.load_winobias(anti)
                keep = _subsample(list(range(len(pro_i))), limit, seed)
                wb[t] = ([pro_i[i] for i in keep], [anti_i[i] for i in keep if i < len(anti_i)])
            out[b] = bm.winobias(model, wb, seed=seed)
        elif b == "winogender":
            f = files(b)
            sents = ld.load_winogender(f["sentences"])
            out[b] = bm.winogender(model, sents, ld.load_occupation_stats(f["stats"]), seed=seed)
        elif b == "perplexity":
            src = text
            if src is None and d is not None and _has_data(d, b):
                src = files(b)["text"]
            if src is None and organism:
                from biaslens import organism as org

                src, max_tok, per_line = org.GENERAL_TEXT, max_tokens or SUITE_PPL_TOKENS, True
            else:
                max_tok, per_line = max_tokens, False
            if src is None:
                raise BiasLensError("perplexity needs --text FILE (or --data-dir with wikitext-2-raw/)")
            out[b] = perplexity(model, Path(src), max_tokens=max_tok, per_line=per_line, seed=seed)
        elif b == "knowledge":
            if probes is not None:
                facts = [(p.prompt, p.answer) for p in ld.load_probes(probes)]
                source = str(probes)
            else:
                facts, source = defaults.facts(), f"{defaults.kind} default probes"
            out[b] = fact_accuracy(model, sub(facts), seed=seed)
            out[b]["source"] = source
    return {"model": model.spec, "benchmarks": out,
            "settings": {"seed": seed, "limit": limit, "data_dir": str(d) if d else None,
                         "n_boot": N_BOOT, "ci_level": LEVEL}}
