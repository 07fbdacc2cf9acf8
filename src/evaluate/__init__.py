"""Evaluate bias and retained capability, before and after an edit, with bootstrap CIs.

Organism-level (used by the edit and unlearning methods): :func:`occupational_bias`,
:func:`definitional_accuracy`, :func:`fact_accuracy`, :func:`perplexity`, :func:`suite` (any model's default probes).
Public benchmarks (docs/methods/evaluation.md): :func:`crows_pairs`, :func:`stereoset`, :func:`winobias`,
:func:`winogender`, :func:`occupations`, with loaders in :mod:`biaslens.evaluate.loaders`;
:func:`evaluate` runs named benchmarks; :func:`compare_table` / :func:`compare_figure` show
before/after. Every result is ``{metric: value, ..., "n": items, "ci": {metric: [low, high]}}``.
Importing this package does not import torch.
"""

from __future__ import annotations

# Eager, explicit imports (docs/architecture.md): no module shares a name with a function here
# (perplexity lives in `fluency`, the organism probes in `probes`); these modules import numpy at
# module level and torch only inside functions.
from biaslens.evaluate.benchmarks import (VIG_TEMPLATES, crows_metrics, crows_pairs, icat,
                                          occupations, pair_metrics, stereoset, stereoset_metrics,
                                          winobias, winogender)
from biaslens.evaluate.contrast import contrast_metrics, relative_cut, stereotype_contrast
from biaslens.evaluate.compare import compare_figure, compare_rows, compare_table
from biaslens.evaluate.knowledge import fact_accuracy
from biaslens.evaluate.loaders import (load_crows_pairs, load_occupation_stats, load_probes,
                                       load_stereoset, load_winobias, load_winogender)
from biaslens.evaluate.probes import definitional_accuracy, gap_metrics, occupational_bias
from biaslens.evaluate.fluency import perplexity
from biaslens.stats import bootstrap_ci
from biaslens.evaluate.suite import BENCHMARKS, evaluate, organism_suite, suite
from biaslens.evaluate.runs import edit_measures, edit_summary, unlearn_measures

__all__ = [
    "stereotype_contrast", "contrast_metrics", "relative_cut",
    "occupational_bias", "definitional_accuracy", "fact_accuracy", "perplexity", "suite", "organism_suite",
    "evaluate", "BENCHMARKS", "crows_pairs", "stereoset", "winobias", "winogender", "occupations",
    "crows_metrics", "stereoset_metrics", "pair_metrics", "icat", "gap_metrics", "VIG_TEMPLATES",
    "compare_table", "compare_figure", "compare_rows", "bootstrap_ci",
    "load_crows_pairs", "load_stereoset", "load_winobias", "load_winogender",
    "load_occupation_stats", "load_probes", "edit_measures", "edit_summary", "unlearn_measures",
]
