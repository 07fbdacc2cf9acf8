"""On the organism each unlearning method, choosing its strength on the validation split only,
cuts the stereotype contrast on the training occupations × held-out templates (never trained or
chosen on), stays within the bounds on the validation data, and undoes exactly.

The fast representative is masked-span ascent; the other methods (and organism-llama) are slow.
The validation here is a slice of the default one (every template of the validation split, a
third of its occupations and definitional prompts) to keep the suite quick.
"""

from __future__ import annotations

import json

import pytest

from biaslens import organism

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not (organism.CHECKPOINT_DIR / "config.json").exists(),
                       reason="needs the organism checkpoint (src/organism/checkpoint)"),
]


def _validation(model):
    from biaslens.defaults import defaults_for
    from biaslens.unlearn.select import Validation, default_definitional

    d = defaults_for(model)
    occ = sorted({p.occupation for p in d.occupation_prompts("edit", "validation")})[::3]
    return Validation(model, prompts=[p for p in d.occupation_prompts("edit", "validation") if p.occupation in occ],
                      definitional=default_definitional(model)[::3], ppl_texts=d.general_lines(60))


def _heldout_contrast(model):
    from biaslens.defaults import defaults_for
    from biaslens.evaluate.contrast import stereotype_contrast

    return stereotype_contrast(model, defaults_for(model).occupation_prompts("edit", "test"))["mean_abs_contrast"]


def _run(model, method, spy=None):
    """Run ``method(model, data, validation)``; returns the numbers every test reads, after
    checking the chosen point against a fresh measurement and undoing the result."""
    from biaslens.defaults import defaults_for

    data = defaults_for(model).unlearn_data(seed=0)
    val = _validation(model)
    h0, c0 = model.weight_hash(), _heldout_contrast(model)
    if spy:
        spy.active = True
    try:
        scored, delta, owner = method(model, data, val)
    finally:
        if spy:
            spy.active = False
    chosen = val.best()
    again = val.measure(scored, check="again")  # the kept state is the chosen one, within the bounds
    out = {"c0": c0, "c1": _heldout_contrast(scored), "delta": delta, "val": val, "chosen": chosen,
           "again": again, "scored": spy.prompts if spy else None}
    delta.undo(owner)
    out["undo_exact"] = model.weight_hash() == h0
    out["c_undone"] = _heldout_contrast(model)
    return out


class Spy:
    """Records every prompt scored for pronoun probabilities (contrast and definitional checks)
    while ``active`` (the method's run)."""

    def __init__(self, monkeypatch):
        import importlib

        occupations = importlib.import_module("biaslens.evaluate.probes")
        self.prompts, self.active, real = [], False, occupations.pronoun_logprobs

        def spy(model, prompts, *a, **kw):
            prompts = list(prompts)
            if self.active:
                self.prompts.extend(prompts)
            return real(model, prompts, *a, **kw)

        monkeypatch.setattr(occupations, "pronoun_logprobs", spy)


def _check(res, min_cut):
    val, chosen, again = res["val"], res["chosen"], res["again"]
    assert chosen is not val.base and chosen.ok, val.info()
    assert again.ok and again.contrast == pytest.approx(chosen.contrast, abs=1e-5)
    b = val.bounds
    assert again.ppl <= (1 + b.ppl_rise) * val.base.ppl
    assert again.definitional >= val.base.definitional - b.definitional_drop - 1e-9
    assert again.margin >= val.base.margin - b.margin_drop - 1e-9
    assert set(again.by_gender) == set(val.base.by_gender) == {"female", "male"}
    for g, (acc, margin) in again.by_gender.items():  # each gender's words, not only the total
        assert acc >= val.base.by_gender[g][0] - b.definitional_drop - 1e-9
        assert margin >= val.base.by_gender[g][1] - b.margin_drop - 1e-9
    cut = 1 - res["c1"] / res["c0"]
    assert cut >= min_cut, (res["c0"], res["c1"])
    assert res["undo_exact"] and res["c_undone"] == pytest.approx(res["c0"], abs=1e-6)
    return cut


@pytest.fixture(scope="module")
def ascent_run(organism):
    mp = pytest.MonkeyPatch()
    spy = Spy(mp)
    from biaslens.unlearn.masked_ascent import masked_span_ascent

    def method(model, data, val):
        from biaslens.defaults import defaults_for

        keep = defaults_for(model).definitional_prompts("edit")[::3]  # a third of the keep set: quicker
        d = masked_span_ascent(model, data["forget"], lrs=[3e-4], keep_weight=30.0, max_steps=20, eval_every=10,
                               validation=val, keep_prompts=keep, progress=False)
        return model, d, model

    try:
        yield _run(organism, method, spy)
    finally:
        mp.undo()


def test_masked_span_ascent_cuts_heldout_contrast(ascent_run):
    """20 steps at the grid's larger learning rate and the grid's smaller keep weight (30), one
    run (the default run, up to 200 steps over both grids, is the slow test below and the
    acceptance script; the weight of 100 it chooses learns too slowly for 20 steps)."""
    _check(ascent_run, min_cut=0.30)
    info = ascent_run["delta"].info
    assert info["chosen"]["step"] > 0 and info["selection"]["changed"]
    assert info["selection"]["split"].startswith("occupations=edit, templates=validation")


def test_strength_is_chosen_on_validation_prompts_only(ascent_run, organism):
    """Every prompt scored while the method chose its strength is a validation prompt: none
    has a test (held-out) template, and the keep term trains on edit templates only."""
    from biaslens.evaluate.contrast import template_of
    from biaslens.unlearn.select import split_templates

    test, validation = split_templates(organism, "test"), split_templates(organism, "validation")
    scored = {template_of(p) for p in ascent_run["scored"]}
    assert scored and not scored & test
    occupational = {template_of(p) for p in ascent_run["scored"] if p.occupation_split != "definitional"}
    assert occupational <= validation
    keep = {template_of(p) for p in ascent_run["val"].definitional}
    assert not keep & test


@pytest.mark.slow
def test_masked_span_ascent_defaults_cut_heldout_contrast(organism):
    """The default grids (learning rate × keep weight): 40% or more (74% in
    docs/results/generalise.md, keep weight 100; with the weight fixed at 30 it was 30%, the
    female words' validation margin past its bound after 30 steps)."""
    from biaslens.unlearn.masked_ascent import masked_span_ascent

    def method(model, data, val):
        return model, masked_span_ascent(model, data["forget"], validation=val, progress=False), model

    _check(_run(organism, method), min_cut=0.40)


@pytest.mark.slow
def test_task_vector_cuts_heldout_contrast(organism):
    from biaslens.unlearn.task_vector import task_vector_negation

    def method(model, data, val):
        d = task_vector_negation(model, data["forget"], validation=val, progress=False)
        return model, d, model

    res = _run(organism, method)
    _check(res, min_cut=0.40)
    assert res["delta"].info["lambda"] > 0


@pytest.mark.slow
def test_offset_cuts_heldout_contrast(organism):
    from biaslens.unlearn.offset import offset_unlearn

    def method(model, data, val):
        om = offset_unlearn(model, model, data["forget"], data["retain"], validation=val, progress=False)
        return om, om.delta, om.offset

    _check(_run(organism, method), min_cut=0.40)  # 45% in docs/results/generalise.md (keep weight 100)


@pytest.mark.slow
def test_pcgu_cuts_heldout_contrast(organism):
    """PCGU falls short of the 40% target on the organism (docs/results/unlearn.md); it still
    cuts the held-out contrast within the bounds."""
    from biaslens.unlearn.partitioned import pcgu

    def method(model, data, val):
        d = pcgu(model, data["pairs"], validation=val, progress=False)
        return model, d, model

    res = _run(organism, method)
    _check(res, min_cut=0.08)
    assert not any(n.startswith(("transformer.wte", "transformer.wpe", "transformer.ln_f"))
                   for n in res["delta"].names)


@pytest.mark.slow
def test_masked_span_ascent_on_organism_llama():
    import biaslens

    if not (organism.LLAMA_DIR / "model.safetensors").exists():
        pytest.skip("organism-llama is not trained here")
    from biaslens.unlearn.masked_ascent import masked_span_ascent

    model = biaslens.load("organism-llama")

    def method(model, data, val):
        d = masked_span_ascent(model, data["forget"], validation=val, progress=False)
        return model, d, model

    _check(_run(model, method), min_cut=0.40)


@pytest.mark.slow
def test_pcgu_on_organism_llama_chooses_its_update_on_validation():
    """On organism-llama PCGU's default grid (docs/methods/unlearning.md) cuts the held-out
    contrast by at least 40% within the validation bounds (43% in docs/results/generalise.md),
    and the record names the update it chose."""
    import biaslens

    if not (organism.LLAMA_DIR / "model.safetensors").exists():
        pytest.skip("organism-llama is not trained here")
    from biaslens.unlearn.partitioned import DEFAULT_VARIANTS, pcgu

    model = biaslens.load("organism-llama")

    def method(model, data, val):
        return model, pcgu(model, data["pairs"], validation=val, progress=False), model

    res = _run(model, method)
    _check(res, min_cut=0.40)
    d = res["delta"]
    assert [r["variant"] for r in d.info["runs"]][::2] == list(DEFAULT_VARIANTS)
    assert d.hparams["variant"] == d.info["chosen_run"]["variant"] in DEFAULT_VARIANTS


@pytest.mark.slow
def test_cli_unlearn_chooses_on_validation(tmp_path):
    """The CLI runs a method with its defaults and records the sweep and the choice."""
    from biaslens.cli import main

    out = tmp_path / "o"
    assert main(["unlearn", "--method", "masked-ascent", "--model", "organism", "--max-steps", "40",
                 "--lr", "1e-4", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    sel = rep["info"]["selection"]
    assert sel["split"].startswith("occupations=edit, templates=validation") and sel["sweep"]
    assert sel["chosen"]["ok"] and rep["changed"]
    man = json.loads((out / "manifest.json").read_text())
    assert man["method"] == "masked-span-ascent" and man["selection"]["bounds"]["ppl_rise"] == pytest.approx(0.1)
