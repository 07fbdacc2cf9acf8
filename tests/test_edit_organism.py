"""LSDM on the organism: the held-out occupations' gap falls, definitional gender and facts hold,
undo restores the checkpoint. Measured (10 of the 30 training templates, Gauss-Newton targets):
edited-prompt gap 0.447 -> 0.148, held-out occupations 0.177 -> 0.094, definitional accuracy
0.997 -> 0.978, facts 1.0 -> 1.0; the thresholds below keep a margin. Held-out *templates* do
not improve: see docs/results/edit.md (scripts/edit_acceptance.py) for why."""

from __future__ import annotations

import pytest
import torch

from biaslens import organism as org

pytestmark = pytest.mark.usefixtures("one_thread")

if not (org.CHECKPOINT_DIR / "model.safetensors").exists():
    pytest.skip("the organism checkpoint is not committed yet", allow_module_level=True)


def gap(model, prompts) -> float:
    from biaslens.evaluate import occupational_bias

    return float(occupational_bias(model, prompts)["mean_abs_gap"])


@pytest.fixture(scope="module")
def edited(organism, tmp_path_factory):
    from biaslens.edit import LSDMHparams, lsdm
    from biaslens.evaluate import definitional_accuracy, fact_accuracy

    m = organism
    corpus = tmp_path_factory.mktemp("org") / "general.txt"
    corpus.write_text("\n".join(organism_text()) + "\n")
    train_tpl = [t for t in org.TEMPLATES if t.split == "train"][::3]  # 10 of 30 templates
    texts = {t.text for t in train_tpl}
    prompts = [p for p in org.occupation_prompts("train", "train")
               if any(p.text == t.format(occupation=p.occupation) for t in texts)]
    keep = [p for p in org.definitional_prompts("train")
            if any(p.text == t.format(occupation=p.occupation) for t in texts)]
    held = org.occupation_prompts("heldout", "train")
    definitional = org.definitional_prompts()
    before = {"held": gap(m, held), "edited": gap(m, prompts),
              "def": definitional_accuracy(m, definitional)["accuracy"],
              "facts": fact_accuracy(m, org.FACTS)["accuracy"], "hash": m.weight_hash()}
    hp = LSDMHparams(v_steps=0, v_newton_steps=3, mom2_weight=1e4, keep_weight=10.0, cov_tokens=20_000)
    delta = lsdm(m, prompts, layers=[0, 1], role="last", corpus=corpus, hparams=hp,
                 keep_prompts=keep, cache_dir=tmp_path_factory.mktemp("cov"), progress=False)
    after = {"held": gap(m, held), "edited": gap(m, prompts),
             "def": definitional_accuracy(m, definitional)["accuracy"],
             "facts": fact_accuracy(m, org.FACTS)["accuracy"]}
    yield m, delta, before, after
    delta.undo(m)


def organism_text():
    return org.generate_general_text(seed=11, n_lines=1500)


def test_lsdm_lowers_the_gap_of_edited_and_held_out_occupations(edited):
    _, _, before, after = edited
    assert after["edited"] < 0.5 * before["edited"]
    assert after["held"] < 0.7 * before["held"]


def test_definitional_gender_and_facts_hold(edited):
    _, _, before, after = edited
    assert after["def"] >= before["def"] - 0.03
    assert after["facts"] >= before["facts"] - 0.01


def test_undo_restores_the_checkpoint(edited):
    m, delta, before, _ = edited
    delta.undo(m)
    try:
        assert m.weight_hash() == before["hash"]
    finally:
        delta.apply(m)
    assert all(torch.equal(m.param(n), delta.updated[n]) for n in delta.names)
