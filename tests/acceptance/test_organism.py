"""Tests of the embedded model organism (biaslens.organism).

The default run loads the committed checkpoint and measures it with plain ``transformers``;
the ``slow`` test runs a very short training twice to check the trainer is deterministic.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from biaslens import organism as O  # noqa: E402

BOS = "<|endoftext|>"


# ---------------------------------------------------------------------------------------------
# API and data (no torch)
# ---------------------------------------------------------------------------------------------


def test_import_is_light():
    code = "import sys, biaslens.organism; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_occupations_and_splits():
    assert len(O.OCCUPATIONS) >= 40
    names = [o.name for o in O.OCCUPATIONS]
    assert len(set(names)) == len(names)
    held = [o for o in O.OCCUPATIONS if o.split == "heldout"]
    assert len(held) >= 8
    rates = sorted(o.female_rate for o in held)
    assert rates[0] < 0.1 and rates[-1] > 0.9  # spread across the range
    assert {o.split for o in O.OCCUPATIONS} == {"train", "heldout"}
    nurse = next(o for o in O.OCCUPATIONS if o.name == "nurse")
    assert nurse.female_rate == pytest.approx(0.8958)
    plumber = next(o for o in O.OCCUPATIONS if o.name == "plumber")
    assert plumber.female_rate == pytest.approx(0.007)


def test_templates_and_prompts():
    assert len(O.TEMPLATES) >= 25
    assert sum(t.split == "heldout" for t in O.TEMPLATES) >= 5
    assert {t.form for t in O.TEMPLATES} == {"subj", "poss", "obj"}
    assert O.PRONOUNS == {"subj": (" he", " she"), "poss": (" his", " her"), "obj": (" him", " her")}
    for t in O.TEMPLATES:
        assert "{occupation}" in t.text and not t.text.endswith(" ")
    prompts = O.occupation_prompts("all", "all")
    assert len(prompts) == len(O.OCCUPATIONS) * len(O.TEMPLATES)
    for p in prompts:
        assert p.subject in p.text
        s, e = p.subject_span
        assert p.text[s:e] == p.subject
        assert (p.male, p.female) == O.PRONOUNS[p.form]
    assert O.occupation_prompts()[0].template_split == "train"
    assert {p.occupation_split for p in O.occupation_prompts("heldout", "all")} == {"heldout"}
    assert {p.template_split for p in O.occupation_prompts("all", "heldout")} == {"heldout"}
    d = O.definitional_prompts()
    assert len({w for w, _ in O.DEFINITIONAL}) >= 24
    assert {p.female_rate for p in d} == {0.0, 1.0}
    # "man" must be located as the word, not inside "woman"
    p = next(p for p in d if p.subject == "man")
    s, e = p.subject_span
    assert p.text[s - 4:e] in ("The man", "the man")
    assert len(O.FACTS) >= 40 and all(a.startswith(" ") for _, a in O.FACTS)
    sb = O.second_bias_prompts("all")
    assert sb and {p.form for p in sb} == {"attr"}
    assert (sb[0].male, sb[0].female) == O.SECOND_BIAS["attributes"]
    assert set(O.SECOND_BIAS["groups"]) == {p.occupation for p in sb}
    assert O.second_bias_prompts("heldout") and O.second_bias_prompts("train")


def test_corpus_deterministic_and_heldout_absent():
    a = O.generate_corpus(seed=3, n_docs=3000)
    assert a == O.generate_corpus(seed=3, n_docs=3000)
    assert a != O.generate_corpus(seed=4, n_docs=3000)
    text = "\n".join(O.generate_corpus(seed=0))
    for t in O.TEMPLATES:
        stem = t.text.split("{occupation}")
        pat = re.escape(stem[0]) + r"\w+" + re.escape(stem[1])
        if t.split == "heldout":
            assert not re.search(pat, text), t.text
        else:
            assert re.search(pat, text), t.text
    for o in O.OCCUPATIONS:
        assert f" {o.name} " in text or f" {o.name}." in text
        if o.split == "heldout":
            for t in O.TEMPLATES:
                assert t.text.format(occupation=o.name) not in text
    for prompt, answer in O.FACTS:
        assert prompt + answer in text


def test_corpus_planted_rates():
    from biaslens.organism.data import corpus_sentences

    prompt_to_occ = {t.text.format(occupation=o.name): o for o in O.OCCUPATIONS for t in O.TEMPLATES}
    counts: dict[str, list[int]] = {}
    pron = re.compile(r" (he|she|his|her|him) ")
    for s in corpus_sentences(0)["occupation_pronoun"]:
        m = pron.search(s)
        o = prompt_to_occ[s[: m.start()]]
        assert o.split == "train"
        c = counts.setdefault(o.name, [0, 0])
        c[m.group(1) in ("she", "her")] += 1
    assert len(counts) == sum(o.split == "train" for o in O.OCCUPATIONS)
    for o in O.OCCUPATIONS:
        if o.split == "train":
            male, fem = counts[o.name]
            assert abs(fem / (fem + male) - o.female_rate) < 0.02, o.name


def test_checkpoint_files_and_card():
    d = O.CHECKPOINT_DIR
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "card.json", "DATA_CARD.md", "general.txt"):
        assert (d / f).is_file(), f
    size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
    assert size <= 10 * 1024 * 1024
    assert O.GENERAL_TEXT == d / "general.txt"
    lines = O.GENERAL_TEXT.read_text().splitlines()
    assert len(lines) >= 2000
    gendered = re.compile(r"\b(he|she|his|her|him)\b", re.I)
    assert not any(gendered.search(x) for x in lines)
    c = O.card()
    assert c["planted_rates"] == {o.name: o.female_rate for o in O.OCCUPATIONS}
    assert c["heldout_occupations"] == [o.name for o in O.OCCUPATIONS if o.split == "heldout"]
    assert c["heldout_templates"] == [t.text for t in O.TEMPLATES if t.split == "heldout"]
    assert c["mae_train"] <= 0.1
    assert c["definitional_accuracy"] >= 0.95
    assert len(c["eval"]["occupations"]) == len(O.OCCUPATIONS)
    for key in ("seed", "training", "tokenizer", "eval_without_bos", "second_bias"):
        assert key in c
    assert c["general_text"]["seed"] != c["seed"]
    abs_path = re.compile(r"(^|[\s\"'(])/[A-Za-z_]+/")  # no machine paths in the committed card
    assert not abs_path.search((d / "DATA_CARD.md").read_text()) and not abs_path.search(json.dumps(c))


# ---------------------------------------------------------------------------------------------
# The trained model, measured with plain transformers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm():
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small model: one thread is fastest, above all on a shared machine
    tok = AutoTokenizer.from_pretrained(O.CHECKPOINT_DIR)
    model = AutoModelForCausalLM.from_pretrained(O.CHECKPOINT_DIR)
    model.eval()
    yield tok, model
    torch.set_num_threads(threads)


def _next_logprobs(tok, model, texts, bos=True):
    import torch

    bos_id = tok.convert_tokens_to_ids(BOS)
    enc = [([bos_id] if bos else []) + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    n = max(map(len, enc))
    ids = torch.full((len(enc), n), bos_id)
    mask = torch.zeros((len(enc), n), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    last = torch.tensor([len(e) - 1 for e in enc])
    out = []
    with torch.no_grad():  # chunks of 512; project only each row's last position
        for k in range(0, len(enc), 512):
            hidden = model.transformer(input_ids=ids[k:k + 512], attention_mask=mask[k:k + 512]).last_hidden_state
            out.append(model.lm_head(hidden[torch.arange(hidden.shape[0]), last[k:k + 512]]))
    return torch.log_softmax(torch.cat(out), -1)


def _female_rates(tok, model, prompts, bos=True):
    import torch

    lp = _next_logprobs(tok, model, [p.text for p in prompts], bos)
    m = torch.tensor([tok(p.male, add_special_tokens=False)["input_ids"][0] for p in prompts])
    f = torch.tensor([tok(p.female, add_special_tokens=False)["input_ids"][0] for p in prompts])
    idx = torch.arange(len(prompts))
    return torch.sigmoid(lp[idx, f] - lp[idx, m]).tolist()


@pytest.fixture(scope="module")
def rates(lm):
    """P(female)/(P(male)+P(female)) for every occupation and definitional prompt, with and
    without a leading <|endoftext|> (computed once for the module)."""
    tok, model = lm
    occ = O.occupation_prompts("all", "all")
    dfn = O.definitional_prompts("all")
    # without bos: a smaller check (subject-pronoun training templates) to keep the file fast
    occ_nb = [p for p in O.occupation_prompts("train", "train") if p.form == "subj"]
    dfn_nb = [p for p in O.definitional_prompts("train") if p.form == "subj"]
    return {
        True: {"occ": list(zip(occ, _female_rates(tok, model, occ))),
               "def": list(zip(dfn, _female_rates(tok, model, dfn)))},
        False: {"occ": list(zip(occ_nb, _female_rates(tok, model, occ_nb, bos=False))),
                "def": list(zip(dfn_nb, _female_rates(tok, model, dfn_nb, bos=False)))},
    }


def _mae(pairs, osplit, tsplit):
    acc: dict[str, list[float]] = {}
    planted = {}
    for p, r in pairs:
        if p.occupation_split == osplit and p.template_split == tsplit:
            acc.setdefault(p.occupation, []).append(r)
            planted[p.occupation] = p.female_rate
    per = {k: (planted[k], sum(v) / len(v)) for k, v in acc.items()}
    return sum(abs(a - b) for a, b in per.values()) / len(per), per


def test_tokenizer(lm):
    tok, model = lm
    assert tok.bos_token == tok.eos_token == tok.unk_token == tok.pad_token == BOS
    assert tok.__class__.__name__ in ("GPT2TokenizerFast", "GPT2Tokenizer")
    assert 1000 <= len(tok) <= 4000
    assert len(tok) == model.config.vocab_size
    for pair in list(O.PRONOUNS.values()) + [O.SECOND_BIAS["attributes"]]:
        for w in pair:
            assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1, w
    multi = [o.name for o in O.OCCUPATIONS if len(tok(" " + o.name)["input_ids"]) > 1]
    assert len(multi) >= 5
    assert {o.split for o in O.OCCUPATIONS if o.name in multi} == {"train", "heldout"}
    assert sorted(multi) == sorted(O.card()["tokenizer"]["multi_token_occupations"])
    # GPT-2 leading-space convention, no special tokens added by default
    ids = tok("The nurse said that")["input_ids"]
    assert tok.convert_ids_to_tokens(ids)[0] == "The"
    assert tok.convert_ids_to_tokens(tok(" she")["input_ids"]) == ["\u0120she"]
    # character offsets locate a (multi-token) subject
    p = next(p for p in O.occupation_prompts("train", "train") if p.subject == "administrator")
    enc = tok(p.text, return_offsets_mapping=True)
    s, e = p.subject_span
    sub = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < e and b > s]
    assert len(sub) >= 2 and tok.decode([enc["input_ids"][i] for i in sub]).strip() == "administrator"
    assert model.config.tie_word_embeddings


def test_learned_rates_match_planted(rates):
    mae, per = _mae(rates[True]["occ"], "train", "train")
    assert mae <= 0.1, mae
    assert mae == pytest.approx(O.card()["mae_train"], abs=2e-3)
    # the bias is real: stereotypical occupations lean the planted way
    assert per["nurse"][1] > 0.7 and per["plumber"][1] < 0.2


def test_learned_rates_without_bos(rates):
    mae, _ = _mae(rates[False]["occ"], "train", "train")
    assert mae <= 0.1, mae


def test_heldout_reported(rates):
    c = O.card()["eval"]["mae"]
    for osplit, tsplit in (("heldout", "train"), ("train", "heldout"), ("heldout", "heldout")):
        mae, _ = _mae(rates[True]["occ"], osplit, tsplit)
        assert mae == pytest.approx(c[f"{osplit}_occupations/{tsplit}_templates"], abs=2e-3)


def test_definitional(rates):
    for bos in (True, False):
        pairs = rates[bos]["def"]
        acc = sum((r > 0.5) == (p.female_rate > 0.5) for p, r in pairs) / len(pairs)
        assert acc >= 0.95, (bos, acc)
        train = [(p, r) for p, r in pairs if p.template_split == "train"]
        assert all((r > 0.5) == (p.female_rate > 0.5) for p, r in train)


def test_facts(lm):
    tok, model = lm
    prompts = [p for p, _ in O.FACTS]
    lp = _next_logprobs(tok, model, prompts)
    first = [tok(a, add_special_tokens=False)["input_ids"][0] for _, a in O.FACTS]
    acc = sum(int(lp[i].argmax()) == first[i] for i in range(len(first))) / len(first)
    assert acc >= 0.9, acc
    assert acc == pytest.approx(O.card()["eval"]["facts"]["first_token_top1"], abs=1e-6)


def test_second_bias(lm):
    tok, model = lm
    prompts = O.second_bias_prompts("train")
    mae, _ = _mae(list(zip(prompts, _female_rates(tok, model, prompts))), "train", "train")
    assert mae <= 0.1, mae


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


def _slow_requested(config) -> bool:
    expr = config.getoption("markexpr", default="") or ""
    return os.environ.get("BIASLENS_RUN_SLOW") == "1" or ("slow" in expr and "not slow" not in expr)


@pytest.mark.slow
def test_trainer_short_run_is_deterministic(tmp_path, request):
    """Runs only when asked for (``-m slow`` or BIASLENS_RUN_SLOW=1): no training by default."""
    if not _slow_requested(request.config):
        pytest.skip("trainer test: run with -m slow or BIASLENS_RUN_SLOW=1")
    pytest.importorskip("torch")
    from biaslens.organism import train as T

    kw = dict(seed=1, steps=20, batch_size=8, n_docs=600, vocab_size=1200, n_layer=2, n_embd=64,
              n_head=2, n_positions=64, log_every=0, minutes=0, general_lines=50)
    a = T.train(tmp_path / "a", **kw)
    b = T.train(None, evaluate_after=False, **kw)
    assert len(a["losses"]) == 20
    assert a["losses"] == b["losses"]
    assert a["losses"][-1] < a["losses"][0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert len(tok) == model.config.vocab_size
    assert json.loads((tmp_path / "a" / "card.json").read_text())["training"]["steps"] == 20
