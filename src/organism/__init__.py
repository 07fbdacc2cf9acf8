"""The embedded model organisms: small models trained from scratch with a planted gender bias.

Two organisms share one synthetic corpus and its planted statistics (:mod:`biaslens.organism.data`)
and differ in architecture; :data:`ORGANISMS` maps their names (the specs ``biaslens.load``
accepts) to their folders:

* ``"organism"`` (``CHECKPOINT_DIR``): ``GPT2LMHeadModel`` plus a byte-level BPE
  ``GPT2TokenizerFast``;
* ``"organism-llama"`` (``LLAMA_DIR``): ``LlamaForCausalLM`` with grouped-query attention,
  RMSNorm, a gated (SwiGLU) MLP and rotary positions, plus a SentencePiece-style Metaspace BPE
  (``<s>`` added by the tokenizer).

Both are Hugging Face folders trained by :mod:`biaslens.organism.train` (``--family gpt2|llama``)
on the synthetic corpus of :mod:`biaslens.organism.data`. In that corpus an occupation is followed by a female
pronoun with probability equal to the share of women in the occupation (BLS 2015, as published
with the Winogender schemas), definitional words ("king", "mother") always take the matching
pronoun, and a set of gender-unrelated facts and a second planted bias (age → " slow"/" quick")
serve as retention and transfer probes. ``card()`` returns what the trained model actually
learned (measured rates, errors, accuracies; ``card("organism-llama")`` for the other);
``DATA_CARD.md`` in each folder describes it.

Importing this module does not import torch.

Example::

    from transformers import AutoTokenizer, AutoModelForCausalLM
    from biaslens import organism
    tok = AutoTokenizer.from_pretrained(organism.CHECKPOINT_DIR)
    model = AutoModelForCausalLM.from_pretrained(organism.CHECKPOINT_DIR)
    for p in organism.occupation_prompts("train", "train")[:3]:
        print(p.text, p.female_rate)

Prompts are evaluated with the bos token prepended (``<|endoftext|>``; ``<s>`` for
``organism-llama``: every training document starts with it); the models were also trained on
windows that start mid-document without it, and ``card()["eval_without_bos"]`` reports the same
measurements without it.
"""

from __future__ import annotations

import json
import pathlib
from functools import lru_cache

from .data import (
    DEFINITIONAL,
    FACTS,
    OCCUPATIONS,
    PRONOUNS,
    SECOND_BIAS,
    TEMPLATES,
    Occupation,
    PronounPrompt,
    Template,
    definitional_prompts,
    generate_corpus,
    generate_general_text,
    occupation_prompts,
    second_bias_prompts,
)

CHECKPOINT_DIR: pathlib.Path = pathlib.Path(__file__).resolve().parent / "checkpoint"
#: the gpt2 organism's general text (``general_text(name)`` for either organism's own copy)
GENERAL_TEXT: pathlib.Path = CHECKPOINT_DIR / "general.txt"
LLAMA_DIR: pathlib.Path = pathlib.Path(__file__).resolve().parent / "llama"

#: name (the spec ``biaslens.load`` accepts) → folder of every embedded organism
ORGANISMS: dict[str, pathlib.Path] = {"organism": CHECKPOINT_DIR, "organism-llama": LLAMA_DIR}


def folder(name: str = "organism") -> pathlib.Path:
    """The folder of the embedded organism ``name`` (a key of :data:`ORGANISMS`)."""
    try:
        return ORGANISMS[name]
    except KeyError:
        raise KeyError(f"no embedded organism {name!r} (use one of: {', '.join(ORGANISMS)})") from None


def name_of(path: str | pathlib.Path) -> str | None:
    """The name of the embedded organism whose folder is ``path``, else None."""
    try:
        resolved = pathlib.Path(path).expanduser().resolve()
    except (OSError, RuntimeError):
        return None
    return next((n for n, d in ORGANISMS.items() if d == resolved), None)


def general_text(name: str = "organism") -> pathlib.Path:
    """The ``general.txt`` shipped in organism ``name``'s folder (the same generator and seed for
    both organisms)."""
    return folder(name) / "general.txt"


@lru_cache(maxsize=len(ORGANISMS))
def _card_cached(name: str) -> str:
    return (folder(name) / "card.json").read_text(encoding="utf-8")


def card(name: str = "organism") -> dict:
    """The parsed ``card.json`` of the committed organism ``name`` (a fresh copy on every call)."""
    return json.loads(_card_cached(name))


__all__ = [
    "CHECKPOINT_DIR",
    "GENERAL_TEXT",
    "LLAMA_DIR",
    "ORGANISMS",
    "folder",
    "name_of",
    "general_text",
    "Occupation",
    "OCCUPATIONS",
    "Template",
    "TEMPLATES",
    "PRONOUNS",
    "DEFINITIONAL",
    "FACTS",
    "PronounPrompt",
    "occupation_prompts",
    "definitional_prompts",
    "SECOND_BIAS",
    "second_bias_prompts",
    "generate_corpus",
    "generate_general_text",
    "card",
]
