"""LSDM's automatic tuning (biaslens.edit.tune): candidate windows from the effect map, the
validation data never touching a test template, the choice within bounds and recorded with its
sweep, explicit hyperparameters switching tuning off for themselves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import biaslens
from biaslens import organism
from biaslens.defaults import defaults_for
from biaslens.edit import LSDMHparams, lsdm
from biaslens.edit import site as site_mod
from biaslens.edit import tune as tune_mod
from biaslens.errors import BiasLensError
from biaslens.evaluate.contrast import template_of

pytestmark = pytest.mark.usefixtures("one_thread")

OCCS = ["nurse", "plumber", "teacher", "mechanic", "secretary", "carpenter"]
FAST = dict(cov_tokens=1500, cov_seq_len=64, v_steps=0, v_newton_steps=2)
GRID = tune_mod.TuneGrid(mom2_per_column=(0.05, 0.5), keep_weights=(0.3, 3.0), top_layers=2, start=(0, 0))


def effect_map(n_layers: int, best: list[int]):
    """A noise map whose MLP effect at ``last`` ranks ``best`` first (in that order)."""
    from biaslens.locate import EffectMap

    roles = ["prefix", "subject_first", "subject_last", "after_subject", "last"]
    mlp = np.zeros((n_layers, len(roles)))
    for rank, layer in enumerate(best):
        mlp[layer, 4] = 1.0 - 0.1 * rank
    z = {"mlp": np.zeros_like(mlp)}
    return EffectMap("tiny", "noise", "m", 10, list(range(n_layers)), roles, {"mlp": mlp}, z, z)


@pytest.fixture(scope="module")
def model(tiny_dirs):
    return biaslens.load(str(tiny_dirs["gpt2"]))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "general.txt"
    path.write_text("\n".join(organism.generate_general_text(seed=5, n_lines=300)) + "\n")
    return path


def edit_prompts(m):
    return [p for p in defaults_for(m).occupation_prompts("edit", "edit") if p.occupation in OCCS][::3]


def keep_prompts(m):
    return defaults_for(m).definitional_prompts("edit")[::9]


def test_candidate_windows_are_the_best_layers_and_adjacent_pairs():
    em = effect_map(4, [2, 1, 3])
    assert site_mod.candidate_windows(em, "last", 4, top=2) == [[2], [1], [1, 2]]
    assert site_mod.candidate_windows(em, "last", 4, top=3) == [[2], [1], [3], [1, 2], [2, 3]]
    assert site_mod.candidate_windows(effect_map(4, [3, 1]), "last", 4, top=2) == [[3], [1]]  # not adjacent
    weak = effect_map(4, [2, 1])
    weak.effects["mlp"][1, 4] = 0.1  # a tenth of layer 2's effect: not a place the bias lives
    assert site_mod.candidate_windows(weak, "last", 4, top=2, min_ratio=0.25) == [[2]]
    assert site_mod.candidate_windows(weak, "last", 4, top=2, min_ratio=0.05) == [[2], [1], [1, 2]]


def test_judge_counts_every_bound():
    b = tune_mod.TuneBounds()
    ok = {"contrast": 0.1, "definitional_share_drop": 0.005, "definitional_broken": 0, "facts_lost": 0,
          "ppl_rise": 0.01}
    assert tune_mod._judge(ok, b)[0]
    for key, bad, name in [("definitional_share_drop", 0.05, "definitional_share"),
                           ("definitional_broken", 2, "definitional_margin"), ("facts_lost", 1, "facts"),
                           ("ppl_rise", 0.016, "ppl")]:
        feasible, violation, failed = tune_mod._judge({**ok, key: bad}, b)
        assert not feasible and violation > 0 and failed == [name]
    assert tune_mod._judge({**ok, "contrast": float("nan")}, b) == (False, float("inf"), ["nonfinite"])


@pytest.fixture(scope="module")
def tuned(model, corpus, tmp_path_factory):
    """One tuned edit, recording every prompt the validation scorer read."""
    seen: list = []
    real = tune_mod.Validation._margins

    def spy(self, m, prompts):
        seen.extend(prompts)
        return real(self, m, prompts)

    tune_mod.Validation._margins = spy
    try:
        P, K = edit_prompts(model), keep_prompts(model)
        val = tune_mod.default_validation(model, P, K, corpus, FAST["cov_tokens"], keep_sample=64,
                                          ppl_tokens=300)
        delta = lsdm(model, P, effect_map=effect_map(3, [1, 0, 2]), corpus=corpus, hparams=FAST,
                     keep_prompts=K, grid=GRID, validation=val,
                     cache_dir=tmp_path_factory.mktemp("cov"), progress=False)
    finally:
        tune_mod.Validation._margins = real
    yield delta, seen
    delta.undo(model)


def test_the_tuner_never_sees_a_test_template(tuned, model):
    _, seen = tuned
    d = defaults_for(model)
    test = {template_of(p) for p in d.occupation_prompts("all", "test") + d.definitional_prompts("test")}
    validation = {template_of(p) for p in d.occupation_prompts("edit", "validation")}
    seen_tpl = {template_of(p) for p in seen}
    assert seen_tpl and not seen_tpl & test
    assert validation <= seen_tpl  # the occupation prompts of every validation template


def test_the_choice_is_the_best_within_bounds_and_the_sweep_is_recorded(tuned):
    delta, _ = tuned
    rec = delta.info["diagnostics"]["tuning"]
    sweep = rec["sweep"]
    assert rec["tuned"] == ["layers", "mom2_weight", "keep_weight"]
    assert rec["windows"] == [[1], [0], [0, 1]]
    assert {tuple(c["layers"]) for c in sweep} == {(1,), (0,), (0, 1)}
    secs = delta.info["diagnostics"]["seconds"]  # the effect map was given: reading it is instant
    assert secs["site_map"] < 1.0 and secs["tuning"] >= sum(c["seconds"] for c in sweep) - 0.5 > 0
    ch = rec["chosen"]
    assert delta.info["site"] == {"layers": ch["layers"], "role": "last", "source": "tuned"}
    assert delta.info["effect_map"]["mlp_effect_at_site"]  # the map the windows came from
    assert delta.hparams["mom2_weight"] == ch["mom2_weight"] and delta.hparams["keep_weight"] == ch["keep_weight"]
    assert ch["validation"] in sweep
    feasible = [c for c in sweep if c["feasible"]]
    if feasible:
        assert ch["within_bounds"] and ch["validation"]["feasible"]
        assert ch["validation"]["contrast"] == min(c["contrast"] for c in feasible)
        b = rec["bounds"]
        v = ch["validation"]
        assert v["definitional_share_drop"] <= b["definitional_share_drop"]
        assert v["definitional_broken"] == 0 and v["facts_lost"] <= b["facts_lost"]
        assert v["ppl_rise"] <= b["ppl_rise"]
    else:
        assert not ch["within_bounds"]
        assert ch["validation"]["violation"] == min(c["violation"] for c in sweep)
    # λ scales with the key columns: the grid's per-column values times their number
    n = delta.info["diagnostics"]["n_columns"]
    allowed = [x * n for x in GRID.mom2_per_column]
    assert all(any(abs(c["mom2_weight"] - a) <= 1e-9 * a for a in allowed) for c in sweep)
    # the validation data: disjoint from the test templates, general text not the statistics'
    val = rec["validation"]
    assert val["disjoint_from_test"] and not val["validation_shares_edit_templates"]
    assert "first" in val["general_text"]  # the model's perplexity text, not --corpus


def test_the_applied_edit_is_the_chosen_candidate(tuned, model, corpus, tmp_path):
    """Re-running the chosen setting with tuning off gives the same weights (the tuner left no
    trace: every candidate was undone)."""
    delta, _ = tuned
    ch = delta.info["diagnostics"]["tuning"]["chosen"]
    after = {n: model.param(n).detach().clone() for n in delta.names}
    delta.undo(model)
    try:
        again = lsdm(model, edit_prompts(model), layers=ch["layers"], role="last", corpus=corpus,
                     hparams={**FAST, "mom2_weight": ch["mom2_weight"], "keep_weight": ch["keep_weight"]},
                     keep_prompts=keep_prompts(model), cache_dir=tmp_path, progress=False)
        assert "tuning" not in again.info["diagnostics"]
        assert sorted(again.names) == sorted(delta.names)
        for n in delta.names:
            torch.testing.assert_close(model.param(n), after[n], rtol=1e-5, atol=1e-7)
        again.undo(model)
    finally:
        delta.apply(model)


def test_explicit_values_switch_tuning_off_for_themselves(model, corpus, tmp_path):
    P, K = edit_prompts(model), keep_prompts(model)
    val = tune_mod.default_validation(model, P, K, corpus, FAST["cov_tokens"], keep_sample=32,
                                      ppl_tokens=300)
    d = lsdm(model, P, layers=[1], role="last", corpus=corpus, keep_prompts=K, grid=GRID,
             hparams={**FAST, "mom2_weight": 50.0}, validation=val, cache_dir=tmp_path, progress=False)
    try:
        rec = d.info["diagnostics"]["tuning"]
        assert rec["tuned"] == ["keep_weight"]
        assert {c["mom2_weight"] for c in rec["sweep"]} == {50.0}
        assert {tuple(c["layers"]) for c in rec["sweep"]} == {(1,)}
        assert d.hparams["mom2_weight"] == 50.0 and d.info["site"]["source"] == "explicit"
    finally:
        d.undo(model)
    # an LSDMHparams object names every value; tune="off" keeps the given ones
    for kw in (dict(hparams=LSDMHparams(**FAST)), dict(hparams=FAST, tune="off")):
        d = lsdm(model, P, layers=[1], role="last", corpus=corpus, keep_prompts=K,
                 cache_dir=tmp_path, progress=False, **kw)
        try:
            assert "tuning" not in d.info["diagnostics"]
            assert d.hparams["mom2_weight"] == LSDMHparams().mom2_weight
        finally:
            d.undo(model)
    with pytest.raises(BiasLensError, match="tune"):
        lsdm(model, P, tune="sometimes", progress=False)


def test_validation_refuses_test_templates(model, corpus, monkeypatch):
    from biaslens import defaults

    real = defaults.templates
    monkeypatch.setattr(defaults, "templates",
                        lambda split="all": real("test") if split == "validation" else real(split))
    with pytest.raises(BiasLensError, match="test templates"):
        tune_mod.default_validation(model, edit_prompts(model), [], corpus, 1000)


def test_heldout_lines_skip_what_the_key_statistics_read(model, corpus):
    lines, where = tune_mod.heldout_lines(model, corpus, stats_tokens=2000, n_tokens=600, ppl_text=corpus)
    text = [ln for ln in corpus.read_text().splitlines() if ln.strip()]
    counts = [len(r) for r in model.tokenize(text, length="any")]
    first = next(i for i in range(len(text)) if sum(counts[: i + 1]) >= 2000) + 1
    assert lines[0] == text[first] and "after the key statistics" in where
    assert sum(len(r) for r in model.tokenize(lines, length="any")) >= 600
    other, where = tune_mod.heldout_lines(model, corpus, stats_tokens=2000, n_tokens=600)
    assert other[0] != lines[0] and "first" in where  # the model's own perplexity text


def two_role_map(n_layers: int, last_effect: float):
    """MLP effects 0.8 at (layer 0, subject_last), ``last_effect`` at (layer 1, last), and a
    large subject_last effect at the last layer, which cannot reach the prediction from there."""
    from biaslens.locate import EffectMap

    roles = ["prefix", "subject_first", "subject_last", "after_subject", "last"]
    mlp = np.zeros((n_layers, len(roles)))
    mlp[0, 2], mlp[1, 4], mlp[n_layers - 1, 2] = 0.8, last_effect, 5.0
    z = {"mlp": np.zeros_like(mlp)}
    return EffectMap("tiny", "noise", "m", 10, list(range(n_layers)), roles, {"mlp": mlp}, z, z)


def test_candidate_roles_are_the_roles_where_the_bias_lives():
    assert site_mod.candidate_roles(two_role_map(3, 0.32), 3, 0.25) == ["subject_last", "last"]
    assert site_mod.candidate_roles(two_role_map(3, 0.1), 3, 0.25) == ["subject_last"]
    assert site_mod.candidate_roles(two_role_map(3, 0.9), 3, 0.25) == ["last", "subject_last"]


def test_role_auto_tunes_every_candidate_role_and_keeps_the_best(model, corpus, tmp_path):
    P, K = edit_prompts(model), keep_prompts(model)
    val = tune_mod.default_validation(model, P, K, corpus, FAST["cov_tokens"], keep_sample=32,
                                      ppl_tokens=300)
    grid = tune_mod.TuneGrid(mom2_per_column=(0.5,), keep_weights=(3.0,), top_layers=1)
    d = lsdm(model, P, effect_map=two_role_map(3, 0.32), corpus=corpus, hparams=FAST, keep_prompts=K,
             grid=grid, validation=val, cache_dir=tmp_path, progress=False)
    try:
        rec = d.info["diagnostics"]["tuning"]
        assert "role" in rec["tuned"] and set(rec["roles"]) == {"subject_last", "last"}
        assert rec["roles"]["subject_last"]["windows"] == [[0]] and rec["roles"]["last"]["windows"] == [[1]]
        best = min(rec["roles"], key=lambda r: tune_mod.Candidate.rank(
            tune_mod.Candidate(**rec["roles"][r]["chosen"]["validation"])))
        assert d.info["site"]["role"] == best == rec["chosen"]["role"]
        assert {c["role"] for c in rec["sweep"]} == {"subject_last", "last"}
    finally:
        d.undo(model)


@pytest.mark.parametrize("lowers", [False, True])
def test_a_window_where_no_setting_lowers_the_contrast_is_dropped(model, corpus, tmp_path, monkeypatch, lowers):
    """The search of a window stops after ``patience`` candidates when none lowered the
    validation contrast below the unedited model's (an edit there does not reach the bias);
    where candidates do lower it, the walk goes on past them."""
    P, K = edit_prompts(model), keep_prompts(model)
    val = tune_mod.default_validation(model, P, K, corpus, FAST["cov_tokens"], keep_sample=32,
                                      ppl_tokens=300)
    base = val.prepare(model, tune_mod.TuneBounds())["contrast"]
    calls = []

    def fake_score(self, m, bounds):  # retention intact; contrast above (or below) the base
        calls.append(1)
        c = base + 0.1 if not lowers else base * (0.9 - 0.01 * len(calls))
        return {"contrast": c, "definitional_share_drop": 0.0, "definitional_broken": 0,
                "facts_lost": 0, "ppl_rise": 0.0}

    monkeypatch.setattr(tune_mod.Validation, "score", fake_score)
    grid = tune_mod.TuneGrid(mom2_per_column=(0.05, 0.5, 5.0), keep_weights=(0.3, 3.0, 30.0),
                             top_layers=1, start=(1, 1), patience=5)
    d = lsdm(model, P, effect_map=effect_map(3, [1, 0]), corpus=corpus, hparams=FAST, keep_prompts=K,
             grid=grid, validation=val, cache_dir=tmp_path, progress=False)
    d.undo(model)
    sweep = d.info["diagnostics"]["tuning"]["sweep"]
    assert {tuple(c["layers"]) for c in sweep} == {(1,)}
    # the centre and its 4 neighbours, then stop; with lower contrasts the walk moves on
    assert len(sweep) == 5 if not lowers else len(sweep) > 5


def test_roles_on_the_same_tokens_are_tuned_once(model, corpus, tmp_path):
    """With one-token subjects, subject_first and subject_last are the same token of every
    prompt: the same keys, targets and solves, so the tuner runs them once and says so."""
    from biaslens.locate import EffectMap

    def one_token(prompts):
        b = model.encode(prompts)
        same = (b.index("subject_first") == b.index("subject_last")).tolist()
        return [p for p, s in zip(prompts, same) if s]

    P, K = one_token(edit_prompts(model)), one_token(keep_prompts(model))
    assert len({p.subject for p in P}) >= 2 and K
    roles = ["prefix", "subject_first", "subject_last", "after_subject", "last"]
    mlp = np.zeros((3, len(roles)))
    mlp[0, 1] = mlp[0, 2] = 0.8
    z = {"mlp": np.zeros_like(mlp)}
    em = EffectMap("tiny", "noise", "m", 10, [0, 1, 2], roles, {"mlp": mlp}, z, z)
    val = tune_mod.default_validation(model, P, K, corpus, FAST["cov_tokens"], keep_sample=32,
                                      ppl_tokens=300)
    grid = tune_mod.TuneGrid(mom2_per_column=(0.5,), keep_weights=(3.0,), top_layers=1)
    d = lsdm(model, P, effect_map=em, corpus=corpus, hparams=FAST, keep_prompts=K, grid=grid,
             validation=val, cache_dir=tmp_path, progress=False)
    d.undo(model)
    rec = d.info["diagnostics"]["tuning"]
    assert rec["roles_on_the_same_tokens"] == {"subject_last": "subject_first"}
    assert d.info["site"]["role"] == "subject_first" and len(rec["sweep"]) == 1
