"""PCGU: unit partitions, selection against a brute-force cosine, update rule, both scoring forms,
and the effect on the organism's held-out occupations (FSDP equality: test_pcgu_fsdp.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import biaslens
from biaslens.arch import arch_for
from biaslens.errors import BiasLensError
from biaslens.unlearn import ContrastPair, organism_pairs, pcgu
from biaslens.unlearn.partitioned import encode_side, pcgu_params, plain_module, side_scores, unit_layout
from biaslens.unlearn.partitioned import resolve_form as pcgu_resolve

#: PCGU as the papers run it: no validation selection, no keep term (the word models below have
#: a vocabulary of organism sentences only, so the defaults' validation prompts do not tokenise)
RAW = {"validation": None, "keep_weight": 0}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run far faster on one thread on a shared machine; restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def word_model(folder: Path, arch: str, seed: int = 0) -> Path:
    """A tiny random model with a word-level vocabulary covering the organism sentences (fast:
    ~200 tokens instead of GPT-2's 50,257)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM,
                              PreTrainedTokenizerFast)

    words = {w for split in ("train", "heldout") for p in organism_pairs(split)
             for t in (p.advantaged, p.disadvantaged) for w in re.findall(r"\w+|[^\w\s]+", t)}
    vocab = {w: i for i, w in enumerate(["<|endoftext|>", *sorted(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = "<|endoftext|>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special, eos_token=special,
                                   unk_token=special, pad_token=special)
    torch.manual_seed(seed)
    if arch == "gpt2":
        m = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=len(vocab),
                                       n_positions=64, bos_token_id=0, eos_token_id=0))
    else:
        m = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=64, vocab_size=len(vocab),
                                             max_position_embeddings=64, bos_token_id=0, eos_token_id=0))
    m.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def word_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pcgu_words")
    return {a: word_model(root / a, a) for a in ("gpt2", "neox")}


@pytest.fixture(scope="module")
def pairs():
    return organism_pairs("train")[:48]


# ----------------------------------------------------------------------------- partitions


def test_rows_mean_output_units_in_every_layout():
    """GPT-2 Conv1D stores [in, out], nn.Linear [out, in]: a "row" is an output unit's input
    weights in both, so the MLP input projection has d_mlp row units either way."""
    d_model, d_mlp = 32, 128
    gpt2 = unit_layout(arch_for("gpt2"), {"transformer.h.0.mlp.c_fc.weight": (d_model, d_mlp),
                                          "transformer.wte.weight": (100, d_model),
                                          "transformer.h.0.ln_1.weight": (d_model,)}, "rows")
    neox = unit_layout(arch_for("gpt_neox"), {"gpt_neox.layers.0.mlp.dense_h_to_4h.weight": (d_mlp, d_model),
                                              "gpt_neox.embed_in.weight": (100, d_model)}, "rows")
    assert gpt2.sizes == (d_mlp, 100, 1) and gpt2.dims == (1, 0, None)
    assert neox.sizes == (d_mlp, 100) and neox.dims == (0, 0)
    cols = unit_layout(arch_for("gpt2"), {"transformer.h.0.mlp.c_fc.weight": (d_model, d_mlp)}, "columns")
    assert cols.sizes == (d_model,) and cols.dims == (0,)
    assert gpt2.offsets == (0, d_mlp, d_mlp + 100) and gpt2.total == d_mlp + 101


@pytest.mark.parametrize("arch,partition", [("gpt2", "rows"), ("gpt2", "columns"),
                                            ("neox", "rows"), ("neox", "columns")])
def test_update_touches_whole_units(word_dirs, pairs, arch, partition):
    """The MLP input weight changes along the stored dimension the partition and layout imply:
    rows of a GPT-2 Conv1D weight are its columns in storage, of an nn.Linear its rows."""
    model = biaslens.load(word_dirs[arch])
    name = model.arch.names("mlp_in", 0)[0]
    delta = pcgu(model, pairs, k=7, lr=0.5, batch_size=16, max_steps=1, params=[name],
                 partition=partition, progress=False, **RAW)
    changed = delta.diff(name) != 0
    unit_dim = model.arch.output_dim(name) if partition == "rows" else 1 - model.arch.output_dim(name)
    other = 1 - unit_dim
    units = changed.any(dim=other)
    assert int(units.sum()) == 7 == delta.info["history"][0]["n_selected"]
    assert bool(changed.index_select(unit_dim, units.nonzero()[:, 0]).all())  # whole units move
    delta.undo(model)


# ----------------------------------------------------------------------------- selection


def _brute_force_selection(folder: Path, pairs: list[ContrastPair], k: int):
    """Per-unit cosines from a plain HF model, one sentence at a time, unit by unit."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.pytorch_utils import Conv1D

    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)

    def score(text):
        ids = torch.tensor([[tok.bos_token_id] + tok(text)["input_ids"]])
        lp = torch.log_softmax(hf(ids).logits[0, :-1], -1)
        return lp[torch.arange(ids.shape[1] - 1), ids[0, 1:]].mean()

    def grads(side):
        hf.zero_grad()
        (sum(score(getattr(p, side)) for p in pairs) / len(pairs)).backward()
        return {n: p.grad.clone() for n, p in hf.named_parameters()}

    ga, gd = grads("advantaged"), grads("disadvantaged")
    modules = dict(hf.named_modules())
    cos = []
    for n, p in hf.named_parameters():
        owner = modules[n.rsplit(".", 1)[0]]
        if p.dim() == 1:
            units = [(slice(None),)]
        elif isinstance(owner, Conv1D):  # [in, out]: output unit j is column j
            units = [(slice(None), j) for j in range(p.shape[1])]
        else:  # Linear [out, in] / Embedding [n_tokens, d]: row i
            units = [(i,) for i in range(p.shape[0])]
        for u in units:
            a, d = ga[n][u].flatten(), gd[n][u].flatten()
            if a.abs().sum() == 0 and d.abs().sum() == 0:
                c = float("inf")
            else:
                c = float(F.cosine_similarity(a, d, dim=0, eps=1e-8))
            cos.append((c, n, u))
    cos.sort(key=lambda x: x[0])
    return cos[:k], ga


def test_selection_is_the_k_lowest_cosine_units(word_dirs, pairs):
    """One full-batch step: the selected units are the brute-force k lowest cosines, each moved by
    exactly −lr·g_a, and nothing else moved."""
    import torch

    k, lr = 40, 0.05
    chosen, ga = _brute_force_selection(word_dirs["gpt2"], pairs, k)
    model = biaslens.load(word_dirs["gpt2"])
    delta = pcgu(model, pairs, k=k, lr=lr, batch_size=len(pairs), max_steps=1, progress=False, form="sentence",
                 params=None, **RAW)
    expect: dict[str, int] = {}
    for _, n, _u in chosen:
        expect[n] = expect.get(n, 0) + 1
    assert delta.info["history"][0]["units"] == expect
    assert chosen[-1][0] < 1.0  # a real contrast, not ties at +1
    for n in delta.names:
        want = torch.zeros_like(delta.diff(n))
        for _, name, u in chosen:
            if name == n:
                want[u] = -lr * ga[n][u]
        assert torch.allclose(delta.diff(n), want, atol=1e-6, rtol=1e-4), n
    assert set(delta.names) == set(expect)


@pytest.mark.parametrize("form", ["sentence", "token"])
def test_gradients_in_parts_equal_one_backward(word_dirs, pairs, form):
    """A side bigger than max_tokens runs in parts of whole rows, each cut to its longest row, and
    gives one backward's gradients and scores; a PCGU step through such parts picks the same units
    and moves them the same way."""
    import torch

    from biaslens.unlearn import partitioned as P

    model = biaslens.load(word_dirs["neox"])
    module = plain_module(model)
    names = pcgu_params(model)
    params = [dict(module.named_parameters())[n] for n in names]
    batch = encode_side(model, pairs[:11], "adv", form)
    assert batch.attention_mask.sum(1).min() < batch.input_ids.shape[1]  # rows of different lengths
    weights = torch.linspace(0.5, 1.5, len(batch))
    with P._Trainable(model, names):
        whole, s_whole = P.side_grads(module, params, batch, weights, max_tokens=None)
        parts, s_parts = P.side_grads(module, params, batch, weights, max_tokens=3 * batch.input_ids.shape[1])
        single, s_single = P.side_grads(module, params, batch, weights, max_tokens=1)  # a row per part
    assert torch.allclose(s_parts, s_whole, atol=1e-5) and torch.allclose(s_single, s_whole, atol=1e-5)
    for n, a, b, c in zip(names, whole, parts, single):
        scale = float(a.abs().max()) + 1e-12
        assert float((a - b).abs().max()) <= 1e-5 * scale, n
        assert float((a - c).abs().max()) <= 1e-5 * scale, n
    with pytest.raises(ValueError, match="max_tokens"):
        P.side_grads(module, params, batch, weights, max_tokens=0)

    kw = dict(k=30, lr=0.05, batch_size=len(pairs), max_steps=1, progress=False, form=form, **RAW)
    one = pcgu(biaslens.load(word_dirs["neox"]), pairs, **kw)
    old = P.Engine.grad_tokens
    P.Engine.grad_tokens = 16
    try:
        split = pcgu(biaslens.load(word_dirs["neox"]), pairs, **kw)
    finally:
        P.Engine.grad_tokens = old
    assert one.info["history"][0]["units"] == split.info["history"][0]["units"]
    assert abs(one.info["history"][0]["loss_gap"] - split.info["history"][0]["loss_gap"]) < 1e-5
    for n in one.names:
        assert torch.allclose(one.diff(n), split.diff(n), atol=1e-7, rtol=1e-4), n


# ----------------------------------------------------------------------------- scoring


def test_token_form_scores_the_target_word(word_dirs, pairs):
    """The token form's score is log P(target | prefix), the model's own target_logprobs."""
    import torch

    model = biaslens.load(word_dirs["gpt2"])
    chunk = pairs[:6]
    with torch.no_grad():
        got = side_scores(plain_module(model), encode_side(model, chunk, "dis", "token"))
        want = model.target_logprobs(model.encode([p.prefix for p in chunk]),
                                     [[p.target_dis] for p in chunk])[:, 0]
    assert torch.allclose(got, want, atol=1e-5)


def test_pcgu_lowers_the_training_gap(word_dirs, pairs):
    """Several steps of both forms lower s(advantaged) − s(disadvantaged) on the training pairs;
    the model is left updated and the delta undoes it exactly."""
    import torch

    model = biaslens.load(word_dirs["gpt2"])
    before_hash = model.weight_hash()
    for form in ("sentence", "token"):
        def gap():
            with torch.no_grad():
                m = plain_module(model)
                return float((side_scores(m, encode_side(model, pairs, "adv", form))
                              - side_scores(m, encode_side(model, pairs, "dis", form))).mean())

        g0 = gap()
        delta = pcgu(model, pairs, k=400, lr=0.5, batch_size=16, epochs=3, form=form, params=None, progress=False,
                     **RAW)
        g1 = gap()
        assert g1 < g0 - 0.02, (form, g0, g1)
        assert len(delta.info["history"]) == 9 and delta.method == "pcgu"
        delta.undo(model)
        assert model.weight_hash() == before_hash


def test_variants_move_the_sides_they_name(word_dirs, pairs):
    """'advantaged' lowers s_a; 'disadvantaged' raises s_d."""
    import torch

    model = biaslens.load(word_dirs["gpt2"])

    def sides():
        with torch.no_grad():
            m = plain_module(model)
            return [float(side_scores(m, encode_side(model, pairs, s, "token")).mean()) for s in ("adv", "dis")]

    a0, d0 = sides()
    delta = pcgu(model, pairs, k=300, lr=0.5, batch_size=16, epochs=1, form="token", variant="advantaged",
                 progress=False, **RAW)
    assert sides()[0] < a0
    delta.undo(model)
    pcgu(model, pairs, k=300, lr=0.5, batch_size=16, epochs=1, form="token", variant="disadvantaged",
         progress=False, **RAW)
    assert sides()[1] > d0


# ----------------------------------------------------------------------------- parameters, errors


def test_effect_map_restricts_to_named_components(word_dirs):
    import numpy as np

    from biaslens.locate import EffectMap

    model = biaslens.load(word_dirs["gpt2"])
    shape = (model.n_layers, 2)
    eff = {"mlp": np.array([[0.0, 0.1], [0.9, 0.2]]), "attn": np.full(shape, -1.0)}
    emap = EffectMap(model="tiny", method="noise", metric="m", n_prompts=4, layers=[0, 1],
                     roles=["subject_last", "last"], effects=eff, ci_low=eff, ci_high=eff)
    assert pcgu_params(model, "mlp") == [n for n in model.params if ".mlp.c_" in n]
    assert len(pcgu_params(model, "blocks")) == len(model.params) - 4  # wte, wpe, ln_f weight/bias
    with pytest.raises(BiasLensError, match="one of blocks"):
        pcgu_params(model, "embeddings")
    names = pcgu_params(model, effect_map=emap, n_sites=1)
    assert names == ["transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.bias",
                     "transformer.h.1.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.bias"]
    delta = pcgu(model, organism_pairs()[:16], k=20, lr=0.1, max_steps=1, effect_map=emap, n_sites=1,
                 progress=False, **RAW)
    assert set(delta.names) <= set(names) and delta.names


def test_bad_arguments_are_refused(word_dirs, pairs):
    model = biaslens.load(word_dirs["gpt2"])
    sentence_only = [ContrastPair("Men are strong.", "Women are strong.")]
    with pytest.raises(BiasLensError, match="form='sentence'"):
        pcgu(model, sentence_only, form="token", progress=False, **RAW)
    assert pcgu_resolve(sentence_only, "auto") == "sentence" and pcgu_resolve(pairs, "auto") == "token"
    with pytest.raises(BiasLensError, match="partition"):
        pcgu(model, pairs, partition="diagonal", progress=False, **RAW)
    with pytest.raises(BiasLensError, match="plain SGD"):
        pcgu(model, pairs, optimizer="adam", progress=False, **RAW)
    with pytest.raises(BiasLensError, match="no parameter"):
        pcgu(model, pairs, params=["transformer.h.9.mlp.c_fc.weight"], progress=False, **RAW)
    with pytest.raises(BiasLensError, match="at least one"):
        pcgu(model, [], progress=False, **RAW)
    with pytest.raises(BiasLensError, match="needs validation"):
        pcgu(model, pairs, ks=[10, 20], lr=0.1, progress=False, **RAW)
    with pytest.raises(BiasLensError, match="non-finite"):
        pcgu(model, pairs, k=10_000, lr=1e30, max_steps=2, form="token", progress=False, **RAW)
    assert not model.check_finite()  # restored


# ----------------------------------------------------------------------------- organism


@pytest.fixture(scope="module")
def organism_model():
    from biaslens.organism import CHECKPOINT_DIR

    if not (Path(CHECKPOINT_DIR) / "config.json").exists():
        pytest.skip("the organism checkpoint is not committed yet")
    return biaslens.load("organism")


@pytest.mark.slow
def test_pcgu_lowers_heldout_contrast_on_organism(organism_model):
    """Trained on training occupations × templates, PCGU with the validation selection lowers the
    stereotype contrast on the held-out templates (sizes: docs/results/unlearn.md) and never
    touches the embeddings (with them PCGU selects the " he"/" she" unembedding rows every step
    and shifts every prompt one way, see the pcgu docstring)."""
    from biaslens.defaults import defaults_for
    from biaslens.evaluate.contrast import stereotype_contrast
    from biaslens.unlearn.select import Validation

    model = organism_model
    d = defaults_for(model)
    test = d.occupation_prompts("edit", "test")
    before = stereotype_contrast(model, test)["mean_abs_contrast"]
    val = Validation(model, prompts=d.occupation_prompts("edit", "validation")[::3],
                     definitional=d.definitional_prompts("validation")[::3], ppl_texts=d.general_lines(60))
    delta = pcgu(model, d.unlearn_pairs(), k=600, lr=3e-3, max_steps=120, eval_every=40, validation=val,
                 progress=False)
    assert not any(n.startswith(("transformer.wte", "transformer.wpe", "transformer.ln_f")) for n in delta.names)
    after = stereotype_contrast(model, test)["mean_abs_contrast"]
    chosen = delta.info["chosen"]
    delta.undo(model)
    assert chosen["ok"] and chosen["step"] > 0
    assert after < 0.95 * before, (before, after)


def test_early_stopping_keeps_the_best_validation_state(word_dirs, pairs):
    """Checked every 2 steps on validation prompts: the kept state is the lowest validation
    contrast among the checks within the bounds; a tight perplexity bound stops the run early."""
    from biaslens.evaluate.contrast import stereotype_contrast
    from biaslens.organism import occupation_prompts
    from biaslens.unlearn.select import Bounds, Validation

    model = biaslens.load(word_dirs["gpt2"])
    val_prompts = occupation_prompts("train", "train")[::7]
    text = ["The nurse said that she was tired ."]
    loose = Validation(model, prompts=val_prompts, definitional=[], ppl_texts=text,
                       bounds=Bounds(ppl_rise=1e6, definitional_drop=1.0, margin_drop=1.0))
    delta = pcgu(model, pairs, k=400, lr=0.1, batch_size=8, epochs=2, form="token", progress=False,
                 validation=loose, eval_every=2, keep_weight=0, variant="advantaged")
    report = delta.info["validation"]
    contrasts = [c["contrast"] for c in report["history"]]
    assert len(contrasts) == 6 and report["stopped"] == "max_steps", report  # every 2 of 12 steps
    base = loose.base.contrast
    want = min([base] + contrasts)
    assert delta.info["chosen"]["contrast"] == want and len(set(contrasts)) == 6
    now = stereotype_contrast(model, val_prompts)["mean_abs_contrast"]
    assert abs(now - want) < 1e-5  # the kept state is the chosen one
    assert delta.info["selection"]["chosen"]["contrast"] == want
    delta.undo(model)
    tight = Validation(model, prompts=val_prompts, definitional=[], ppl_texts=text, bounds=Bounds(ppl_rise=0.01))
    stopped = pcgu(model, pairs, k=400, lr=1.0, batch_size=8, epochs=2, form="token", progress=False,
                   validation=tight, eval_every=2, keep_weight=0, patience=1, variant="advantaged")
    assert stopped.info["validation"]["stopped"].startswith("step") and "perplexity" in stopped.info["stopped"]
    assert len(stopped.info["validation"]["history"]) < 6


def test_variant_grid_is_chosen_on_validation(word_dirs, pairs):
    """``variants`` joins the grid: one run per variant, each checked on validation; the kept
    state is the lowest validation contrast over both runs, recorded with its variant; without
    validation a grid of variants is refused and one variant is the papers' advantaged step."""
    from biaslens.evaluate.contrast import stereotype_contrast
    from biaslens.organism import occupation_prompts
    from biaslens.unlearn.select import Bounds, Validation

    model = biaslens.load(word_dirs["gpt2"])
    val_prompts = occupation_prompts("train", "train")[::7]
    loose = Validation(model, prompts=val_prompts, definitional=[], ppl_texts=["The nurse said that she was tired ."],
                       bounds=Bounds(ppl_rise=1e6, definitional_drop=1.0, margin_drop=1.0))
    delta = pcgu(model, pairs, k=400, lr=0.1, batch_size=8, epochs=1, form="token", progress=False,
                 validation=loose, eval_every=2, keep_weight=0, variants=["advantaged", "both"])
    runs = delta.info["runs"]
    assert [r["variant"] for r in runs] == ["advantaged", "both"]
    seen = [(r["variant"], c["contrast"]) for r in runs for c in r["validation"]["history"]]
    best = min(seen, key=lambda x: x[1])
    assert delta.info["chosen"]["contrast"] == best[1] and delta.info["chosen_run"]["variant"] == best[0]
    assert delta.hparams["variant"] == best[0]
    assert abs(stereotype_contrast(model, val_prompts)["mean_abs_contrast"] - best[1]) < 1e-5
    assert len({c for _, c in seen}) == len(seen)  # the two runs differ
    delta.undo(model)
    with pytest.raises(BiasLensError, match="variant / k / learning-rate grid needs validation"):
        pcgu(model, pairs, k=400, lr=0.1, validation=None, variants=["advantaged", "both"], progress=False)
    one = pcgu(model, pairs, k=400, lr=0.1, batch_size=8, max_steps=1, form="token", validation=None,
               keep_weight=0, progress=False)
    assert one.hparams["variant"] == "advantaged"
    one.undo(model)
