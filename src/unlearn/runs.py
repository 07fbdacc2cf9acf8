"""The data and validation of one unlearning run, as ``biaslens unlearn`` builds them.

:func:`run_data` gathers a run's pairs, forget / retain texts, keep prompts and perplexity texts
from the model's defaults (:meth:`biaslens.defaults.Defaults.unlearn_data`) or the user's file;
:func:`run_validation` is the validation every method chooses its strength on
(:mod:`biaslens.unlearn.select`); :func:`run_method` runs one method on them with the command's
defaults (:data:`DEFAULT_STEPS`). The command only parses its arguments and calls these, so a
notebook reproduces a command's run exactly (docs/architecture.md). This module is not
:mod:`biaslens.unlearn.data` because it reads :mod:`biaslens.defaults`, which itself reads
``unlearn.data`` for the default forget texts (no import cycle, docs/architecture.md).
Nothing here imports torch.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_STEPS", "is_span_file", "run_data", "run_validation", "run_method"]

#: Training steps of a method when ``max_steps`` is not given (PCGU: its own default).
DEFAULT_STEPS: dict[str, int] = {"task-vector": 150, "masked-ascent": 200, "offset": 200}


def is_span_file(path: str | Path) -> bool:
    """Whether ``path`` is a span JSONL (its first record has ``"text"``,
    :func:`biaslens.unlearn.data.read_span_jsonl`) rather than a pairs file."""
    path = Path(path)
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    first = next((ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()), "")
    try:
        return "text" in json.loads(first)
    except (json.JSONDecodeError, TypeError):
        return False


def run_data(model: Any, pairs: str | Path | None = None, seed: int = 0,
             max_prompts: int | None = None) -> dict[str, Any]:
    """Pairs (for PCGU), forget texts with spans, retain texts, validation prompts and the
    perplexity texts used for model selection: the model's defaults
    (:meth:`biaslens.defaults.Defaults.unlearn_data`), with ``pairs`` (a pairs source of
    :func:`biaslens.unlearn.pairs.load_pairs`, ``"organism"``, or a span JSONL) replacing the
    pairs and forget texts; ``keep``: the definitional prompts of the edit templates (the keep
    term's). With ``max_prompts`` every set holds at most that many (seeded samples; the
    validation prompts keep a contrast on their templates,
    :func:`biaslens.evaluate.suite.contrast_sample`)."""
    from biaslens.defaults import defaults_for
    from biaslens.unlearn import data as D
    from biaslens.unlearn.pairs import load_pairs

    out = defaults_for(model).unlearn_data(seed=seed)
    if pairs is not None:
        out["source"] = pairs
        if pairs != "organism" and is_span_file(pairs):
            out["forget"], out["pairs"] = D.read_span_jsonl(pairs), None
        else:
            out["pairs"] = load_pairs(pairs)
            out["forget"] = D.from_pairs(out["pairs"])
    out["keep"] = defaults_for(model).definitional_prompts("edit")  # the keep term's prompts
    n = max_prompts
    if n:
        out["ppl_texts"] = out["ppl_texts"][:n]
        if out["val_prompts"] and len(out["val_prompts"]) > n:
            # the contrast needs templates with both stereotype sides, so not a plain sample
            from biaslens.evaluate.suite import contrast_sample

            vp = out["val_prompts"]
            out["val_prompts"] = [vp[i] for i in contrast_sample(vp, n, seed=seed)]
        for key in ("pairs", "retain", "keep"):
            if out[key] and len(out[key]) > n:
                out[key] = random.Random(seed).sample(out[key], n)
        if out["pairs"]:
            out["forget"] = D.from_pairs(out["pairs"])
        elif len(out["forget"]) > n:
            out["forget"] = random.Random(seed).sample(out["forget"], n)
    return out


def run_validation(model: Any, ppl_texts, ppl_bound: float = 1.1, max_prompts: int | None = None,
                   seed: int = 0):
    """The validation every method chooses its strength on (:mod:`biaslens.unlearn.select`): the
    model's whole validation split (``occupation_prompts("edit", "validation")``) and its
    definitional prompts (:func:`~biaslens.unlearn.select.default_definitional`; with ``max_prompts``: at most that many of each,
    :func:`~biaslens.unlearn.select.sample_prompts`), and ``ppl_texts`` (``run_data(...)
    ["ppl_texts"]``), under ``ppl_bound`` and the definitional bounds."""
    from biaslens.defaults import defaults_for
    from biaslens.unlearn.select import Bounds, Validation, default_definitional, sample_prompts

    d = defaults_for(model)
    prompts, definitional = d.occupation_prompts("edit", "validation"), default_definitional(model)
    if max_prompts:  # templates x a few occupations (words) of both directions: still a contrast
        prompts = sample_prompts(prompts, max_prompts, seed)
        definitional = sample_prompts(definitional, max_prompts, seed)
    return Validation(model, prompts=prompts, definitional=definitional, ppl_texts=ppl_texts,
                      bounds=Bounds.from_ppl_bound(ppl_bound))


def run_method(model: Any, method: str, data: dict[str, Any], *, seed: int = 0,
               ppl_bound: float = 1.1, max_prompts: int | None = None, max_steps: int | None = None,
               lr: float | None = None, lora_rank: int | None = None, alpha: float = 1.0,
               loss: str = "kl", small_model: Any = None):
    """Run one unlearning ``method`` (``pcgu | task-vector | offset | masked-ascent``) on
    ``data`` (:func:`run_data`) with its strength chosen on :func:`run_validation` under
    ``ppl_bound``; returns ``(scored_model, delta_or_offset)`` (for ``offset`` both are the
    :class:`~biaslens.unlearn.offset.OffsetModel`). ``max_steps`` defaults to
    :data:`DEFAULT_STEPS`; ``lr`` (None: the method's own) and, for ``offset``, ``alpha``,
    ``loss`` and ``small_model`` (None: the model itself) are passed on."""
    from biaslens.errors import BiasLensError

    val = run_validation(model, data["ppl_texts"], ppl_bound=ppl_bound, max_prompts=max_prompts,
                         seed=seed)
    common = {"seed": seed, "ppl_bound": ppl_bound, "validation": val, "keep_prompts": data["keep"]}
    steps = max_steps or DEFAULT_STEPS.get(method)
    if method == "pcgu":
        from biaslens.unlearn.partitioned import pcgu

        if not data["pairs"]:
            raise BiasLensError("PCGU needs contrast pairs; pass --pairs with pairs, not a span file")
        kw = {"lrs": [lr]} if lr else {}
        return model, pcgu(model, data["pairs"], max_steps=max_steps, **common, **kw)
    if method == "task-vector":
        from biaslens.unlearn.task_vector import task_vector_negation

        kw = {"lr": lr} if lr else {}
        return model, task_vector_negation(model, data["forget"], lora_rank=lora_rank, steps=steps,
                                           **common, **kw)
    if method == "masked-ascent":
        from biaslens.unlearn.masked_ascent import masked_span_ascent

        kw = {"lrs": [lr]} if lr else {}
        return model, masked_span_ascent(model, data["forget"], max_steps=steps, **common, **kw)
    if method != "offset":
        raise BiasLensError(f"unknown unlearning method '{method}' (use one of: pcgu, task-vector, "
                            "offset, masked-ascent)")
    from biaslens.unlearn.offset import offset_unlearn

    kw = {"lr": lr} if lr else {}
    om = offset_unlearn(model, small_model or model, data["forget"], data["retain"], alpha=alpha,
                        loss=loss, max_steps=steps, **common, **kw)
    return om, om
