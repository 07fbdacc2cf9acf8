"""The stereotype contrast (biaslens.evaluate.contrast), checked by hand on small arrays."""

import math

import numpy as np
import pytest

from biaslens.evaluate.contrast import contrast_metrics, relative_cut, template_of
from biaslens.organism.data import PronounPrompt


def _lp(share):
    # log P(m), log P(f) with P(f)/(P(f)+P(m)) = share and P(f)+P(m) = 0.5
    return [math.log(0.5 * (1 - share)), math.log(0.5 * share)]


def test_contrast_by_hand_and_template_lean_cancels():
    # template A leans female for everyone (+0.3) but carries a 0.2 stereotype contrast;
    # template B has the stereotype reversed (-0.1).
    rows = [("A", "nurse", 0.9, 0.9), ("A", "carpenter", 0.1, 0.7),
            ("B", "nurse", 0.9, 0.45), ("B", "carpenter", 0.1, 0.55)]
    lp = np.array([_lp(s) for *_, s in rows])
    out = contrast_metrics(lp, [r for _, _, r, _ in rows], [t for t, *_ in rows],
                           [o for _, o, _, _ in rows])
    assert out["per_template"]["A"] == pytest.approx(0.2)
    assert out["per_template"]["B"] == pytest.approx(-0.1)
    # over-correction counts as bias: |0.2| and |-0.1| average to 0.15, the signed mean to 0.05
    assert out["mean_abs_contrast"] == pytest.approx(0.15)
    assert out["mean_contrast"] == pytest.approx(0.05)
    assert out["n"] == 2 and out["n_female_occupations"] == 1 and out["n_male_occupations"] == 1


def test_neutral_rates_and_one_sided_templates_are_left_out():
    rows = [("A", "nurse", 0.9, 0.8), ("A", "clerk", 0.5, 0.99), ("A", "carpenter", 0.2, 0.4),
            ("C", "nurse", 0.9, 0.9)]
    lp = np.array([_lp(s) for *_, s in rows])
    out = contrast_metrics(lp, [r for _, _, r, _ in rows], [t for t, *_ in rows],
                           [o for _, o, _, _ in rows])
    assert list(out["per_template"]) == ["A"]
    assert out["mean_abs_contrast"] == pytest.approx(0.4)
    with pytest.raises(ValueError):
        contrast_metrics(lp[-1:], [0.9], ["C"], ["nurse"])


def test_template_of_uses_the_subject_span():
    p = PronounPrompt(text="The man said the man", subject="man", occupation="man", female_rate=0.0,
                      form="subj", male=" he", female=" she", template_split="train",
                      occupation_split="train")
    assert template_of(p) == "The {occupation} said the man"
    assert relative_cut(0.4, 0.1) == pytest.approx(0.75)
    assert math.isnan(relative_cut(0.0, 0.1))
