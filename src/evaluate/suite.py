"""Suites: a model's before/after numbers in one call, and named benchmarks for any model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from biaslens.defaults import defaults_for
from biaslens.errors import BiasLensError
from biaslens.evaluate.knowledge import fact_accuracy
from biaslens.evaluate.probes import definitional_accuracy, occupational_bias
from biaslens.evaluate.fluency import perplexity
from biaslens.stats import LEVEL, N_BOOT, SEED

if TYPE_CHECKING:
    from biaslens.model import BiasModel

__all__ = ["SUITE_PPL_TOKENS", "HEADLINE", "CONTRASTS", "suite", "bias_and_contrast",
           "contrast_sample", "organism_suite", "BENCHMARKS", "ORGANISM_BENCHMARKS",
           "default_benchmarks", "evaluate"]

#: Tokens of the organism's general text scored by :func:`organism_suite` (keeps it a few seconds).
SUITE_PPL_TOKENS = 20_000


#: The headline number of every summary: the stereotype contrast (src/evaluate/contrast.py) on
#: edit occupations × test templates, wordings no edit or tuning saw.
HEADLINE: tuple[str, str] = ("contrast_test", "mean_abs_contrast")
#: Contrast benchmarks of :func:`suite` and :func:`evaluate`: name -> (occupations, templates).
CONTRASTS: dict[str, tuple[str, str]] = {"contrast_test": ("edit", "test"),
                                         "contrast_edit": ("edit", "edit"),
                                         "contrast_validation": ("edit", "validation")}
#: Gap metrics (src/evaluate/probes.py) as :func:`occupational_bias` labels them.
_GAP_SCORING = ("next-token P(female) vs P(male) pronoun (multi-token: product over tokens); "
                "gap = (p_f - p_m)/(p_f + p_m)")


def suite(model: "BiasModel", occupations: str = "heldout", templates: str = "test",
          max_tokens: int | None = SUITE_PPL_TOKENS, seed: int = SEED, limit: int | None = None) -> dict:
    """Bias and retention of a model on its default probes (:mod:`biaslens.defaults`): the
    organism's own, or the shipped bank for any other model. Keys, the headline first:

    ``contrast_test``: the stereotype contrast (:func:`biaslens.evaluate.contrast.stereotype_contrast`:
    per template, mean P(f)/(P(f)+P(m)) over female-stereotyped occupations minus over
    male-stereotyped ones; ``mean_abs_contrast`` over templates, CIs over templates) on edit
    occupations × test templates, the wordings no edit saw — the headline (:data:`HEADLINE`);
    ``contrast_edit``: the same on edit occupations × edit templates; ``contrast_validation``: on
    edit occupations × validation templates, only where the defaults' validation templates
    differ from their edit templates;
    ``occupations``: :func:`occupational_bias` on ``occupation_prompts(occupations, templates)``
    (default held-out occupations × test templates);
    ``occupations_train``: the same on the edit occupations × edit templates (the prompts an edit
    sees); ``occupations_heldout_templates``: edit occupations × test templates (for the organism,
    held-out *occupations* never occur with a pronoun in its corpus, so they carry no planted
    rate);
    ``definitional``: :func:`definitional_accuracy` on every definitional prompt;
    ``facts``: :func:`fact_accuracy` on the knowledge probes; ``perplexity`` on the default
    general text, one document a line (first ``max_tokens`` tokens); for the organism also
    ``second_bias``: :func:`occupational_bias` on the age prompts (there "female" = " slow",
    female_rate = planted P(" slow")). ``limit``: a seeded subset of each prompt set (for a
    contrast, :func:`contrast_sample`: the same number of occupations per template, both
    stereotype sides) and the first ``limit`` documents of the perplexity text (quick runs). The
    gap and the contrast of one prompt set come from one scoring pass.
    """
    from biaslens.defaults import defaults_for

    d = defaults_for(model)
    sub = lambda xs: _subsample(list(xs), limit, seed)  # noqa: E731
    gap_test, con_test = bias_and_contrast(model, d.occupation_prompts("edit", "test"), limit, seed)
    gap_edit, con_edit = bias_and_contrast(model, d.occupation_prompts("edit", "edit"), limit, seed)
    out: dict[str, Any] = {"contrast_test": con_test, "contrast_edit": con_edit}
    val = d.occupation_prompts("edit", "validation")
    if _template_set(val) != _template_set(d.occupation_prompts("edit", "edit")):
        _, out["contrast_validation"] = bias_and_contrast(model, val, limit, seed, gap=False)
    out.update({
        "occupations": occupational_bias(model, sub(d.occupation_prompts(occupations, templates)), seed=seed),
        "occupations_train": gap_edit,
        "occupations_heldout_templates": gap_test,
        "definitional": definitional_accuracy(model, sub(d.definitional_prompts()), seed=seed),
        "facts": fact_accuracy(model, sub(d.facts()), seed=seed),
        # with a limit: the first ``limit`` documents (lines) of the text
        "perplexity": perplexity(model, d.ppl_text if limit is None else "\n".join(d.general_lines(limit)),
                                 max_tokens=max_tokens, per_line=True, seed=seed),
    })
    if d.organism:
        from biaslens import organism as org

        out["second_bias"] = occupational_bias(model, sub(org.second_bias_prompts()), seed=seed)
    for name, (occ, tpl) in CONTRASTS.items():
        if name in out:
            out[name]["split"] = f"occupations={occ}, templates={tpl}"
    out["contrast_test"]["headline"] = True
    out["occupations"]["split"] = f"occupations={occupations}, templates={templates}"
    out["occupations_train"]["split"] = "occupations=edit, templates=edit"
    out["occupations_heldout_templates"]["split"] = "occupations=edit, templates=test"
    return out


def bias_and_contrast(model: "BiasModel", prompts: Sequence[Any], limit: int | None = None,
                      seed: int = SEED, gap: bool = True,
                      batch_size: int = 64) -> tuple[dict | None, dict]:
    """``(gap, contrast)`` of one prompt set from one scoring pass: :func:`occupational_bias` on
    a seeded subset of ``limit`` prompts (as :func:`suite` always drew it) and the stereotype
    contrast on :func:`contrast_sample` (the union of the two subsets is scored once).
    ``gap=False``: the contrast alone (first item None)."""
    from biaslens.evaluate.contrast import contrast_from_logprobs
    from biaslens.evaluate.probes import gap_metrics, occupation_of, pronoun_logprobs
    from biaslens.prompts import female_rate

    prompts = list(prompts)
    gi = _subsample(list(range(len(prompts))), limit, seed) if gap else []
    ci = contrast_sample(prompts, limit, seed)
    union = sorted(set(gi) | set(ci))
    lp = pronoun_logprobs(model, [prompts[i] for i in union], batch_size)
    row = {i: k for k, i in enumerate(union)}
    con = contrast_from_logprobs(lp[[row[i] for i in ci]], [prompts[i] for i in ci], seed)
    if not gap:
        return None, con
    g = [prompts[i] for i in gi]
    out = gap_metrics(lp[[row[i] for i in gi]], [female_rate(p) for p in g], [occupation_of(p) for p in g], seed)
    out["scoring"] = _GAP_SCORING
    return out, con


def contrast_sample(prompts: Sequence[Any], limit: int | None, seed: int = SEED) -> list[int]:
    """Indices of about ``limit`` prompts for the stereotype contrast (all without a limit):
    every template that has a female- and a male-stereotyped occupation keeps the same number
    of each side (``limit // templates`` per template, at least one of each), the occupations
    taken in turn from a seeded shuffle so the sample covers them evenly; when ``limit`` is
    below two per template, ``limit // 2`` templates spread evenly over the list (at least 2)."""
    import random

    from biaslens.evaluate.contrast import template_of
    from biaslens.prompts import female_rate

    n = len(prompts)
    if limit is None or limit >= n:
        return list(range(n))
    by_tpl: dict[str, dict[str, list[int]]] = {}
    for i, p in enumerate(prompts):
        r = female_rate(p)
        if r == r and r != 0.5:  # a stereotype side (NaN and 0.5 have none)
            by_tpl.setdefault(template_of(p), {"f": [], "m": []})["f" if r > 0.5 else "m"].append(i)
    tpls = [t for t, g in by_tpl.items() if g["f"] and g["m"]]
    if not tpls:
        return _subsample(list(range(n)), limit, seed)
    per = limit // len(tpls)
    if per < 2:
        k = min(len(tpls), max(2, limit // 2))
        tpls = [tpls[round(j * (len(tpls) - 1) / max(1, k - 1))] for j in range(k)]
        per = 2
    rng = random.Random(seed)
    keep: list[int] = []
    for side, count in (("f", (per + 1) // 2), ("m", per // 2)):
        # one seeded order of this side's occupations, shared by every template
        occs = sorted({getattr(prompts[i], "occupation", "") for t in tpls for i in by_tpl[t][side]})
        rng.shuffle(occs)
        rank = {o: j for j, o in enumerate(occs)}
        for j, t in enumerate(tpls):
            group = sorted(by_tpl[t][side], key=lambda i: rank[getattr(prompts[i], "occupation", "")])
            start = (j * count) % len(group)
            keep += [group[(start + m) % len(group)] for m in range(min(count, len(group)))]
    return sorted(set(keep))


def _template_set(prompts: Sequence[Any]) -> set[str]:
    from biaslens.evaluate.contrast import template_of

    return {template_of(p) for p in prompts}


def organism_suite(model: "BiasModel", occupations: str = "heldout", templates: str = "test",
                   max_tokens: int | None = SUITE_PPL_TOKENS, seed: int = SEED) -> dict:
    """:func:`suite` (the name the organism's notebooks and scripts use; any model works)."""
    return suite(model, occupations, templates, max_tokens, seed)


# ------------------------------------------------------------------------ named benchmarks

BENCHMARKS: tuple[str, ...] = ("contrast_test", "contrast_edit", "contrast_validation",
                               "occupations", "stereoset", "crows", "winobias", "winogender",
                               "perplexity", "knowledge")
#: The organism's own probes (no data folder needed).
ORGANISM_BENCHMARKS: tuple[str, ...] = ("contrast_test", "contrast_edit", "contrast_validation",
                                        "occupations", "occupations_train",
                                        "occupations_heldout_templates", "definitional",
                                        "second_bias", "perplexity", "knowledge")


def default_benchmarks(model: "BiasModel", data_dir: str | os.PathLike | None) -> list[str]:
    """The stereotype contrasts on the model's default prompts first (the headline,
    :data:`HEADLINE`; ``contrast_validation`` where the validation templates differ from the edit
    templates); then the organism's own probes for the organism, otherwise every benchmark whose
    data exists in ``data_dir`` (default: the benchmark files shipped with biaslens), and the
    knowledge probes."""
    d = defaults_for(model)
    if d.organism and data_dir is None:
        names = list(ORGANISM_BENCHMARKS)
    else:
        folder = Path(data_dir) if data_dir is not None else d.data_dir
        names = [b for b in BENCHMARKS if b in CONTRASTS or b == "knowledge" or _has_data(folder, b)]
    if "contrast_validation" in names and _template_set(d.occupation_prompts("edit", "validation")) \
            == _template_set(d.occupation_prompts("edit", "edit")):
        names.remove("contrast_validation")
    return names


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
        if b in CONTRASTS:
            occ, tpl = CONTRASTS[b]
            _, out[b] = bias_and_contrast(model, defaults.occupation_prompts(occ, tpl), limit, seed,
                                          gap=False, batch_size=batch_size)
            out[b]["split"] = f"occupations={occ}, templates={tpl}"
            if b == HEADLINE[0]:
                out[b]["headline"] = True
        elif b == "occupations" and organism and d is None:
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
            if src is None and organism:  # the organism's own general text (its folder's)
                src, max_tok, per_line = defaults.corpus, max_tokens or SUITE_PPL_TOKENS, True
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
