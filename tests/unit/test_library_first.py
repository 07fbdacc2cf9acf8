"""The typed Prompt (pronoun pair, female rate), the one female-rate accessor, and the run
choices the commands take from the library (docs/architecture.md, "Library first")."""

from __future__ import annotations

import math

import pytest


def test_prompt_typed_fields_from_meta_and_arguments():
    from biaslens.errors import BiasLensError
    from biaslens.metrics import pronoun_pair
    from biaslens.prompts import Prompt, female_rate

    p = Prompt("The nurse said that", "nurse", {"female_rate": 0.9, "male": " him", "female": " her"})
    assert p.female_rate == 0.9 and female_rate(p) == 0.9
    assert p.pronouns == (" him", " her") and (p.male, p.female) == (" him", " her")
    assert pronoun_pair(p) == (" him", " her")
    q = Prompt("The nurse said that", "nurse", pronouns=(" his", " her"), female_rate=0.2)
    assert female_rate(q) == 0.2 and pronoun_pair(q) == (" his", " her")
    assert p == q  # the typed facts do not change which prompt it is
    bare = Prompt("The nurse said that", "nurse")
    assert bare.female_rate is None and math.isnan(female_rate(bare))
    assert bare.pronouns is None and pronoun_pair(bare) == (" he", " she")
    # one word alone in meta is no pair: the default fills the other side, as before
    half = Prompt("x", meta={"female": " her"})
    assert half.pronouns is None and pronoun_pair(half) == (" he", " her")
    with pytest.raises(BiasLensError, match="pair"):
        Prompt("x", pronouns=(" he",))
    with pytest.raises(BiasLensError, match="pair"):
        Prompt("x", pronouns=(" he", ""))


def test_as_prompt_carries_the_organism_prompt_facts():
    from biaslens.defaults import defaults_for
    from biaslens.locate import default_swap
    from biaslens.prompts import as_prompt, female_rate

    org = defaults_for("organism").occupation_prompts("edit", "edit")
    for src in (org[0], next(p for p in org if p.female_rate > 0.5)):
        p = as_prompt(src)
        assert p.female_rate == src.female_rate == female_rate(src) == female_rate(p)
        assert p.pronouns == (src.male, src.female)
        assert default_swap(p) == default_swap(src) == ("woman" if src.female_rate <= 0.5 else "man")


def test_edit_summary_and_rows_are_the_library_choice():
    from biaslens import demo
    from biaslens.evaluate.runs import BEFORE_AFTER_ROWS, edit_summary
    from biaslens.evaluate.suite import HEADLINE

    assert demo.HEADLINE is BEFORE_AFTER_ROWS and BEFORE_AFTER_ROWS[0][:2] == HEADLINE
    before = {"definitional": {"accuracy": 0.8}, "perplexity": {"perplexity": 20.0}}
    after = {"definitional": {"accuracy": 0.6}, "perplexity": {"perplexity": 22.0}, "facts": {"accuracy": 1.0}}
    s = edit_summary(before, after)
    assert list(s) == ["definitional.accuracy", "perplexity.perplexity"]  # only what both have
    assert s["definitional.accuracy"]["change"] == pytest.approx(-0.25)
    assert s["perplexity.perplexity"] == {"before": 20.0, "after": 22.0, "change": pytest.approx(0.1)}


def test_unlearn_run_data_samples_every_set():
    from biaslens.evaluate.contrast import template_of
    from biaslens.unlearn.runs import run_data, run_validation

    full = run_data("organism", seed=0)
    small = run_data("organism", seed=0, max_prompts=12)
    assert len(full["pairs"]) > 12 and len(small["pairs"]) == 12
    assert len(small["forget"]) == 12 and len(small["keep"]) <= 12 and len(small["ppl_texts"]) <= 12
    assert len(small["val_prompts"]) <= 12
    vp = small["val_prompts"]  # still a contrast: both stereotype sides on a kept template
    sides = {(template_of(p), p.female_rate > 0.5) for p in vp}
    assert any((t, True) in sides and (t, False) in sides for t, _ in sides)
    assert run_data("organism", seed=0, max_prompts=12)["pairs"] == small["pairs"]  # seeded
    assert {"pairs", "forget", "retain", "keep", "val_prompts", "ppl_texts", "source"} <= set(full)
    val = run_validation("organism", small["ppl_texts"], ppl_bound=1.2, max_prompts=12)
    assert val.bounds.ppl_rise == pytest.approx(0.2) and 0 < len(val.prompts) <= 12
    assert len(run_validation("organism", small["ppl_texts"]).prompts) > 12  # the whole split


def test_run_method_refuses_an_unknown_method_and_pcgu_without_pairs():
    from biaslens.errors import BiasLensError
    from biaslens.unlearn.runs import run_data, run_method

    data = run_data("organism", seed=0, max_prompts=8)
    with pytest.raises(BiasLensError, match="unknown unlearning method 'nope'"):
        run_method("organism", "nope", data, max_prompts=8)
    with pytest.raises(BiasLensError, match="PCGU needs contrast pairs"):
        run_method("organism", "pcgu", {**data, "pairs": None}, max_prompts=8)
