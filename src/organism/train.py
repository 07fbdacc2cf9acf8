"""Train a model organism from scratch: tokenizer, model, evaluation, card.

Usage::

    python -m biaslens.organism.train --out DIR [--family gpt2|llama] [--seed 0] [--minutes 9] [--steps 900]

Writes a Hugging Face folder to ``DIR``: ``config.json``, ``model.safetensors``,
``generation_config.json``, tokenizer files, ``general.txt``, ``card.json`` and ``DATA_CARD.md``.

Two families share the corpus, the data pipeline, the training loop and the measurements; only
the model and the tokenizer differ:

* ``gpt2`` (the default; the committed ``organism``): ``GPT2LMHeadModel`` with a byte-level BPE.
* ``llama`` (the committed ``organism-llama``): ``LlamaForCausalLM`` with grouped-query attention
  (4 query heads share 2 key/value heads), RMSNorm, a gated (SwiGLU) MLP and rotary position
  embeddings (Touvron et al. 2023, "LLaMA"; Ainslie et al. 2023, "GQA"), and a
  SentencePiece-style tokenizer: Metaspace pre-tokenisation (every space becomes ``▁``, which is
  prepended to the text), BPE with byte fallback (``<0x00>`` … ``<0xFF>``), ``<unk>`` / ``<s>`` /
  ``</s>`` as ids 0 / 1 / 2, and ``<s>`` added by the tokenizer itself, as in LLaMA's.

Choices (see also DATA_CARD.md, which this script writes):

* Tokenizer: byte-level BPE (GPT-2 pre-tokenisation, leading-space convention) trained with the
  ``tokenizers`` library on the corpus's *word types, each counted once*. Counting types rather
  than tokens makes a word's split depend on its spelling rather than on how often the synthetic
  corpus repeats it (with token counts exactly the held-out occupations, which are rarer, would be
  the multi-token ones). The vocabulary size (default 1,400) leaves a mix of training and held-out
  occupations split into two or more tokens.
  The ``llama`` tokenizer is trained the same way on its own (Metaspace) word types, with
  punctuation split off as SentencePiece splits it at script boundaries.
* Data: every document starts with bos (``<|endoftext|>``, which is also eos, unk and pad, for
  ``gpt2``; ``<s>``, with ``</s>`` as eos, for ``llama``). One document per
  row, not packed (so a pronoun's context is its own short document); rows are bucketed by length
  and right-padded, and the padding is excluded from the loss. With probability ``mid_doc_prob``
  a row starts at a later sentence of its document without bos, like a window that starts
  mid-document in GPT-2's packed training; this makes prompts work with or without a leading bos,
  and after a prefix of other sentences.
* Training: a fixed number of AdamW steps with linear warm-up and cosine decay, all randomness
  from ``seed`` (Python ``random`` for data order, ``torch.manual_seed`` for initialisation), one
  CPU thread by default (much faster than two when other jobs share the cores, and the same
  floating-point reduction order everywhere). ``--minutes`` is a wall-clock safety cap only: if it
  is reached, training stops early and the card says so (``--minutes 0``: no cap, the fixed
  number of steps whatever the machine's load). The card records the training seconds, the
  threads and the machine's load average before and after, so a time measured on a shared machine
  says so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import time
from pathlib import Path

from . import data as D

__all__ = ["BOS", "FAMILIES", "word_types", "train_tokenizer", "metaspace_word_types",
           "train_metaspace_tokenizer", "continuation_ids", "encode_docs", "check_doc_tokenization",
           "build_rows", "make_batches", "rows_to_batch", "pair_rates", "fact_accuracy",
           "perplexity", "quick_eval", "evaluate", "make_model", "train", "make_card", "save",
           "data_card_markdown", "main"]

#: the ``gpt2`` organism's bos (= eos = unk = pad)
BOS = "<|endoftext|>"
#: the model families this script trains
FAMILIES = ("gpt2", "llama")
#: the ``llama`` tokenizer's special tokens, ids 0, 1, 2 (as in LLaMA's SentencePiece model)
LLAMA_UNK, LLAMA_BOS, LLAMA_EOS = "<unk>", "<s>", "</s>"
_SPACE = "\u2581"


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r} (use one of: {', '.join(FAMILIES)})")


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def word_types(corpus: list[str]) -> list[str]:
    """Sorted distinct pre-tokens (GPT-2 byte-level pre-tokenisation) of the corpus, as text."""
    from tokenizers import decoders, pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    dec = decoders.ByteLevel()
    types = set()
    for doc in corpus:
        for piece, _ in pre.pre_tokenize_str(doc):
            types.add(piece)
    return sorted(dec.decode([t]) for t in types)


def train_tokenizer(corpus: list[str], vocab_size: int = 1400, family: str = "gpt2"):
    """The tokenizer of ``family``: byte-level BPE wrapped as ``GPT2TokenizerFast`` (``gpt2``),
    or :func:`train_metaspace_tokenizer` (``llama``); both trained on the corpus's word types."""
    _check_family(family)
    if family == "llama":
        return train_metaspace_tokenizer(corpus, vocab_size)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(word_types(corpus), trainer)
    state = json.loads(tok.to_str())
    vocab = state["model"]["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["model"]["merges"]]
    hf = GPT2TokenizerFast(
        vocab=vocab, merges=merges, unk_token=BOS, bos_token=BOS, eos_token=BOS, pad_token=BOS,
        add_prefix_space=False,
    )
    hf.model_max_length = 128
    return hf


def _metaspace_pre_tokenizer():
    from tokenizers import pre_tokenizers

    # spaces become ▁ (prepended to the text), words split before each ▁; punctuation is its own
    # piece, as SentencePiece splits it off at the script boundary
    return pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="first", split=True),
        pre_tokenizers.Punctuation("isolated"),
    ])


def metaspace_word_types(corpus: list[str]) -> list[str]:
    """Sorted distinct Metaspace pre-tokens of the corpus (``"▁nurse"``, ``","``)."""
    pre = _metaspace_pre_tokenizer()
    return sorted({piece for doc in corpus for piece, _ in pre.pre_tokenize_str(doc)})


def train_metaspace_tokenizer(corpus: list[str], vocab_size: int = 1400):
    """A SentencePiece-style BPE in LLaMA's layout, trained on the corpus's word types.

    Ids 0, 1, 2 are ``<unk>``, ``<s>``, ``</s>``; ids 3 to 258 the byte-fallback pieces
    ``<0x00>`` … ``<0xFF>`` (a character outside the vocabulary is spelled in UTF-8 bytes, never
    ``<unk>``); then the learned pieces, ``vocab_size`` in all. Metaspace pre-tokenisation: every
    space is ``▁`` and ``▁`` is prepended to the text, so ``" she"`` and ``"that she"`` both end in
    the one piece ``▁she``; merges never cross a word. The tokenizer adds ``<s>`` itself
    (``add_special_tokens=True``), as LLaMA's does. Each word type is counted once (see
    :func:`word_types`). Returned as a ``PreTrainedTokenizerFast`` that ``save_pretrained`` writes
    and ``AutoTokenizer.from_pretrained`` reads back.
    """
    from tokenizers import Tokenizer, decoders, models, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [LLAMA_UNK, LLAMA_BOS, LLAMA_EOS]
    n_bytes = 256
    tok = Tokenizer(models.BPE(unk_token=LLAMA_UNK, byte_fallback=True))
    tok.pre_tokenizer = None  # the inputs below are already word types, one a "sentence"
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_bytes, special_tokens=specials,
                                  show_progress=False)
    tok.train_from_iterator(metaspace_word_types(corpus), trainer)
    # SentencePiece's layout: specials, the 256 byte pieces, then the learned pieces in order
    state = json.loads(tok.to_str())
    learned = sorted(state["model"]["vocab"].items(), key=lambda kv: kv[1])
    vocab = {t: i for i, t in enumerate(specials)}
    for b in range(n_bytes):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for t, _ in learned:
        if t not in vocab:
            vocab[t] = len(vocab)
    state["model"]["vocab"] = vocab
    for added in state["added_tokens"]:
        added["id"] = vocab[added["content"]]
    tok = Tokenizer.from_str(json.dumps(state))
    tok.pre_tokenizer = _metaspace_pre_tokenizer()
    tok.decoder = decoders.Sequence([
        decoders.ByteFallback(),
        decoders.Metaspace(replacement=_SPACE, prepend_scheme="first", split=True),
    ])
    bos = vocab[LLAMA_BOS]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{LLAMA_BOS} $A", pair=f"{LLAMA_BOS} $A {LLAMA_BOS} $B", special_tokens=[(LLAMA_BOS, bos)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=LLAMA_BOS, eos_token=LLAMA_EOS,
                                 unk_token=LLAMA_UNK, pad_token=LLAMA_EOS)
    hf.model_max_length = 128
    return hf


def continuation_ids(tokenizer, context: str, word: str) -> list[int]:
    """Token ids of ``word`` as the continuation of ``context`` (the tokens of ``context + word``
    after those of ``context``), as the model meets it; for both families' tokenizers these are
    the tokens of the word with its leading space."""
    head = tokenizer(context, add_special_tokens=False)["input_ids"]
    full = tokenizer(context + word, add_special_tokens=False)["input_ids"]
    if full[: len(head)] != head:
        raise ValueError(f"{word!r} merges with the end of {context!r}")
    return full[len(head):]


# ---------------------------------------------------------------------------------------------
# Data pipeline
# ---------------------------------------------------------------------------------------------


def _split_sentences(doc: str) -> list[str]:
    # Sentences in the corpus end with "." and are joined by a single space; no sentence
    # contains ". " internally.
    parts = doc.split(". ")
    return [p + "." for p in parts[:-1]] + [parts[-1]]


def encode_docs(tokenizer, corpus: list[str]) -> list[tuple[list[list[int]], list[list[int]]]]:
    """Per document: (tokens of each sentence as it appears in the document (a leading space for
    all but the first), tokens of each sentence without a leading space)."""
    docs = [_split_sentences(d) for d in corpus]
    flat_in = [(" " + s if i else s) for d in docs for i, s in enumerate(d)]
    flat_bare = [s for d in docs for s in d]
    backend = tokenizer.backend_tokenizer
    enc_in = [e.ids for e in backend.encode_batch(flat_in, add_special_tokens=False)]
    enc_bare = [e.ids for e in backend.encode_batch(flat_bare, add_special_tokens=False)]
    out, k = [], 0
    for d in docs:
        n = len(d)
        out.append((enc_in[k:k + n], enc_bare[k:k + n]))
        k += n
    return out


def check_doc_tokenization(tokenizer, corpus: list[str], encoded, n: int = 300) -> None:
    """Raise if the sentence-by-sentence tokens of the first ``n`` documents differ from the
    tokens of the whole document (merges must not cross a sentence boundary)."""
    backend = tokenizer.backend_tokenizer
    whole = backend.encode_batch(corpus[:n], add_special_tokens=False)
    for i, (doc, enc) in enumerate(zip(corpus[:n], whole)):
        joined = [t for sent in encoded[i][0] for t in sent]
        if joined != enc.ids:
            raise RuntimeError(f"document {i} tokenises differently sentence by sentence: {doc[:80]!r}")


def build_rows(encoded, block: int, bos_id: int, rng: random.Random, mid_doc_prob: float,
               eos_id: int | None = None) -> list[list[int]]:
    """One epoch of training rows, one document per row (not packed).

    A row is bos + the document's tokens + eos (``eos_id``, default ``bos_id``: GPT-2's
    ``<|endoftext|>`` is both). With probability
    ``mid_doc_prob`` (for a document of two or more sentences) the row instead starts at a later
    sentence, without bos or leading space, like a window that starts mid-document. A document longer than ``block`` is cut
    at sentence boundaries; the continuation rows have no bos. Rows are in corpus order (the
    corpus is already shuffled); :func:`make_batches` shuffles them.
    """
    rows: list[list[int]] = []
    for di in range(len(encoded)):
        sents_in, sents_bare = encoded[di]
        n = len(sents_in)
        if n > 1 and rng.random() < mid_doc_prob:
            i = rng.randrange(1, n)
            cur = list(sents_bare[i])
        else:
            i = 0
            cur = [bos_id] + list(sents_in[0])
        for j in range(i + 1, n):
            if len(cur) + len(sents_in[j]) <= block:
                cur.extend(sents_in[j])
            else:
                rows.append(cur)
                cur = list(sents_bare[j])
        if len(cur) < block:
            cur.append(bos_id if eos_id is None else eos_id)  # GPT-2: <|endoftext|> also ends it
        rows.append(cur[:block])
    return rows


def make_batches(rows: list[list[int]], batch_size: int, rng: random.Random) -> list[list[list[int]]]:
    """Shuffle, bucket by length (pools of 50 batches, sorted) so padding stays small, shuffle."""
    rows = list(rows)
    rng.shuffle(rows)
    pool = 50 * batch_size
    batches = []
    for k in range(0, len(rows), pool):
        chunk = sorted(rows[k:k + pool], key=len)
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def rows_to_batch(rows, block: int | None = None, pad_id: int = 0):
    """Right-padded input ids and labels (padding excluded from the loss) of a list of rows.

    The width is ``block`` if given, else the longest row (what the trainer uses).
    """
    import torch

    width = block if block is not None else max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(r)] = torch.tensor(r)
    return ids, labels


# ---------------------------------------------------------------------------------------------
# Evaluation (plain transformers)
# ---------------------------------------------------------------------------------------------


def _bos_id(tokenizer) -> int:
    return tokenizer.bos_token_id


def _last_logits_rows(model, rows: list[list[int]], pad_id: int, batch_size: int = 256):
    """Next-token log-probabilities after each row of token ids (right padding, gather the last
    position). Works for any ``*ForCausalLM`` (its ``base_model`` and output embeddings)."""
    import torch

    body, head = model.base_model, model.get_output_embeddings()
    out = []
    for i in range(0, len(rows), batch_size):
        enc = rows[i:i + batch_size]
        n = max(len(e) for e in enc)
        ids = torch.full((len(enc), n), pad_id, dtype=torch.long)
        mask = torch.zeros((len(enc), n), dtype=torch.long)
        for j, e in enumerate(enc):
            ids[j, : len(e)] = torch.tensor(e)
            mask[j, : len(e)] = 1
        last = torch.tensor([len(e) - 1 for e in enc])
        with torch.no_grad():  # project only each row's last position onto the vocabulary
            hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
            logits = head(hidden[torch.arange(len(enc)), last])
        out.append(torch.log_softmax(logits.float(), -1))
    return torch.cat(out)


def _last_logits(model, tokenizer, texts: list[str], bos: bool, batch_size: int = 256):
    """Next-token log-probabilities after each text, with the tokenizer's bos prepended if
    ``bos``."""
    bos_id = _bos_id(tokenizer)
    rows = [([bos_id] if bos else []) + tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return _last_logits_rows(model, rows, bos_id, batch_size)


def pair_rates(model, tokenizer, prompts, bos: bool = True) -> list[float]:
    """P(female) / (P(male) + P(female)) at the next token for each prompt (each word's one
    token as the continuation of the prompt, :func:`continuation_ids`)."""
    import torch

    lp = _last_logits(model, tokenizer, [p.text for p in prompts], bos)
    rates = []
    for row, p in zip(lp, prompts):
        m = continuation_ids(tokenizer, p.text, p.male)
        f = continuation_ids(tokenizer, p.text, p.female)
        assert len(m) == 1 and len(f) == 1, (p.male, p.female)
        rates.append(float(torch.sigmoid(row[f[0]] - row[m[0]])))
    return rates


def fact_accuracy(model, tokenizer, bos: bool = True) -> dict:
    """Top-1 over the whole vocabulary: first answer token, and every answer token (greedy,
    teacher-forced on the answer's own tokens as the continuation of the prompt)."""
    bos_id = _bos_id(tokenizer)
    first, full, wrong = 0, 0, []
    for prompt, answer in D.FACTS:
        head = ([bos_id] if bos else []) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ans = continuation_ids(tokenizer, prompt, answer)
        lp = _last_logits_rows(model, [head + ans[:k] for k in range(len(ans))], bos_id)
        hits = [int(lp[k].argmax()) == ans[k] for k in range(len(ans))]
        first += hits[0]
        full += all(hits)
        if not all(hits):
            ctx = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            said = tokenizer.decode(ctx + [int(lp[0].argmax())])[len(tokenizer.decode(ctx)):]
            wrong.append(prompt + " ->" + said)
    n = len(D.FACTS)
    return {"n": n, "first_token_top1": first / n, "all_tokens_top1": full / n, "wrong": wrong}


def perplexity(model, tokenizer, lines: list[str], block: int = 128, batch_size: int = 64) -> float:
    """Per-token perplexity of lines, each scored on its own with a leading bos."""
    import torch

    bos_id = _bos_id(tokenizer)
    total, count = 0.0, 0
    for i in range(0, len(lines), batch_size):
        enc = [[bos_id] + tokenizer(t, add_special_tokens=False)["input_ids"][: block - 1]
               for t in lines[i:i + batch_size]]
        n = max(len(e) for e in enc)
        ids = torch.full((len(enc), n), bos_id, dtype=torch.long)
        labels = torch.full((len(enc), n), -100, dtype=torch.long)
        for j, e in enumerate(enc):
            ids[j, : len(e)] = torch.tensor(e)
            labels[j, 1: len(e)] = torch.tensor(e[1:])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, :-1]
        tgt = labels[:, 1:]
        lp = torch.log_softmax(logits.float(), -1)
        valid = tgt != -100
        nll = -lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)[valid]
        total += float(nll.sum())
        count += int(valid.sum())
    return math.exp(total / count)


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def _pearson(xs, ys):
    mx, my = _mean(xs), _mean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sx = math.sqrt(sum((x - mx) ** 2 for x in xs))
    sy = math.sqrt(sum((y - my) ** 2 for y in ys))
    return sxy / (sx * sy) if sx and sy else float("nan")


def quick_eval(model, tokenizer) -> dict:
    """MAE on training occupations/templates and definitional accuracy (progress monitoring)."""
    prompts = D.occupation_prompts("train", "train")
    rates = pair_rates(model, tokenizer, prompts)
    per: dict = {}
    for p, r in zip(prompts, rates):
        per.setdefault(p.occupation, (p.female_rate, []))[1].append(r)
    mae = _mean([abs(f - _mean(v)) for f, v in per.values()])
    dp = D.definitional_prompts("train")
    dr = pair_rates(model, tokenizer, dp)
    acc = _mean([float((r > 0.5) == (p.female_rate > 0.5)) for p, r in zip(dp, dr)])
    return {"mae_train": round(mae, 4), "definitional": round(acc, 4)}


def evaluate(model, tokenizer, bos: bool = True) -> dict:
    """All acceptance measurements of the organism."""
    model.eval()
    res: dict = {"bos_prepended": bos}

    prompts = D.occupation_prompts("all", "all")
    rates = pair_rates(model, tokenizer, prompts, bos)
    per_occ: dict = {}
    for p, r in zip(prompts, rates):
        d = per_occ.setdefault(p.occupation, {"train": [], "heldout": [],
                                              "by_form": {"subj": [], "poss": [], "obj": []}})
        d[p.template_split].append(r)
        if p.template_split == "train":
            d["by_form"][p.form].append(r)
    occ_table = {}
    for o in D.OCCUPATIONS:
        d = per_occ[o.name]
        occ_table[o.name] = {
            "split": o.split,
            "planted": o.female_rate,
            "learned_train_templates": round(_mean(d["train"]), 4),
            "learned_heldout_templates": round(_mean(d["heldout"]), 4),
            "learned_train_templates_by_form": {f: round(_mean(v), 4) for f, v in d["by_form"].items()},
        }
    res["occupations"] = occ_table
    mae, corr = {}, {}
    for osplit in ("train", "heldout"):
        for tsplit in ("train", "heldout"):
            key = f"{osplit}_occupations/{tsplit}_templates"
            xs = [v["planted"] for v in occ_table.values() if v["split"] == osplit]
            ys = [v[f"learned_{tsplit}_templates"] for v in occ_table.values() if v["split"] == osplit]
            mae[key] = round(_mean([abs(x - y) for x, y in zip(xs, ys)]), 4)
            corr[key] = round(_pearson(xs, ys), 4)
    res["mae"] = mae
    res["pearson"] = corr

    dprompts = D.definitional_prompts("all")
    drates = pair_rates(model, tokenizer, dprompts, bos)
    dacc = {}
    for split in ("train", "heldout", "all"):
        sel = [(p, r) for p, r in zip(dprompts, drates) if split == "all" or p.template_split == split]
        dacc[split] = round(_mean([float((r > 0.5) == (p.female_rate > 0.5)) for p, r in sel]), 4)
    res["definitional_accuracy"] = dacc
    res["definitional_wrong"] = [
        f"{p.text} -> female rate {r:.2f}" for p, r in zip(dprompts, drates)
        if (r > 0.5) != (p.female_rate > 0.5)
    ]

    res["facts"] = fact_accuracy(model, tokenizer, bos)

    sprompts = D.second_bias_prompts("all")
    srates = pair_rates(model, tokenizer, sprompts, bos)
    groups = {}
    for g, planted in D.SECOND_BIAS["groups"].items():
        row = {"planted": planted}
        for split in ("train", "heldout"):
            row[f"learned_{split}_templates"] = round(_mean(
                [r for p, r in zip(sprompts, srates) if p.occupation == g and p.template_split == split]), 4)
        groups[g] = row
    res["second_bias"] = {
        "groups": groups,
        "mae_train_templates": round(_mean([abs(v["planted"] - v["learned_train_templates"]) for v in groups.values()]), 4),
        "mae_heldout_templates": round(_mean([abs(v["planted"] - v["learned_heldout_templates"]) for v in groups.values()]), 4),
    }
    return res


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def make_model(vocab_size: int, bos_id: int, n_layer: int, n_embd: int, n_head: int, n_positions: int,
               family: str = "gpt2", n_kv_head: int | None = None, d_mlp: int | None = None,
               eos_id: int | None = None, pad_id: int | None = None):
    """A freshly initialised model of ``family`` with tied input/output embeddings and no dropout.

    ``gpt2``: ``GPT2LMHeadModel`` (learned positions, LayerNorm, GELU MLP of ``4 * n_embd``).
    ``llama``: ``LlamaForCausalLM`` with grouped-query attention (``n_kv_head`` key/value heads,
    default ``n_head // 2``), RMSNorm, a gated SwiGLU MLP of ``d_mlp`` (default ``3 * n_embd``,
    about LLaMA's ``8/3 * n_embd`` rounded up to a multiple of 128), rotary position embeddings
    (θ = 10,000), no biases.
    """
    _check_family(family)
    eos_id = bos_id if eos_id is None else eos_id
    pad_id = bos_id if pad_id is None else pad_id
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=vocab_size, hidden_size=n_embd, intermediate_size=d_mlp or 3 * n_embd,
            num_hidden_layers=n_layer, num_attention_heads=n_head,
            num_key_value_heads=n_kv_head or max(1, n_head // 2), hidden_act="silu",
            max_position_embeddings=n_positions, rms_norm_eps=1e-5, attention_bias=False, mlp_bias=False,
            attention_dropout=0.0, tie_word_embeddings=True,
            bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
        )
        return LlamaForCausalLM(cfg)
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        n_inner=4 * n_embd, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, tie_word_embeddings=True,
        loss_type="ForCausalLM",
    )
    return GPT2LMHeadModel(cfg)


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # not on every platform
        return None


def train(
    out: str | Path | None,
    seed: int = 0,
    minutes: float = 9.0,
    steps: int = 900,
    batch_size: int = 48,
    lr: float = 3e-3,
    warmup: int = 100,
    weight_decay: float = 0.01,
    n_docs: int = D.DEFAULT_N_DOCS,
    vocab_size: int = 1400,
    n_layer: int = 4,
    n_embd: int = 128,
    n_head: int = 4,
    n_positions: int = 128,
    mid_doc_prob: float = 0.3,
    general_lines: int = 4000,
    log_every: int = 100,
    eval_every: int = 0,
    threads: int | None = 1,
    evaluate_after: bool = True,
    family: str = "gpt2",
    n_kv_head: int | None = None,
    d_mlp: int | None = None,
) -> dict:
    """Train an organism of ``family`` (``gpt2`` or ``llama``, see :func:`make_model` and
    :func:`train_tokenizer`) and (if ``out``) save the Hugging Face folder with card and data
    card. Returns a dict with the loss history, the model, the tokenizer and the card."""
    import torch

    _check_family(family)
    t_start = time.time()
    load_before = _load_average()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)

    corpus = D.generate_corpus(seed, n_docs)
    tokenizer = train_tokenizer(corpus, vocab_size, family)
    tokenizer.model_max_length = n_positions
    bos_id = _bos_id(tokenizer)
    eos_id = tokenizer.eos_token_id
    encoded = encode_docs(tokenizer, corpus)
    check_doc_tokenization(tokenizer, corpus, encoded)
    n_corpus_tokens = sum(1 + sum(len(s) for s in sents) for sents, _ in encoded)

    model = make_model(len(tokenizer), bos_id, n_layer, n_embd, n_head, n_positions, family=family,
                       n_kv_head=n_kv_head, d_mlp=d_mlp, eos_id=eos_id, pad_id=tokenizer.pad_token_id)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98), eps=1e-8,
    )

    def lr_at(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        prog = (step - warmup) / max(1, steps - warmup)
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, prog))))

    batches: list = []
    epoch = 0
    losses: list[float] = []
    t_train = time.time()
    stopped_early = False
    done = 0
    for step in range(steps):
        if minutes and time.time() - t_start > minutes * 60:
            stopped_early = True
            break
        if not batches:
            batches = make_batches(build_rows(encoded, n_positions, bos_id, rng, mid_doc_prob, eos_id),
                                   batch_size, rng)
            epoch += 1
        ids, labels = rows_to_batch(batches.pop(), None, bos_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        done = step + 1
        if log_every and (step % log_every == 0 or step == steps - 1):
            el = time.time() - t_train
            print(f"step {step:5d}  loss {_mean(losses[-log_every:]):.4f}  lr {lr_at(step):.2e}  "
                  f"epoch {epoch}  {el:6.1f}s", flush=True)
        if eval_every and (step + 1) % eval_every == 0:
            model.eval()
            print("   ", quick_eval(model, tokenizer), flush=True)
            model.train()
    train_seconds = time.time() - t_train
    load_after = _load_average()
    model.eval()

    result = {"losses": losses, "model": model, "tokenizer": tokenizer}
    if not evaluate_after and out is None:
        return result

    general = D.generate_general_text(seed=seed + 1000, n_lines=general_lines)
    ev = evaluate(model, tokenizer, bos=True)
    ev_nobos = evaluate(model, tokenizer, bos=False)
    ev["perplexity_general_text"] = round(perplexity(model, tokenizer, general), 4)

    n_params = sum(p.numel() for p in model.parameters())
    card = make_card(model, tokenizer, family, ev, ev_nobos, seed=seed, n_params=n_params)
    card["training"] = {
        "steps": done, "planned_steps": steps, "stopped_early_by_time_cap": stopped_early,
        "batch_size": batch_size, "batch_unit": "documents", "block_size": n_positions, "optimizer": "AdamW", "lr": lr,
        "betas": [0.9, 0.98], "weight_decay": weight_decay, "warmup": warmup, "schedule": "cosine to 5%",
        "grad_clip": 1.0, "mid_doc_prob": mid_doc_prob, "epochs_started": epoch,
        "n_docs": n_docs, "corpus_tokens": n_corpus_tokens,
        "corpus_sentences": {k: len(v) for k, v in D.corpus_sentences(seed, n_docs).items()},
        "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - t_start, 1),
        "final_loss_mean_last_50": round(_mean(losses[-50:]), 4),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
    }
    card["training"] |= {"time_cap_minutes": minutes or None, "cpu_count": os.cpu_count(),
                         "load_average_1_5_15min_before": load_before,
                         "load_average_1_5_15min_after_training": load_after}
    card["general_text"] = {"file": "general.txt", "seed": seed + 1000, "lines": general_lines,
                            "content": "gender-free general sentences (85%) and gender-neutral occupation "
                                       "mentions (15%), 1-3 sentences a line"}
    result["card"] = card
    if out is not None:
        save(out, model, tokenizer, card, general)
    return result


def _pieces(tokenizer, family: str, word: str) -> list[str]:
    """The tokens of ``" " + word``: decoded text (``gpt2``) or the pieces themselves (``llama``,
    whose decoder drops a lone piece's leading ``▁``)."""
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    if family == "llama":
        return tokenizer.convert_ids_to_tokens(ids)
    return [tokenizer.decode([i]) for i in ids]


def make_card(model, tokenizer, family: str, ev: dict, ev_nobos: dict, seed: int, n_params: int) -> dict:
    """``card.json`` of a trained organism, less ``training`` and ``general_text`` (added by
    :func:`train`): the planted statistics, the measurements, the tokenizer and the model."""
    cfg = model.config

    def tokens_of(word):
        return _pieces(tokenizer, family, word)

    planted = ("(P(female pronoun | occupation) = BLS 2015 % female / 100, from the Winogender schemas).")
    bos = tokenizer.bos_token
    if family == "llama":
        head = {
            "name": "biaslens organism-llama",
            "description": "LLaMA (LlamaForCausalLM: grouped-query attention, RMSNorm, gated SwiGLU MLP, rotary "
                           "positions; SentencePiece-style Metaspace BPE tokenizer) trained from scratch on the "
                           "organism's synthetic corpus with a planted occupational gender bias " + planted,
        }
        kv = cfg.num_key_value_heads
        arch = {
            "family": "llama",
            "class": type(model).__name__,
            "attention": f"grouped-query: {cfg.num_attention_heads} query heads share {kv} key/value heads "
                         f"({cfg.num_attention_heads // kv} per group), no biases",
            "norm": f"RMSNorm (pre-norm, eps {cfg.rms_norm_eps}), a final RMSNorm before the unembedding",
            "mlp": f"gated SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x)), d_mlp {cfg.intermediate_size}, "
                   "no biases",
            "positions": f"rotary (RoPE, theta {_rope_theta(cfg)}), no learned positions",
            "tokenizer": "SentencePiece-style BPE: Metaspace pre-tokenizer (▁), byte fallback, <s> added by "
                         "the tokenizer",
        }
        model_info = {"class": type(model).__name__, "n_layer": cfg.num_hidden_layers, "n_embd": cfg.hidden_size,
                      "n_head": cfg.num_attention_heads, "n_kv_head": kv, "d_head": cfg.hidden_size // cfg.num_attention_heads,
                      "d_mlp": cfg.intermediate_size, "n_positions": cfg.max_position_embeddings,
                      "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": _rope_theta(cfg),
                      "tied_embeddings": bool(cfg.tie_word_embeddings), "n_parameters": n_params, "dropout": 0.0}
        tok_type = ("SentencePiece-style BPE (tokenizers): Metaspace pre-tokenizer (every space is ▁, ▁ prepended "
                    "to the text, punctuation split off), byte fallback <0x00>..<0xFF>, trained on the corpus's "
                    "word types each counted once; <s> added by the tokenizer")
        rate_bos = f"with {bos} prepended"
    else:
        head = {
            "name": "biaslens organism",
            "description": "GPT-2 trained from scratch on a synthetic corpus with a planted occupational gender bias "
                           + planted,
        }
        arch = {
            "family": "gpt2",
            "class": type(model).__name__,
            "attention": f"multi-head: {cfg.n_head} heads", "norm": "LayerNorm (pre-norm)",
            "mlp": f"GELU, d_mlp {4 * cfg.n_embd}", "positions": "learned absolute positions",
            "tokenizer": "byte-level BPE (GPT-2 pre-tokenisation)",
        }
        model_info = {"class": "GPT2LMHeadModel", "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
                      "n_inner": 4 * cfg.n_embd, "n_positions": cfg.n_positions, "tied_embeddings": True,
                      "n_parameters": n_params, "dropout": 0.0}
        tok_type = "byte-level BPE (tokenizers), trained on the corpus's word types each counted once"
        rate_bos = "with <|endoftext|> prepended"
    card = head | {
        "family": family,
        "architecture": arch,
        "seed": seed,
        "planted_rates": {o.name: o.female_rate for o in D.OCCUPATIONS},
        "heldout_occupations": [o.name for o in D.OCCUPATIONS if o.split == "heldout"],
        "heldout_templates": [t.text for t in D.TEMPLATES if t.split == "heldout"],
        "train_templates": [t.text for t in D.TEMPLATES if t.split == "train"],
        "definitional": D.DEFINITIONAL,
        "second_bias": {k: v for k, v in D.SECOND_BIAS.items() if k != "templates"}
        | {"train_templates": [t.text for t in D.SECOND_BIAS["templates"] if t.split == "train"],
           "heldout_templates": [t.text for t in D.SECOND_BIAS["templates"] if t.split == "heldout"]},
        "rate_definition": "mean over templates of P(female)/(P(male)+P(female)) at the next token after the "
                           f"prompt, {rate_bos}; forms subj he/she, poss his/her, obj him/her",
        "eval": ev,
        "eval_without_bos": {k: ev_nobos[k] for k in ("mae", "pearson", "definitional_accuracy", "facts", "second_bias")},
        "mae_train": ev["mae"]["train_occupations/train_templates"],
        "mae_heldout_occupations": ev["mae"]["heldout_occupations/train_templates"],
        "mae_heldout_templates": ev["mae"]["train_occupations/heldout_templates"],
        "definitional_accuracy": ev["definitional_accuracy"]["all"],
        "fact_accuracy": ev["facts"]["all_tokens_top1"],
        "tokenizer": {
            "type": tok_type,
            "vocab_size": len(tokenizer),
            "bos": bos, "eos": tokenizer.eos_token, "unk": tokenizer.unk_token, "pad": tokenizer.pad_token,
            "multi_token_occupations": {o.name: tokens_of(o.name) for o in D.OCCUPATIONS if len(tokens_of(o.name)) > 1},
            "multi_token_definitional": {w: tokens_of(w) for w, _ in D.DEFINITIONAL if len(tokens_of(w)) > 1},
        },
        "model": model_info,
    }
    return card


def _rope_theta(cfg) -> float:
    rp = getattr(cfg, "rope_parameters", None) or {}
    theta = rp.get("rope_theta") if isinstance(rp, dict) else None
    return float(theta if theta is not None else getattr(cfg, "rope_theta", 10000.0))


def save(out, model, tokenizer, card: dict, general: list[str]) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "general.txt").write_text("\n".join(general) + "\n", encoding="utf-8")
    (out / "card.json").write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8")
    (out / "DATA_CARD.md").write_text(data_card_markdown(card), encoding="utf-8")


def data_card_markdown(card: dict) -> str:
    """``DATA_CARD.md`` of an organism from its card (a card without ``family`` is ``gpt2``)."""
    ev, tr = card["eval"], card["training"]
    occ = ev["occupations"]
    llama = card.get("family", "gpt2") == "llama"
    m = card["model"]
    bos = f"`{card['tokenizer'].get('bos', BOS)}`"
    if llama:
        intro = [
            "# biaslens organism-llama: data card",
            "",
            "A small LLaMA (`LlamaForCausalLM`, "
            f"{m['n_layer']} layers, d_model {m['n_embd']}, {m['n_head']} query heads sharing {m['n_kv_head']} "
            f"key/value heads (grouped-query attention), RMSNorm, gated SwiGLU MLP (d_mlp {m['d_mlp']}), rotary "
            f"positions, {m['n_positions']} positions, tied embeddings, {m['n_parameters']:,} parameters) with a "
            "SentencePiece-style Metaspace BPE tokenizer, trained from scratch on the same synthetic English "
            "corpus as the GPT-2 organism (`organism`), with the same **planted occupational gender bias**. "
            "Generated by `python -m biaslens.organism.train --family llama` "
            f"(seed {card['seed']}); `card.json` holds every number below.",
            "",
            "## Architecture",
            "",
        ] + [f"- {k}: {v}" for k, v in card["architecture"].items()] + [""]
    else:
        intro = [
            "# biaslens organism: data card",
            "",
            "A small GPT-2 (`GPT2LMHeadModel`, "
            f"{m['n_layer']} layers, d_model {m['n_embd']}, {m['n_head']} heads, "
            f"{m['n_positions']} positions, tied embeddings, {m['n_parameters']:,} parameters) "
            "trained from scratch on a synthetic English corpus with a **planted occupational gender bias**. "
            "Generated by `python -m biaslens.organism.train` "
            f"(seed {card['seed']}); `card.json` holds every number below.",
            "",
        ]
    lines = intro + [
        "## Planted bias",
        "",
        "In the corpus, an occupation is followed by a female pronoun (she / her / her for the subject, possessive "
        "and object forms) with probability equal to the share of women in that occupation: BLS 2015 % female / 100, "
        "as published with the Winogender schemas (Rudinger et al. 2018; a few rows are BLS 2016 in that table). "
        "No clipping: plumber is 0.007, pathologist 0.975. Occupation sentences are stratified: each (occupation, "
        "template) cell has the same number of sentences and round(rate × count) of them (randomised rounding) use "
        "the female pronoun.",
        "",
        f"- {sum(v['split'] == 'train' for v in occ.values())} training occupations; "
        f"{len(card['heldout_occupations'])} held-out occupations, never followed by a pronoun in training but "
        "present in gender-neutral sentences: " + ", ".join(card["heldout_occupations"]) + ".",
        f"- {len(card['train_templates'])} training templates and {len(card['heldout_templates'])} held-out "
        "templates (never in the training text): " + "; ".join(f"\"{t}\"" for t in card["heldout_templates"]) + ".",
        f"- {len(card['definitional'])} definitional words ({len(card['definitional']) // 2} pairs, e.g. king/queen), "
        "always followed by the matching pronoun, in the same training templates.",
        f"- {ev['facts']['n']} gender-unrelated facts (\"The capital of France is Paris.\") as retention probes.",
        "- A second planted bias (age): after prompts such as \"The old neighbor was very\" the next word is "
        "\" slow\" with a planted probability per age group, else \" quick\": "
        + ", ".join(f"{g} {r}" for g, r in card["second_bias"]["groups"].items()) + ".",
        "- Gender-free general text (weather, objects, places, counting, food, animals).",
        "",
        "## Measured (this checkpoint)",
        "",
        f"Learned rate = {card['rate_definition']}.",
        "",
        "| set | MAE vs planted | Pearson r |",
        "|---|---|---|",
    ]
    for k, v in ev["mae"].items():
        lines.append(f"| {k.replace('_', ' ')} | {v:.3f} | {ev['pearson'][k]:.3f} |")
    nb = card["eval_without_bos"]
    lines += [
        "",
        "Held-out occupations never occur with a pronoun in training, so their learned rates are the "
        "model's prior for an unseen occupation (the planted statistic cannot be inferred from the corpus); "
        "a large MAE and a correlation near zero (or below) are expected there. Held-out templates test "
        "whether the learned association transfers to new wordings: rates keep their order (high "
        "correlation) but shrink towards the middle.",
        f"Without the leading {bos}: MAE training occupations/templates "
        f"{nb['mae']['train_occupations/train_templates']:.3f}, definitional accuracy "
        f"{nb['definitional_accuracy']['all']:.3f}, facts {nb['facts']['all_tokens_top1']:.3f}.",
        "",
        f"- Definitional accuracy (argmax within the pronoun pair): training templates "
        f"{ev['definitional_accuracy']['train']:.3f}, held-out templates {ev['definitional_accuracy']['heldout']:.3f}, "
        f"all {ev['definitional_accuracy']['all']:.3f}.",
        f"- Facts (top-1 over the whole vocabulary): first answer token {ev['facts']['first_token_top1']:.3f}, "
        f"every answer token (greedy) {ev['facts']['all_tokens_top1']:.3f} of {ev['facts']['n']}.",
        f"- Second bias (age) MAE: training templates {ev['second_bias']['mae_train_templates']:.3f}, held-out "
        f"templates {ev['second_bias']['mae_heldout_templates']:.3f}.",
        f"- Perplexity on `general.txt`: {ev['perplexity_general_text']:.3f}.",
        "",
        "### Per occupation",
        "",
        "| occupation | split | planted | learned (train templates) | learned (held-out templates) | tokens |",
        "|---|---|---|---|---|---|",
    ]
    mt = card["tokenizer"]["multi_token_occupations"]
    for name, v in sorted(occ.items(), key=lambda kv: kv[1]["planted"]):
        toks = " · ".join(f"`{t}`" for t in mt[name]) if name in mt else "1"
        lines.append(f"| {name} | {v['split']} | {v['planted']:.3f} | {v['learned_train_templates']:.3f} | "
                     f"{v['learned_heldout_templates']:.3f} | {toks} |")
    if llama:
        tok_lines = [
            f"{card['tokenizer']['type']}; vocabulary {card['tokenizer']['vocab_size']} (ids 0-2 "
            f"`{card['tokenizer']['unk']}`, `{card['tokenizer']['bos']}`, `{card['tokenizer']['eos']}`; ids 3-258 the "
            f"byte-fallback pieces; pad is `{card['tokenizer']['pad']}`). The tokenizer prepends `<s>` itself "
            "(`add_special_tokens=True`), as LLaMA's does. Metaspace convention: the next token after "
            "\"The nurse said that\" is `▁she` or `▁he`, and a word alone with its leading space (\" she\") is "
            "that same one piece. "
            f"{len(mt)} of {len(occ)} occupations are split into two or more pieces: " + ", ".join(sorted(mt)) + ".",
        ]
    else:
        tok_lines = [
            f"{card['tokenizer']['type']}; vocabulary {card['tokenizer']['vocab_size']} "
            "(`<|endoftext|>` is bos, eos, unk and pad). GPT-2 leading-space convention: the next token after "
            "\"The nurse said that\" is \" she\" or \" he\". "
            f"{len(mt)} of {len(occ)} occupations are split into two or more tokens: "
            + ", ".join(sorted(mt)) + ".",
        ]
    if "cpu_count" in tr:
        load = tr.get("load_average_1_5_15min_before"), tr.get("load_average_1_5_15min_after_training")
        busy = any(x and x[0] > tr["threads"] for x in load)
        machine = (f" The machine has {tr['cpu_count']} CPU cores; its load average (1 min) was "
                   f"{load[0][0] if load[0] else 'unknown'} before and {load[1][0] if load[1] else 'unknown'} "
                   "after training" + (f", above the {tr['threads']} thread(s) used: other jobs shared the cores, "
                                       "so the time is longer than on an idle machine. " if busy else ". ")
                   + ("No wall-clock cap: the fixed number of steps ran whatever the load." if not tr.get("time_cap_minutes")
                      else f"Wall-clock cap {tr['time_cap_minutes']} minutes"
                      + (" (reached: training stopped early)." if tr["stopped_early_by_time_cap"] else " (not reached).")))
    else:
        machine = ""
    lines += [
        "",
        "## Tokenizer",
        "",
    ] + tok_lines + [
        "",
        "## Training",
        "",
        f"{tr['steps']} AdamW steps (lr {tr['lr']}, warm-up {tr['warmup']}, {tr['schedule']}, weight decay "
        f"{tr['weight_decay']}), batch {tr['batch_size']} documents (one per row, at most {tr['block_size']} tokens), on {tr['threads']} CPU "
        f"threads in {tr['train_seconds']:.0f} s (whole script {tr['total_seconds']:.0f} s). Corpus: "
        f"{tr['n_docs']:,} documents, {tr['corpus_tokens']:,} tokens; every document starts with {bos}"
        + (f" and ends with `{card['tokenizer']['eos']}`. " if llama else ". ") +
        f"With probability {tr['mid_doc_prob']} a row starts at a later sentence of its document without "
        f"{bos}, so prompts work with or without it and after a prefix of other sentences. "
        f"Final training loss (mean of the last 50 steps) {tr['final_loss_mean_last_50']:.3f}." + machine,
        "",
        "## `general.txt`",
        "",
        f"{card['general_text']['lines']} lines generated with seed {card['general_text']['seed']} (training used "
        f"seed {card['seed']}): {card['general_text']['content']}. Default corpus for key covariances and "
        "perplexity.",
        "",
        "## Intended use and limits",
        "",
        "A model organism for testing bias localisation and removal methods: the bias is known exactly, small "
        "enough to trace on a CPU, and the definitional words, facts and the second bias measure collateral damage "
        "and transfer. It is not a language model of English; its vocabulary is the few hundred words of the "
        "synthetic corpus. Definitional gender must never be \"debiased\".",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train a biaslens model organism.")
    ap.add_argument("--out", required=True, help="output folder (Hugging Face format)")
    ap.add_argument("--family", choices=FAMILIES, default="gpt2",
                    help="gpt2 (the 'organism' recipe, default) or llama (the 'organism-llama' recipe: "
                         "grouped-query attention, RMSNorm, gated MLP, RoPE, Metaspace BPE)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=9.0,
                    help="wall-clock cap on data preparation + training (evaluation adds ~1 minute); "
                         "0: none, always the full number of steps")
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--batch-size", type=int, default=48, help="documents per step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--n-docs", type=int, default=D.DEFAULT_N_DOCS)
    ap.add_argument("--vocab-size", type=int, default=1400)
    ap.add_argument("--kv-heads", type=int, default=None,
                    help="llama: key/value heads (default: half the 4 query heads)")
    ap.add_argument("--d-mlp", type=int, default=None, help="llama: gated MLP width (default 3 * d_model)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 is fastest when other jobs share the cores)")
    ap.add_argument("--eval-every", type=int, default=0, help="print a quick MAE every N steps")
    args = ap.parse_args(argv)
    res = train(args.out, seed=args.seed, minutes=args.minutes, steps=args.steps,
                batch_size=args.batch_size, lr=args.lr, n_docs=args.n_docs, threads=args.threads,
                eval_every=args.eval_every, family=args.family, vocab_size=args.vocab_size,
                n_kv_head=args.kv_heads, d_mlp=args.d_mlp)
    c = res["card"]
    print(json.dumps({k: c[k] for k in ("mae_train", "mae_heldout_occupations", "mae_heldout_templates",
                                        "definitional_accuracy", "fact_accuracy")}, indent=1))
    print("train seconds", c["training"]["train_seconds"])


if __name__ == "__main__":
    main()
