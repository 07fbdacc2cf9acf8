"""Small real models for tests, notebooks and benchmarks, built offline.

- :func:`gpt2_tokenizer` builds the real GPT-2 byte-level BPE from its two published files
  (``encoder.json`` and ``vocab.bpe``, shipped in :mod:`biaslens.data`), no hub access needed.
- :func:`metaspace_tokenizer` trains a small SentencePiece-style BPE (LLaMA's layout: ``▁``
  for spaces, prepended to the text, byte fallback) on the shipped prompt bank and general text.
- :func:`tiny_model` saves a small random model of a family (``gpt2``, ``neox``, ``opt``,
  ``llama`` with grouped-query attention) with ``save_pretrained``: a stand-in for a user's model.
- :func:`gpt2_small` saves a randomly initialised GPT-2-small-shaped model (12 layers, d_model 768,
  12 heads, vocab 50,257) with that tokenizer: the shape the speed benchmarks name.
- :func:`organism_edit_sample` / :func:`organism_keep_sample`: a few organism templates of
  some occupations / definitional words, the small edit sets the unit tests solve with.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["gpt2_tokenizer", "gpt2_small", "metaspace_tokenizer", "FAMILIES", "tiny_model",
           "organism_edit_sample", "organism_keep_sample"]


def _first_templates(prompts: list, n: int) -> list:
    """The prompts of the first ``n`` templates (sorted by text) among ``prompts``."""
    tpls = sorted({p.text.replace(p.occupation, "{}") for p in prompts})[:n]
    return [p for p in prompts if p.text.replace(p.occupation, "{}") in tpls]


def organism_edit_sample(occupations: list[str], occupation_split: str = "all",
                         n_templates: int = 3) -> list:
    """The organism's training-template prompts of ``occupations`` (of ``occupation_split``),
    on the first ``n_templates`` templates."""
    from biaslens import organism

    ps = [p for p in organism.occupation_prompts(occupation_split, "train") if p.occupation in occupations]
    return _first_templates(ps, n_templates)


def organism_keep_sample(n_words: int = 8, n_templates: int = 2) -> list:
    """Definitional keep prompts: the organism's first ``n_words`` definitional words on the
    first ``n_templates`` training templates."""
    from biaslens import organism

    words = [w for w, _ in organism.DEFINITIONAL[:n_words]]
    ps = [p for p in organism.definitional_prompts("train") if p.occupation in words]
    return _first_templates(ps, n_templates)


def gpt2_tokenizer(bpe_dir: str | Path | None = None):
    """``GPT2TokenizerFast`` from ``bpe_dir/encoder.json`` and ``bpe_dir/vocab.bpe``.

    (With transformers 5.x, ``vocab_file=``/``merges_file=`` silently give an empty tokenizer, so
    the vocabulary and merges are passed as objects.)
    """
    from transformers import GPT2TokenizerFast

    from biaslens.errors import DataFormatError

    if bpe_dir is None:
        from biaslens.data import GPT2_BPE as bpe_dir
    bpe_dir = Path(bpe_dir)
    enc, merges_file = bpe_dir / "encoder.json", bpe_dir / "vocab.bpe"
    for f in (enc, merges_file):
        if not f.exists():
            raise DataFormatError(f"{f} not found: give the folder holding GPT-2's encoder.json and vocab.bpe")
    vocab = json.loads(enc.read_text(encoding="utf-8"))
    lines = merges_file.read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
    tok.add_special_tokens({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                            "unk_token": "<|endoftext|>"})
    return tok


def gpt2_small(folder: str | Path, bpe_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Save a random GPT-2-small-shaped model with the real GPT-2 BPE to ``folder``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = Path(folder)
    tok = gpt2_tokenizer(bpe_dir)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=len(tok),
                                       n_positions=1024))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def metaspace_tokenizer(vocab_size: int = 2000):
    """A SentencePiece-style BPE tokenizer in LLaMA's layout, trained offline.

    Like LLaMA's: the text gets a ``▁`` prepended and every space becomes ``▁``; merges never
    cross a word, so a word alone with its leading space is two pieces (``" he"`` → ``["▁",
    "▁he"]``) while after a context it is one (``"that he"`` → ``["▁that", "▁he"]``); BOS
    ``<s>``, EOS ``</s>``, unknown ``<unk>``. Trained on the shipped prompt bank (every template
    with every occupation, definitional word and pronoun) and general text.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from biaslens import data
    from biaslens.defaults import defaults_for

    d = defaults_for("general")
    prompts = d.occupation_prompts("all", "all") + d.definitional_prompts("all")
    texts = [p.text + w for p in prompts for w in (p.male, p.female)]
    texts += [q + a for q, a in d.facts()]
    texts += data.STATS_TEXT.read_text(encoding="utf-8").splitlines()[:400]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    # learn merges within words, then read text as LLaMA does (no pre-split; ▁ for spaces)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    tok.pre_tokenizer = None
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    from tokenizers.processors import TemplateProcessing

    bos = tok.token_to_id("<s>")
    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="</s>")


FAMILIES = ("gpt2", "neox", "opt", "llama")


def tiny_model(family: str, folder: str | Path, n_layers: int = 2, d_model: int = 32,
               positions: int = 128, seed: int = 0, tokenizer=None) -> Path:
    """Save a small random model of ``family`` with ``save_pretrained`` into ``folder``.

    ``gpt2``, ``neox`` and ``opt`` use the real GPT-2 BPE; ``llama`` uses grouped-query
    attention (4 query heads, 2 key/value heads) and :func:`metaspace_tokenizer`.
    ``positions`` is the context length.
    """
    import torch
    from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM,
                              LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM)

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r} (use one of: {', '.join(FAMILIES)})")
    folder = Path(folder)
    tok = tokenizer or (metaspace_tokenizer() if family == "llama" else gpt2_tokenizer())
    V, d, L = len(tok), d_model, n_layers
    torch.manual_seed(seed)
    if family == "gpt2":
        m = GPT2LMHeadModel(GPT2Config(n_embd=d, n_layer=L, n_head=4, vocab_size=V, n_positions=positions,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    elif family == "neox":
        m = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=d, num_hidden_layers=L, num_attention_heads=4,
                                             intermediate_size=2 * d, vocab_size=V,
                                             max_position_embeddings=positions,
                                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    elif family == "opt":
        m = OPTForCausalLM(OPTConfig(hidden_size=d, num_hidden_layers=L, num_attention_heads=4,
                                     ffn_dim=2 * d, vocab_size=V, max_position_embeddings=positions,
                                     word_embed_proj_dim=d, bos_token_id=tok.bos_token_id,
                                     eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id))
    else:
        m = LlamaForCausalLM(LlamaConfig(hidden_size=d, num_hidden_layers=L, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=2 * d, vocab_size=V,
                                         max_position_embeddings=positions, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    m.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
