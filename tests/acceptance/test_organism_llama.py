"""Tests of the LLaMA-family organism (``organism-llama``, src/organism/llama/).

It shares the GPT-2 organism's corpus and planted statistics (biaslens.organism.data) and
differs in architecture: grouped-query attention, RMSNorm, a gated MLP, rotary positions and a
SentencePiece-style Metaspace tokenizer. The default run loads the committed folder, measures it
again with plain ``transformers`` (an implementation independent of the trainer's) and checks the
card against that; the ``slow`` test runs a very short llama training.
"""

from __future__ import annotations

import json
import math
import os
import re

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from biaslens import organism as O  # noqa: E402

NAME = "organism-llama"
D = O.LLAMA_DIR
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "generation_config.json", "card.json", "DATA_CARD.md", "general.txt")


# ---------------------------------------------------------------------------------------------
# Files and card (no torch)
# ---------------------------------------------------------------------------------------------


def test_registry_and_files():
    assert O.ORGANISMS == {"organism": O.CHECKPOINT_DIR, "organism-llama": O.LLAMA_DIR}
    assert O.folder(NAME) == D and O.name_of(D) == NAME and O.name_of(O.CHECKPOINT_DIR) == "organism"
    assert O.name_of(D.parent) is None
    with pytest.raises(KeyError, match="organism-llama"):
        O.folder("organism-mistral")
    for f in FILES:  # the same file set as the GPT-2 organism's folder
        assert (D / f).is_file(), f
        assert (O.CHECKPOINT_DIR / f).is_file(), f
    size = sum(p.stat().st_size for p in D.rglob("*") if p.is_file())
    assert size <= 10 * 1024 * 1024
    # same generator and seed: the shared helpers that read the GPT-2 organism's copy stay right
    assert O.general_text(NAME) == D / "general.txt"
    assert O.general_text(NAME).read_bytes() == O.GENERAL_TEXT.read_bytes()


def test_card_records_family_architecture_and_time():
    c = O.card(NAME)
    assert c["family"] == "llama" and c["name"] == "biaslens organism-llama"
    arch = c["architecture"]
    assert arch["class"] == "LlamaForCausalLM"
    assert "grouped-query" in arch["attention"] and "RMSNorm" in arch["norm"]
    assert "gated" in arch["mlp"] and "RoPE" in arch["positions"] and "Metaspace" in arch["tokenizer"]
    m = c["model"]
    assert m["n_kv_head"] < m["n_head"] and m["n_head"] % m["n_kv_head"] == 0
    assert m["n_layer"] == 4 and m["n_embd"] == 128 and 0.5e6 <= m["n_parameters"] <= 1.5e6
    tr = c["training"]
    assert tr["steps"] == tr["planned_steps"] and not tr["stopped_early_by_time_cap"]
    assert 0 < tr["train_seconds"] <= tr["total_seconds"] and tr["threads"] in (1, 2)
    assert "load_average_1_5_15min_before" in tr and tr["cpu_count"] >= 1
    # the same planted data as the GPT-2 organism
    g = O.card("organism")
    for k in ("planted_rates", "heldout_occupations", "heldout_templates", "train_templates", "definitional"):
        assert c[k] == g[k], k
    assert c["planted_rates"] == {o.name: o.female_rate for o in O.OCCUPATIONS}
    assert c["tokenizer"]["bos"] == "<s>" and c["tokenizer"]["eos"] == "</s>"
    abs_path = re.compile(r"(^|[\s\"'(])/[A-Za-z_]+/")
    assert not abs_path.search((D / "DATA_CARD.md").read_text()) and not abs_path.search(json.dumps(c))
    # the quality the issue asks of an organism
    assert c["mae_train"] <= 0.1 and c["definitional_accuracy"] >= 0.95 and c["fact_accuracy"] >= 0.9


def test_data_cards_are_what_the_trainer_writes():
    from biaslens.organism import train as T

    assert T.data_card_markdown(O.card(NAME)) == (D / "DATA_CARD.md").read_text(encoding="utf-8")
    # the GPT-2 organism's card still renders to its committed data card (its recipe is unchanged)
    assert T.data_card_markdown(O.card("organism")) == (O.CHECKPOINT_DIR / "DATA_CARD.md").read_text(encoding="utf-8")
    text = (D / "DATA_CARD.md").read_text(encoding="utf-8")
    assert "LlamaForCausalLM" in text and "grouped-query" in text and "--family llama" in text


def test_defaults_recognise_it_without_loading():
    from biaslens.defaults import defaults_for, is_organism, which_organism

    for spec in (NAME, str(D)):
        assert is_organism(spec) and which_organism(spec) == NAME
        d = defaults_for(spec)
        assert d.organism and d.corpus == D / "general.txt" and d.ppl_text == D / "general.txt"
    assert defaults_for("organism").corpus == O.GENERAL_TEXT
    assert not is_organism("gpt2") and not is_organism(str(D.parent)) and defaults_for("gpt2").kind == "general"
    # the organism's prompts, facts and splits, the same for both organisms
    a, b = defaults_for(NAME), defaults_for("organism")
    for occ, tpl in (("edit", "test"), ("heldout", "test"), ("edit", "edit")):
        assert [p.text for p in a.occupation_prompts(occ, tpl)] == [p.text for p in b.occupation_prompts(occ, tpl)]
    test = a.occupation_prompts("edit", "test")
    assert {p.template_split for p in test} == {"heldout"} and {p.occupation_split for p in test} == {"train"}
    assert a.facts() == list(O.FACTS)


def test_resolve_spec():
    from biaslens.model import resolve_spec

    assert resolve_spec(NAME) == (str(D), True)
    assert resolve_spec("organism") == (str(O.CHECKPOINT_DIR), True)


# ---------------------------------------------------------------------------------------------
# The trained model, measured with plain transformers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm():
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(D)
    model = AutoModelForCausalLM.from_pretrained(D)
    model.eval()
    yield tok, model
    torch.set_num_threads(threads)


def _cont(tok, context, word):
    head = tok(context, add_special_tokens=False)["input_ids"]
    full = tok(context + word, add_special_tokens=False)["input_ids"]
    assert full[: len(head)] == head
    return full[len(head):]


def _female_rates(tok, model, prompts):
    """P(female)/(P(male)+P(female)) at the next token, with the tokenizer's own <s> (left to the
    tokenizer: add_special_tokens=True), padded on the right, read at the last real token."""
    import torch

    enc = tok([p.text for p in prompts], add_special_tokens=True, padding=True, return_tensors="pt")
    assert (enc["input_ids"][:, 0] == tok.bos_token_id).all()
    with torch.no_grad():
        logits = model(**enc).logits
    last = enc["attention_mask"].sum(1) - 1
    lp = torch.log_softmax(logits[torch.arange(len(prompts)), last].float(), -1)
    out = []
    for row, p in zip(lp, prompts):
        (m,), (f,) = _cont(tok, p.text, p.male), _cont(tok, p.text, p.female)
        out.append(float(torch.sigmoid(row[f] - row[m])))
    return out


@pytest.fixture(scope="module")
def train_rates(lm):
    """Rates for every training occupation × training template (computed once)."""
    tok, model = lm
    prompts = O.occupation_prompts("train", "train")
    return list(zip(prompts, _female_rates(tok, model, prompts)))


def _per_occupation(pairs):
    acc: dict[str, list[float]] = {}
    for p, r in pairs:
        acc.setdefault(p.occupation, []).append(r)
    return {k: sum(v) / len(v) for k, v in acc.items()}


def test_is_a_llama_with_gqa_rmsnorm_gated_mlp_rope(lm):
    tok, model = lm
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and cfg.model_type == "llama"
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    layer = model.model.layers[0]
    attn = layer.self_attn
    d_head = cfg.hidden_size // cfg.num_attention_heads
    assert attn.q_proj.weight.shape == (cfg.num_attention_heads * d_head, cfg.hidden_size)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (cfg.num_key_value_heads * d_head, cfg.hidden_size)
    assert type(layer.input_layernorm).__name__ == "LlamaRMSNorm"
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"
    assert not hasattr(layer.input_layernorm, "bias") or layer.input_layernorm.bias is None
    mlp = layer.mlp
    assert {"gate_proj", "up_proj", "down_proj"} <= {n for n, _ in mlp.named_children()}
    assert cfg.hidden_act == "silu" and mlp.down_proj.weight.shape == (cfg.hidden_size, cfg.intermediate_size)
    assert hasattr(model.model, "rotary_emb") and not any("position" in n for n, _ in model.named_parameters())
    assert cfg.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert len(tok) == cfg.vocab_size


def test_metaspace_tokenizer(lm):
    tok, _ = lm
    state = json.loads(tok.backend_tokenizer.to_str())
    metaspace = [t for t in state["pre_tokenizer"]["pretokenizers"] if t["type"] == "Metaspace"]
    assert len(metaspace) == 1 and metaspace[0]["replacement"] == "\u2581"
    assert state["model"]["type"] == "BPE" and state["model"]["byte_fallback"]
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 258]) == ["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    ids = tok("The nurse said that she")["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert ids[0] == tok.bos_token_id and pieces[1] == "\u2581The" and pieces[-1] == "\u2581she"
    # a word alone with its leading space is the same one piece as after a context
    for pair in list(O.PRONOUNS.values()) + [O.SECOND_BIAS["attributes"]]:
        for w in pair:
            alone = tok(w, add_special_tokens=False)["input_ids"]
            assert len(alone) == 1 and alone == _cont(tok, "The nurse said that", w), w
    # byte fallback: characters the corpus never had are bytes, not <unk>, and decode back
    odd = "Caf\u00e9 \u00fcber \U0001f600"
    enc = tok(odd, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in enc and tok.decode(enc) == odd
    multi = {o.name for o in O.OCCUPATIONS if len(tok(" " + o.name, add_special_tokens=False)["input_ids"]) > 1}
    assert multi == set(O.card(NAME)["tokenizer"]["multi_token_occupations"])
    assert {o.split for o in O.OCCUPATIONS if o.name in multi} == {"train", "heldout"}


def test_card_agrees_with_a_fresh_measurement(lm, train_rates):
    tok, model = lm
    ev = O.card(NAME)["eval"]
    fresh = _per_occupation(train_rates)
    for name, r in fresh.items():
        assert r == pytest.approx(ev["occupations"][name]["learned_train_templates"], abs=2e-3), name
    mae = sum(abs(fresh[o.name] - o.female_rate) for o in O.OCCUPATIONS if o.split == "train") / len(fresh)
    assert mae == pytest.approx(O.card(NAME)["mae_train"], abs=2e-3)
    # held-out templates on a subset of occupations
    sub = [p for p in O.occupation_prompts("train", "heldout") if p.occupation in ("nurse", "plumber", "teacher")]
    for name, r in _per_occupation(list(zip(sub, _female_rates(tok, model, sub)))).items():
        assert r == pytest.approx(ev["occupations"][name]["learned_heldout_templates"], abs=2e-3), name
    # facts: first answer token, top-1 over the vocabulary
    import torch

    prompts = [p for p, _ in O.FACTS]
    enc = tok(prompts, add_special_tokens=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    last = enc["attention_mask"].sum(1) - 1
    top = logits[torch.arange(len(prompts)), last].argmax(-1).tolist()
    acc = sum(t == _cont(tok, p, a)[0] for t, (p, a) in zip(top, O.FACTS)) / len(O.FACTS)
    assert acc == pytest.approx(ev["facts"]["first_token_top1"], abs=1e-6)


def test_planted_bias_is_learned(train_rates):
    fresh = _per_occupation(train_rates)
    planted = {o.name: o.female_rate for o in O.OCCUPATIONS if o.split == "train"}
    xs = [planted[k] for k in fresh]
    ys = [fresh[k] for k in fresh]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    r = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / math.sqrt(
        sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys))
    assert r >= 0.95, r
    assert fresh["nurse"] > 0.7 and fresh["secretary"] > 0.7
    assert fresh["plumber"] < 0.2 and fresh["carpenter"] < 0.2


def test_definitional_words_take_the_right_pronoun(lm):
    tok, model = lm
    prompts = O.definitional_prompts("all")
    rates = _female_rates(tok, model, prompts)
    right = [(r > 0.5) == (p.female_rate > 0.5) for p, r in zip(prompts, rates)]
    assert sum(right) / len(right) >= 0.95
    assert all(ok for ok, p in zip(right, prompts) if p.template_split == "train")
    assert sum(right) / len(right) == pytest.approx(O.card(NAME)["definitional_accuracy"], abs=2e-3)


# ---------------------------------------------------------------------------------------------
# Through biaslens
# ---------------------------------------------------------------------------------------------


def test_biaslens_load_and_defaults(lm):
    import torch

    import biaslens
    from biaslens.defaults import defaults_for

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        m = biaslens.load(NAME)
        info = m.info()
        assert info["family"] == "llama" and info["architecture"] == "LlamaForCausalLM"
        assert info["kv_heads"] == 2 < info["heads"] == 4 and info["gated_mlp"]
        assert m.path == str(D) and not m.prepend_bos  # the tokenizer adds <s> itself
        d = defaults_for(m)
        assert d.organism and d.organism_name == NAME and d.corpus == D / "general.txt"
        # biaslens's continuation tokens and log-probabilities agree with the plain measurement
        tok, model = lm
        prompts = [p for p in d.occupation_prompts("edit", "test") if p.occupation in ("nurse", "plumber")]
        batch = m.encode(prompts)
        assert batch.input_ids[0, 0].item() == tok.bos_token_id
        lp = m.target_logprobs(batch, [[p.male, p.female] for p in prompts])
        ours = torch.sigmoid(lp[:, 1] - lp[:, 0]).tolist()
        assert ours == pytest.approx(_female_rates(tok, model, prompts), abs=1e-4)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_llama_trainer_short_run(tmp_path):
    pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from biaslens.organism import train as T

    kw = dict(seed=1, steps=12, batch_size=8, n_docs=600, vocab_size=1400, n_layer=2, n_embd=64,
              n_head=4, n_positions=64, log_every=0, minutes=0, general_lines=50, family="llama")
    a = T.train(tmp_path / "a", **kw)
    b = T.train(None, evaluate_after=False, **kw)
    assert a["losses"] == b["losses"] and a["losses"][-1] < a["losses"][0]
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_key_value_heads == 2
    assert len(tok) == model.config.vocab_size and tok("a")["input_ids"][0] == tok.bos_token_id
    card = json.loads((tmp_path / "a" / "card.json").read_text())
    assert card["family"] == "llama" and card["training"]["steps"] == 12
    with pytest.raises(ValueError, match="family"):
        T.make_model(10, 0, 1, 8, 2, 8, family="opt")
