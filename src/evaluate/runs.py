"""What a debiasing run measures before and after, and which numbers head its report.

The library home of the choices the commands used to hold (docs/architecture.md, "One home per
fact"): :func:`edit_measures` / :func:`edit_summary` (``biaslens edit``), :func:`unlearn_measures`
(``biaslens unlearn``) and :data:`BEFORE_AFTER_ROWS` (the before/after table of ``biaslens demo``),
so a notebook measures a run exactly as the commands do. The headline is the stereotype contrast
on held-out templates (:data:`biaslens.evaluate.suite.HEADLINE`, src/evaluate/contrast.py).
Importing this module does not import torch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from biaslens.model import BiasModel

__all__ = ["BEFORE_AFTER_ROWS", "EDIT_SUMMARY_GAPS", "UNLEARN_SUMMARY_ROWS", "edit_measures",
           "edit_summary", "unlearn_measures"]

#: Metric rows of a before/after table: ``(benchmark, metric, label, lower_is_better)``; the first
#: row is the headline, the stereotype contrast on held-out templates (src/evaluate/contrast.py).
BEFORE_AFTER_ROWS: tuple[tuple[str, str, str, bool], ...] = (
    ("contrast_test", "mean_abs_contrast",
     "stereotype contrast (mean |contrast| over templates), edit occupations × test templates", True),
    ("contrast_test", "mean_contrast",
     "signed stereotype contrast, edit occupations × test templates", True),
    ("contrast_validation", "mean_abs_contrast",
     "stereotype contrast, edit occupations × validation templates", True),
    ("contrast_edit", "mean_abs_contrast", "stereotype contrast, edit occupations × edit templates", True),
    ("occupations_heldout_templates", "mean_abs_gap",
     "occupational pronoun gap, edit occupations × test templates", True),
    ("occupations_heldout_templates", "signed_gap",
     "signed gap toward the stereotype, edit occupations × test templates", True),
    ("occupations_train", "mean_abs_gap", "occupational pronoun gap, edit occupations × edit templates", True),
    ("occupations_train", "corr_bls", "correlation with BLS % female, edit prompts", True),
    ("occupations", "mean_abs_gap", "gap, held-out occupations × test templates", True),
    ("definitional", "accuracy", "definitional gender accuracy (king → he)", False),
    ("facts", "accuracy", "factual probe accuracy", False),
    ("perplexity", "perplexity", "perplexity on general text", True),
    ("second_bias", "mean_abs_gap", "second bias type gap (age → slow/quick; transfer)", True),
)

#: The ``(benchmark, metric)`` pairs :func:`edit_summary` reports after the contrasts.
EDIT_SUMMARY_GAPS: tuple[tuple[str, str], ...] = (
    ("occupations_heldout_templates", "mean_abs_gap"), ("occupations", "mean_abs_gap"),
    ("occupations_train", "mean_abs_gap"), ("definitional", "accuracy"),
    ("facts", "accuracy"), ("perplexity", "perplexity"))

#: ``(benchmark, metric, label)`` rows ``biaslens unlearn`` prints after the headline.
UNLEARN_SUMMARY_ROWS: tuple[tuple[str, str, str], ...] = (
    ("occupations_heldout_templates", "mean_abs_gap", "occupational gap, held-out templates"),
    ("occupations", "mean_abs_gap", "occupational gap, held-out occupations"),
    ("definitional", "accuracy", "definitional accuracy"),
    ("perplexity", "perplexity", "perplexity"))


def edit_measures(model: "BiasModel", prompts: Sequence[Any] | None = None,
                  corpus: str | None = None, limit: int | None = None) -> dict:
    """What an edit run measures before and after: the model's default suite
    (:func:`biaslens.evaluate.suite`, the stereotype contrast on held-out templates first); with
    the edit ``prompts`` (the user's occupations, a sample) their gap replaces
    ``occupations_train`` and their contrast ``contrast_edit`` (one scoring pass; when fewer than
    two of their templates have both a female- and a male-stereotyped occupation,
    ``contrast_edit`` stays the default prompts' and says so in ``note``); with a user ``corpus``
    (a text file, one document per line) its perplexity is added as ``perplexity_corpus``."""
    from biaslens.evaluate.fluency import perplexity
    from biaslens.evaluate.probes import occupational_bias
    from biaslens.evaluate.suite import bias_and_contrast, suite

    out = suite(model, limit=limit)
    if prompts is not None:
        try:
            out["occupations_train"], con = bias_and_contrast(model, prompts)
        except ValueError:  # no template with both stereotype sides: the gap alone
            out["occupations_train"], con = occupational_bias(model, prompts), None
        if con is not None and con["n"] >= 2:
            out["contrast_edit"] = {**con, "split": "the edit prompts x edit templates"}
        else:
            out["contrast_edit"]["note"] = ("fewer than two templates of the edit prompts have both "
                                            "a female- and a male-stereotyped occupation; this "
                                            "contrast is on the default edit prompts")
        out["occupations_train"]["split"] = "the edit prompts"
    if corpus:
        out["perplexity_corpus"] = perplexity(model, corpus, max_tokens=20_000, per_line=True)
    return out


def edit_summary(before: dict, after: dict) -> dict:
    """Headline numbers before and after, the headline first: the stereotype contrast on
    held-out templates (src/evaluate/contrast.py) with its relative ``cut``, CIs (the cut's a
    paired bootstrap over templates) and ``per_template`` rows; then the contrast on edit (and
    validation) templates, then :data:`EDIT_SUMMARY_GAPS` (gaps, definitional and fact accuracy,
    perplexity) with their relative ``change``."""
    from biaslens.evaluate.contrast import contrast_change

    out: dict = {}
    for name in ("contrast_test", "contrast_edit", "contrast_validation"):
        if name in before and name in after:
            ch = contrast_change(before[name], after[name])
            row = {"before": ch["before"], "after": ch["after"], "cut": ch["cut"], "ci": ch["ci"],
                   "n": ch["n"]}
            if name == "contrast_test":
                row["per_template"] = ch["per_template"]
            out[f"{name}.mean_abs_contrast"] = row
    for a, b in EDIT_SUMMARY_GAPS:
        if a in before and a in after:
            vb, va = float(before[a][b]), float(after[a][b])
            out[f"{a}.{b}"] = {"before": vb, "after": va}
            if vb and math.isfinite(vb) and math.isfinite(va):
                out[f"{a}.{b}"]["change"] = (va - vb) / abs(vb)
    return out


def unlearn_measures(model: Any, pairs: Sequence[Any] | None = None, limit: int | None = None) -> dict:
    """What an unlearning run measures before and after: the model's default suite
    (:func:`biaslens.evaluate.suite`), and with the user's contrast ``pairs``
    (:mod:`biaslens.unlearn.pairs`) ``pairs``: the share of pairs whose advantaged sentence the
    model prefers. ``model`` may be an offset pair (:class:`biaslens.unlearn.offset.OffsetModel`)."""
    from biaslens.evaluate.suite import suite

    res: dict[str, Any] = suite(model, limit=limit)
    if pairs:
        import torch

        with torch.no_grad():
            adv = model.sequence_logprobs([p.advantaged for p in pairs])
            dis = model.sequence_logprobs([p.disadvantaged for p in pairs])
        res["pairs"] = {"advantaged_preferred": float((adv > dis).float().mean()), "n": len(pairs)}
    return res
