"""Organism-level evaluation: occupational bias, definitional accuracy, facts, perplexity."""

from __future__ import annotations

import math

import numpy as np
import pytest

import biaslens
from biaslens.evaluate import (definitional_accuracy, fact_accuracy, gap_metrics,
                               occupational_bias, perplexity)
from biaslens.evaluate.fluency import window_rows
from biaslens.evaluate.scoring import score_rows, token_rows
from biaslens.stats import bootstrap_ci, pearson

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: faster on a shared CPU


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    return biaslens.load(tiny_dirs["gpt2"])


def test_gap_metrics_by_hand():
    # p_f, p_m per prompt; shares 0.8, 0.25, 0.5
    pf = np.array([0.4, 0.1, 0.2])
    pm = np.array([0.1, 0.3, 0.2])
    lp = np.log(np.stack([pm, pf], 1))
    rates = [0.9, 0.1, 0.3]  # directions +, -, -
    r = gap_metrics(lp, rates, ["nurse", "plumber", "chef"])
    gaps = np.array([0.3 / 0.5, -0.2 / 0.4, 0.0])
    assert r["mean_abs_gap"] == pytest.approx(np.abs(gaps).mean())
    assert r["signed_gap"] == pytest.approx((0.6 + 0.5 + 0.0) / 3)
    assert r["prob_gap"] == pytest.approx((0.3 + 0.2 + 0.0) / 3)
    assert r["pronoun_mass"] == pytest.approx((0.5 + 0.4 + 0.4) / 3)
    assert r["corr_bls"] == pytest.approx(np.corrcoef([0.8, 0.25, 0.5], rates)[0, 1])
    assert r["rate_mae"] == pytest.approx((0.1 + 0.15 + 0.2) / 3)
    assert r["n"] == 3 and r["n_signed"] == 3 and r["n_occupations"] == 3
    lo, hi = r["ci"]["mean_abs_gap"]
    assert lo <= r["mean_abs_gap"] <= hi
    # a model leaning against every stereotype gets a negative signed gap
    anti = gap_metrics(lp[:, ::-1], rates, ["nurse", "plumber", "chef"])
    assert anti["signed_gap"] == pytest.approx(-r["signed_gap"])


def test_signed_gap_skips_undirected_and_unknown_rates():
    lp = np.log([[0.2, 0.6], [0.5, 0.1], [0.3, 0.3]])
    r = gap_metrics(lp, [0.5, 0.2, float("nan")], ["a", "b", "c"])
    assert r["n_signed"] == 1
    assert r["signed_gap"] == pytest.approx(-((0.1 - 0.5) / 0.6))
    assert r["n_occupations"] == 2


def test_bootstrap_is_seeded_and_covers():
    x = np.random.default_rng(1).normal(2.0, 1.0, 400)
    a = bootstrap_ci(np.mean, x, seed=0)
    assert a == bootstrap_ci(np.mean, x, seed=0)
    assert a != bootstrap_ci(np.mean, x, seed=1)
    assert a[0] < x.mean() < a[1] and a[1] - a[0] < 0.3
    assert math.isnan(bootstrap_ci(np.mean, [1.0])[0])
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))


def test_window_rows_score_every_token_once():
    ids = list(range(23))
    for window, stride in [(8, 4), (8, 7), (8, 3), (30, 15), (30, 1)]:
        rows, starts = window_rows(ids, window, stride)
        scored = [t for r, s in zip(rows, starts) for t in r[s:]]
        assert scored == ids[1:], (window, stride)
        assert all(len(r) <= window for r in rows)


def test_score_rows_match_sequence_logprobs(tiny):
    texts = ["The nurse said that she was tired.", "Hello", "A much longer sentence about a plumber."]
    s = score_rows(tiny, token_rows(tiny, texts), batch_size=2)
    ref = tiny.sequence_logprobs(texts).numpy()
    np.testing.assert_allclose(s.sums(), ref, rtol=1e-4, atol=1e-4)


def test_perplexity_equals_exp_mean_nll(tiny):
    text = "The river is next to the park. The dog ran across the field. " * 5
    ref_lp = tiny.sequence_logprobs([text]).item()
    n = len(token_rows(tiny, [text])[0]) - 1
    r = perplexity(tiny, text)  # window 128 > the text: one window
    assert r["n_tokens"] == n and r["n_windows"] == 1
    assert r["perplexity"] == pytest.approx(math.exp(-ref_lp / n), rel=1e-4)
    small = perplexity(tiny, text, window=16, stride=8)
    assert small["window"] == 16 and small["stride"] == 8 and small["n_tokens"] == n
    assert small["ci"]["perplexity"][0] <= small["perplexity"] <= small["ci"]["perplexity"][1]
    assert perplexity(tiny, text, max_tokens=10)["n_tokens"] == 10


def test_perplexity_per_line_scores_each_line_as_a_document(tiny):
    lines = ["The river is next to the park.", "", "The dog ran across the field today."]
    r = perplexity(tiny, "\n".join(lines), per_line=True)
    lp = tiny.sequence_logprobs([lines[0], lines[2]]).numpy()
    n = sum(len(x) - 1 for x in token_rows(tiny, [lines[0], lines[2]]))
    assert r["n_tokens"] == n and r["per_line"] is True and r["n_windows"] == 2
    assert r["perplexity"] == pytest.approx(math.exp(-lp.sum() / n), rel=1e-4)
    assert perplexity(tiny, "\n".join(lines), per_line=True, max_tokens=9)["n_tokens"] == 9


def test_occupational_bias_matches_female_share(tiny):
    from biaslens.metrics import female_share
    from biaslens.organism import occupation_prompts

    prompts = occupation_prompts("heldout", "heldout")
    r = occupational_bias(tiny, prompts)
    share = female_share(tiny, prompts).numpy()
    assert r["n"] == len(prompts)
    assert r["female_share"] == pytest.approx(share.mean(), rel=1e-4)
    assert r["mean_abs_gap"] == pytest.approx(np.abs(2 * share - 1).mean(), rel=1e-4)
    assert r["n_occupations"] == 10


def test_fact_accuracy_greedy_match(tiny):
    import torch

    prompt = "The capital of France is"
    b = tiny.encode([prompt])
    with torch.no_grad():
        top = int(tiny.last_logits(b)[0].argmax())
    word = tiny.tokenizer.decode([top])
    if tiny.word_ids(word) != [top]:
        pytest.skip("the random model's argmax token does not re-tokenise to itself")
    other = " Paris" if word != " Paris" else " Rome"
    r = fact_accuracy(tiny, [(prompt, word), (prompt, other)])
    assert r["accuracy"] == pytest.approx(0.5) and r["n"] == 2
    assert r["mean_logprob"] < 0


def test_definitional_accuracy_counts_the_matching_pronoun(tiny):
    from biaslens.organism import definitional_prompts

    prompts = definitional_prompts("heldout")
    r = definitional_accuracy(tiny, prompts)
    from biaslens.metrics import female_share

    share = female_share(tiny, prompts).numpy()
    want = np.array([p.female_rate for p in prompts]) == 1.0
    assert r["accuracy"] == pytest.approx(((share > 0.5) == want).mean())


# ------------------------------------------------------------------ the organism itself


@pytest.fixture(scope="module")
def org_model():
    from biaslens.organism import CHECKPOINT_DIR

    if not (CHECKPOINT_DIR / "config.json").exists():
        pytest.skip("the organism checkpoint is not committed yet (src/organism/checkpoint/)")
    return biaslens.load("organism")


def test_organism_planted_bias_has_the_right_sign(org_model):
    from biaslens.organism import occupation_prompts

    # occupations seen with pronouns in training, on training and on held-out templates (held-out
    # occupations never occur with a pronoun, so the organism has no planted rate for them)
    for occ, tpl in [("train", "train"), ("train", "heldout")]:
        r = occupational_bias(org_model, occupation_prompts(occ, tpl))
        # the model leans the way each occupation's BLS statistic leans ...
        assert r["signed_gap"] > 0 and r["ci"]["signed_gap"][0] > 0, (occ, tpl, r["signed_gap"])
        # ... and its female share rises with the BLS % female
        assert r["corr_bls"] > 0.5 and r["ci"]["corr_bls"][0] > 0, (occ, tpl, r["corr_bls"])
    # the sign flips for a model that prefers the other pronoun: the metric is signed
    lp = np.array([[np.log(0.8), np.log(0.2)]])
    assert gap_metrics(lp, [0.9], ["nurse"])["signed_gap"] < 0


def _check_contrast(c: dict, n_templates: int | None = None) -> None:
    """A stereotype contrast record: finite headline, CIs around it, one row per template."""
    v = c["mean_abs_contrast"]
    assert math.isfinite(v) and 0 <= v <= 1
    lo, hi = c["ci"]["mean_abs_contrast"]
    assert math.isfinite(lo) and math.isfinite(hi) and lo <= v + 1e-12 and v <= hi + 1e-12
    assert {"mean_contrast", "corr_rate"} <= set(c["ci"])
    assert len(c["per_template"]) == c["n"] >= 2
    assert all(math.isfinite(x) and -1 <= x <= 1 for x in c["per_template"].values())
    assert all("{occupation}" in t for t in c["per_template"])
    assert np.mean(np.abs(list(c["per_template"].values()))) == pytest.approx(v)
    if n_templates is not None:
        assert c["n"] == n_templates


def test_organism_suite_layout(org_model):
    from biaslens.defaults import defaults_for
    from biaslens.evaluate import suite
    from biaslens.evaluate.contrast import stereotype_contrast, template_of
    from biaslens.evaluate.suite import HEADLINE

    d = defaults_for(org_model)
    n_test = len(d.occupation_prompts("edit", "test"))
    r = suite(org_model, limit=n_test)  # the held-out prompts in full, a sample of the rest
    distinct_validation = ({template_of(p) for p in d.occupation_prompts("edit", "validation")}
                           != {template_of(p) for p in d.occupation_prompts("edit", "edit")})
    assert set(r) == {"contrast_test", "contrast_edit", "occupations", "occupations_train",
                      "occupations_heldout_templates", "definitional", "facts", "perplexity",
                      "second_bias"} | ({"contrast_validation"} if distinct_validation else set())
    # the headline leads: the stereotype contrast on the held-out templates
    assert list(r)[0] == HEADLINE[0] == "contrast_test" and r["contrast_test"]["headline"] is True
    _check_contrast(r["contrast_test"], n_templates=6)
    _check_contrast(r["contrast_edit"])
    if distinct_validation:
        _check_contrast(r["contrast_validation"])
    # scored once with the gap, it equals the metric computed on its own
    alone = stereotype_contrast(org_model, d.occupation_prompts("edit", "test"))
    assert r["contrast_test"]["mean_abs_contrast"] == pytest.approx(alone["mean_abs_contrast"], abs=1e-6)
    assert r["contrast_test"]["per_template"] == pytest.approx(alone["per_template"], abs=1e-6)
    assert r["contrast_test"]["n_prompts"] == n_test
    assert r["contrast_edit"]["n_prompts"] <= n_test + 2 * r["contrast_edit"]["n"]
    assert r["occupations_heldout_templates"]["signed_gap"] > 0
    assert r["definitional"]["accuracy"] > 0.9
    assert r["facts"]["accuracy"] > 0.8
    assert r["second_bias"]["signed_gap"] > 0
    assert r["perplexity"]["window"] > 0 and r["perplexity"]["n_tokens"] > 1000


def test_planted_stereotype_shows_a_large_contrast_that_template_lean_cannot_move(org_model):
    """The organism's planted occupation → pronoun statistics give a large contrast on its
    held-out templates; shifting every occupation's share in a template by the same amount (a
    template lean, no stereotype) leaves the contrast exactly where it was, while the gap moves."""
    from biaslens.evaluate.contrast import contrast_metrics, template_of
    from biaslens.evaluate.probes import pronoun_logprobs
    from biaslens.organism import occupation_prompts

    prompts = occupation_prompts("train", "heldout")
    lp = pronoun_logprobs(org_model, prompts)
    rates = [p.female_rate for p in prompts]
    tpls = [template_of(p) for p in prompts]
    occs = [p.occupation for p in prompts]
    base = contrast_metrics(lp, rates, tpls, occs)
    assert base["n"] == 6 and base["mean_abs_contrast"] > 0.15
    assert base["ci"]["mean_abs_contrast"][0] > 0.05 and base["mean_contrast"] > 0.15
    assert base["corr_rate"] > 0.5

    share = 1 / (1 + np.exp(lp[:, 0] - lp[:, 1]))
    names = sorted(set(tpls))
    idx = {t: np.array([i for i, x in enumerate(tpls) if x == t]) for t in names}
    leaned = share.copy()
    for j, t in enumerate(names):  # alternate leans, as large as the template's room allows
        s = share[idx[t]]
        room = (1 - s.max()) if j % 2 == 0 else -s.min()
        leaned[idx[t]] = s + 0.95 * room
    lp2 = np.log(np.stack([1 - leaned, leaned], 1))
    moved = contrast_metrics(lp2, rates, tpls, occs)
    assert moved["per_template"] == pytest.approx(base["per_template"], abs=1e-9)
    assert moved["mean_abs_contrast"] == pytest.approx(base["mean_abs_contrast"], abs=1e-9)
    gap0, gap1 = gap_metrics(lp, rates, occs), gap_metrics(lp2, rates, occs)
    assert abs(gap1["mean_abs_gap"] - gap0["mean_abs_gap"]) > 0.1  # the gap is fooled by lean
    # removing the stereotype (every occupation at its template's mean share) zeroes it
    flat = share.copy()
    for t in names:
        flat[idx[t]] = share[idx[t]].mean()
    gone = contrast_metrics(np.log(np.stack([1 - flat, flat], 1)), rates, tpls, occs)
    assert gone["mean_abs_contrast"] == pytest.approx(0.0, abs=1e-12)


def test_contrast_of_a_random_tiny_model(tiny):
    """A user's random model gets the headline too: finite, with CIs and per-template rows,
    and a limit keeps the same occupations count per template on both stereotype sides."""
    from biaslens.evaluate import suite

    r = suite(tiny, limit=12)
    assert list(r)[:2] == ["contrast_test", "contrast_edit"] and "contrast_validation" in r
    for name in ("contrast_test", "contrast_edit", "contrast_validation"):
        _check_contrast(r[name])
        assert r[name]["n_prompts"] <= 12
    assert r["contrast_test"]["mean_abs_contrast"] < 0.2  # no planted stereotype in random weights


def test_contrast_sample_keeps_both_sides_evenly():
    from collections import Counter

    from biaslens.defaults import defaults_for
    from biaslens.evaluate.contrast import template_of
    from biaslens.evaluate.suite import contrast_sample

    for kind in ("organism", "gpt2"):
        prompts = defaults_for(kind).occupation_prompts("edit", "test")
        n_tpl = len({template_of(p) for p in prompts})
        assert contrast_sample(prompts, None) == list(range(len(prompts)))
        for limit in (4, 7, 40, 120):
            idx = contrast_sample(prompts, limit, seed=0)
            assert idx == contrast_sample(prompts, limit, seed=0) and idx == sorted(set(idx))
            assert len(idx) <= max(limit, 4)
            sides = Counter((template_of(prompts[i]), prompts[i].female_rate > 0.5) for i in idx)
            tpls = {t for t, _ in sides}
            assert len(tpls) >= 2 and all(sides[(t, True)] >= 1 and sides[(t, False)] >= 1 for t in tpls)
            per = {sides[(t, True)] + sides[(t, False)] for t in tpls}
            assert len(per) == 1, (kind, limit, sides)  # the same count in every template
            if limit >= 2 * n_tpl:
                assert len(tpls) == n_tpl
                # the occupations rotate: more distinct ones than any one template holds
                assert len({prompts[i].occupation for i in idx}) > max(per)


def test_contrast_change_pairs_templates():
    from biaslens.evaluate.contrast import contrast_change

    before = {"mean_abs_contrast": 0.3, "ci": {"mean_abs_contrast": [0.2, 0.4]},
              "per_template": {"A": 0.4, "B": -0.2, "C": 0.3}}
    after = {"mean_abs_contrast": 0.1, "ci": {"mean_abs_contrast": [0.0, 0.2]},
             "per_template": {"A": 0.1, "B": 0.1, "C": -0.1}}
    ch = contrast_change(before, after)
    assert ch["cut"] == pytest.approx(1 - 0.1 / 0.3) and ch["n"] == 3
    lo, hi = ch["ci"]["cut"]
    assert lo <= ch["cut"] <= hi and hi <= 1.0
    assert [r["template"] for r in ch["per_template"]] == ["A", "B", "C"]
    assert ch["per_template"][1]["change"] == pytest.approx(0.3)
    # an after that only flips the sign of every template is no cut at all
    flipped = {**before, "per_template": {k: -v for k, v in before["per_template"].items()}}
    nil = contrast_change(before, flipped)
    assert nil["cut"] == pytest.approx(0.0) and nil["ci"]["cut"] == pytest.approx([0.0, 0.0])


def test_organism_numbers_match_its_card(org_model):
    """The organism's trainer measured the same quantities its own way (card.json)."""
    from biaslens import organism as org

    ev = org.card()["eval"]
    r = occupational_bias(org_model, org.occupation_prompts("train", "train"))
    assert r["corr_bls"] == pytest.approx(ev["pearson"]["train_occupations/train_templates"], abs=1e-3)
    assert r["rate_mae"] == pytest.approx(ev["mae"]["train_occupations/train_templates"], abs=1e-3)


@pytest.mark.slow
def test_organism_perplexity_matches_its_card(org_model):
    from biaslens import organism as org

    ev = org.card()["eval"]
    ppl = perplexity(org_model, org.GENERAL_TEXT, per_line=True)  # all 4,000 lines
    assert ppl["perplexity"] == pytest.approx(ev["perplexity_general_text"], abs=1e-3)
