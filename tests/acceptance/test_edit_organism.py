"""LSDM on the organism, scored on its 6 held-out templates (wordings no edit or tuning saw) with
the stereotype contrast: the edit from the organism's template bank cuts it while definitional
gender, facts and perplexity hold; undo restores the checkpoint; the default (tuned) edit stays
within its validation bounds. Numbers and the per-template breakdown: docs/results/edit.md
(scripts/edit_acceptance.py)."""

from __future__ import annotations

import pytest
import torch

from biaslens import organism as org

pytestmark = pytest.mark.usefixtures("one_thread")

if not (org.CHECKPOINT_DIR / "model.safetensors").exists():
    pytest.skip("the organism checkpoint is not committed yet", allow_module_level=True)


def heldout_contrast(model) -> float:
    from biaslens.defaults import defaults_for
    from biaslens.evaluate.contrast import stereotype_contrast

    c = stereotype_contrast(model, defaults_for(model).occupation_prompts("edit", "test"))
    return float(c.get("values", c)["mean_abs_contrast"])


def retention(model) -> dict:
    from biaslens.defaults import defaults_for
    from biaslens.evaluate import definitional_accuracy, fact_accuracy, perplexity

    d = defaults_for(model)
    return {"def": definitional_accuracy(model, d.definitional_prompts())["accuracy"],
            "facts": fact_accuracy(model, d.facts())["accuracy"],
            "ppl": perplexity(model, d.ppl_text, max_tokens=5000, per_line=True)["perplexity"]}


@pytest.fixture(scope="module")
def edited(organism, tmp_path_factory):
    """Layer 0 at the last token (where noise tracing puts the organism's bias), half the bank's
    edit templates, Gauss-Newton targets, fixed λ and keep weight (tuning off: fast)."""
    from biaslens.defaults import defaults_for
    from biaslens.edit import lsdm
    from biaslens.evaluate.contrast import template_of

    m = organism
    d = defaults_for(m)
    keep_tpl = sorted({template_of(p) for p in d.occupation_prompts("edit", "edit")})[::2]
    prompts = [p for p in d.occupation_prompts("edit", "edit") if template_of(p) in keep_tpl]
    keep = [p for p in d.definitional_prompts("edit") if template_of(p) in keep_tpl]
    corpus = tmp_path_factory.mktemp("org") / "general.txt"
    corpus.write_text("\n".join(org.generate_general_text(seed=11, n_lines=1500)) + "\n")
    before = {"contrast": heldout_contrast(m), **retention(m), "hash": m.weight_hash()}
    hp = {"v_steps": 0, "v_newton_steps": 3, "mom2_weight": 0.15 * len(prompts), "keep_weight": 1.0,
          "cov_tokens": 20_000}
    delta = lsdm(m, prompts, layers=[0], role="last", corpus=corpus, hparams=hp, keep_prompts=keep,
                 cache_dir=tmp_path_factory.mktemp("cov"), progress=False, tune="off")
    after = {"contrast": heldout_contrast(m), **retention(m)}
    yield m, delta, before, after
    delta.undo(m)


def test_the_bank_edit_cuts_the_held_out_template_contrast(edited):
    _, delta, before, after = edited
    assert "tuning" not in delta.info["diagnostics"]
    assert before["contrast"] > 0.15  # the planted bias transfers to the held-out wordings
    assert after["contrast"] < 0.7 * before["contrast"]


@pytest.mark.xfail(strict=True, reason=(
    "known shortfall (issue 15): this fixed, untuned bank edit at layer 0 costs 1.3 points of "
    "definitional accuracy on all definitional prompts (0.9965 -> 0.984; bound 1 point); keep weight "
    "10 costs 2.7. Strict: the day it holds, this xfail fails and must go"))
def test_definitional_gender_facts_and_perplexity_hold(edited):
    _, _, before, after = edited
    assert after["def"] >= before["def"] - 0.01
    assert after["facts"] >= before["facts"] - 0.01
    assert after["ppl"] <= 1.02 * before["ppl"]


def test_undo_restores_the_checkpoint(edited):
    m, delta, before, _ = edited
    delta.undo(m)
    try:
        assert m.weight_hash() == before["hash"]
    finally:
        delta.apply(m)
    assert all(torch.equal(m.param(n), delta.updated[n]) for n in delta.names)


@pytest.mark.slow  # the whole default edit: tracing, key statistics, the tuning sweep (minutes)
def test_the_default_edit_tunes_itself_within_bounds(organism, tmp_path):
    from biaslens.edit import lsdm

    m = organism
    before = {"contrast": heldout_contrast(m), **retention(m)}
    delta = lsdm(m, cache_dir=tmp_path, progress=False)
    try:
        after = {"contrast": heldout_contrast(m), **retention(m)}
        rec = delta.info["diagnostics"]["tuning"]
        assert rec["tuned"] == ["layers", "mom2_weight", "keep_weight"]
        assert rec["chosen"]["within_bounds"] and delta.info["site"]["source"] == "tuned"
        assert rec["validation"]["disjoint_from_test"]
        assert after["contrast"] < 0.7 * before["contrast"]
        assert after["def"] >= before["def"] - 0.01
        assert after["facts"] >= before["facts"] - 0.01
        assert after["ppl"] <= 1.02 * before["ppl"]
    finally:
        delta.undo(m)
