"""Forget, retain and validation sets for the unlearning methods.

A forget example is a :class:`SpanText`: a text and the character spans of its *harmful* tokens
(the stereotyped pronoun of "The nurse said that she was tired."). Methods that train on whole
sentences (task-vector fine-tuning, δ-offset) read ``text``; masked-span ascent (Lu et al. 2024)
reads ``spans`` too. Sources:

* the organism (:func:`organism_forget`): training occupations × training templates, each
  followed by the pronoun its statistic favours (female if the planted female rate > 0.5) and a
  corpus ending; the span is the pronoun. Held-out occupations and templates are never used, so the
  acceptance measurements on them stay held out. Retain text: general text and definitional
  sentences. (Validation prompts come from :mod:`biaslens.defaults`, see :mod:`biaslens.unlearn.select`.)
* contrast pairs (:func:`from_pairs`, e.g. ``biaslens.unlearn.pairs``): the advantaged sentence;
  the span is where it differs from the disadvantaged one.
* a JSONL file (:func:`read_span_jsonl`): ``{"text": ..., "spans": [[start, end], ...]}`` or
  ``{"text": ..., "span": "substring"}``, or ``{"text": ...}`` with spans found from attribute
  word lists (:func:`find_spans`).

Nothing here imports torch.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from biaslens.errors import DataFormatError

__all__ = ["GENDER_WORDS", "SpanText", "find_spans", "with_word_spans", "organism_forget",
           "organism_general", "organism_definitional_text", "organism_retain",
           "organism_validation", "diff_span", "from_pairs", "read_span_jsonl"]

#: Default attribute words marking the harmful span of a gender-stereotyped sentence.
GENDER_WORDS: tuple[str, ...] = ("he", "she", "him", "her", "his", "hers", "himself", "herself")


@dataclass(frozen=True)
class SpanText:
    """A text and the ``[start, end)`` character spans of its harmful tokens (``()`` = no span:
    whole-sentence methods use the text, span methods skip it)."""

    text: str
    spans: tuple[tuple[int, int], ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def find_spans(text: str, words: Iterable[str] = GENDER_WORDS) -> tuple[tuple[int, int], ...]:
    """Spans of whole-word, case-insensitive occurrences of ``words`` in ``text``."""
    words = [w.strip() for w in words if w.strip()]
    if not words:
        return ()
    pat = r"(?<!\w)(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")(?!\w)"
    return tuple(m.span() for m in re.finditer(pat, text, flags=re.IGNORECASE))


def with_word_spans(texts: Iterable[str | SpanText], words: Iterable[str] = GENDER_WORDS) -> list[SpanText]:
    """Give every text without spans the spans of ``words`` (attribute word lists)."""
    words = tuple(words)
    out = []
    for t in texts:
        t = t if isinstance(t, SpanText) else SpanText(t)
        out.append(t if t.spans else SpanText(t.text, find_spans(t.text, words), t.meta))
    return out


# ------------------------------------------------------------------------------- organism


def organism_forget(split: str = "train", copies: int = 2, seed: int = 0) -> list[SpanText]:
    """Stereotyped organism sentences: each occupation prompt of ``split`` (occupations and
    templates) + the pronoun its planted rate favours + a corpus ending, ``copies`` times with
    different endings; the span is the pronoun. Built from :func:`~biaslens.unlearn.pairs.organism_pairs`."""
    from biaslens.unlearn.pairs import organism_pairs

    out = [t for k in range(copies) for t in from_pairs(organism_pairs(split, seed=seed + k))]
    random.Random(seed).shuffle(out)
    return out


def organism_general(n: int | None = 200, offset: int = 0) -> list[str]:
    """Lines of the organism's gender-free general text (its ``general.txt``, else regenerated)."""
    from biaslens import organism

    path = Path(organism.GENERAL_TEXT)
    if path.exists():
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    else:
        lines = organism.generate_general_text(seed=1000)
    return lines[offset:] if n is None else lines[offset: offset + n]


def organism_definitional_text(templates: str = "train", seed: int = 0) -> list[str]:
    """Definitional sentences with the matching pronoun ("The king said that he ..."): retain text
    for the losses that use one (gradient difference, KL-on-retain)."""
    from biaslens.organism import data as D

    rng = random.Random(seed)
    out = []
    for p in D.definitional_prompts(templates):
        pron = p.female if p.female_rate >= 0.5 else p.male
        template = p.text.replace(p.subject, "{occupation}", 1)
        out.append(p.text + pron + " " + rng.choice(D._ENDINGS.get(template) or ["."]))
    return out


def organism_retain(n_general: int = 200, seed: int = 0) -> list[str]:
    """Retain set: general text (held apart from the perplexity lines) plus definitional text."""
    texts = organism_general(n_general, offset=1000) + organism_definitional_text("train", seed)
    random.Random(seed).shuffle(texts)
    return texts


def organism_validation(n: int | None = 240, seed: int = 0) -> list:
    """Training occupations × training templates (disjoint from the held-out occupations and
    templates used for acceptance). The unlearning methods no longer choose on these: they use
    the model's validation split, ``defaults_for(model).occupation_prompts("edit", "validation")``
    (:mod:`biaslens.unlearn.select`); kept for scripts that name it."""
    from biaslens.organism import occupation_prompts

    prompts = occupation_prompts("train", "train")
    if n is not None and n < len(prompts):
        prompts = random.Random(seed).sample(prompts, n)
    return prompts


# ---------------------------------------------------------------------------- pairs, files


def _pair_sides(pair: Any) -> tuple[str, str]:
    for a, d in (("advantaged", "disadvantaged"), ("sent_more", "sent_less"), ("stereo", "anti")):
        if hasattr(pair, a) and hasattr(pair, d):
            return str(getattr(pair, a)), str(getattr(pair, d))
        if isinstance(pair, dict) and a in pair and d in pair:
            return str(pair[a]), str(pair[d])
    if isinstance(pair, (tuple, list)) and len(pair) >= 2:
        return str(pair[0]), str(pair[1])
    raise DataFormatError(f"cannot read a contrast pair from {type(pair).__name__}: it needs "
                          "advantaged/disadvantaged texts")


def diff_span(a: str, b: str) -> tuple[int, int] | None:
    """Character span of ``a`` that differs from ``b`` (common prefix and suffix removed)."""
    if a == b:
        return None
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    j = 0
    while j < min(len(a), len(b)) - i and a[len(a) - 1 - j] == b[len(b) - 1 - j]:
        j += 1
    # widen to whole words so the span covers whole tokens
    while i > 0 and a[i - 1].isalnum():
        i -= 1
    end = len(a) - j
    while end < len(a) and a[end].isalnum():
        end += 1
    return (i, end) if end > i else None


def from_pairs(pairs: Sequence[Any]) -> list[SpanText]:
    """The advantaged side of each contrast pair; its span is the advantaged target word of the
    masked form (``prefix`` + ``target_adv``), else where the two sides differ."""
    out = []
    for p in pairs:
        adv, dis = _pair_sides(p)
        prefix, target = getattr(p, "prefix", None), getattr(p, "target_adv", None)
        if prefix is not None and target and adv.startswith(prefix + target):
            span = (len(prefix), len(prefix) + len(target))
        else:
            span = diff_span(adv, dis)
        meta = {"disadvantaged": dis, **(getattr(p, "meta", None) or {})}
        out.append(SpanText(adv, (span,) if span else (), meta))
    return out


def read_span_jsonl(path: str | Path, words: Iterable[str] = GENDER_WORDS) -> list[SpanText]:
    """Forget texts from a JSONL file: ``{"text", "spans": [[s, e], ...]}``, ``{"text", "span":
    "substring"}`` or ``{"text"}`` (spans from ``words``); lines with ``advantaged`` and
    ``disadvantaged`` are read as contrast pairs."""
    from biaslens.evaluate.loaders import data_file, jsonl_rows

    path = data_file(path)
    out: list[SpanText] = []
    for i, row in jsonl_rows(path):
        if "text" not in row:
            try:
                out.extend(from_pairs([row]))
            except DataFormatError:
                raise DataFormatError(f"{path}, line {i}: needs \"text\" (with optional \"spans\"/\"span\") or "
                                      "\"advantaged\" and \"disadvantaged\"") from None
            continue
        out.append(_row_spans(row, path, i, words))
    if not out:
        raise DataFormatError(f"{path}: no examples; write one JSON object a line")
    return out


def _row_spans(row: dict, path: Path, i: int, words: Iterable[str]) -> SpanText:
    text = row["text"]
    if not isinstance(text, str) or not text.strip():
        raise DataFormatError(f"{path}, line {i}: \"text\" must be a non-empty string")
    if "spans" in row:
        try:
            spans = tuple((int(s), int(e)) for s, e in row["spans"])
        except (TypeError, ValueError):
            raise DataFormatError(f"{path}, line {i}: \"spans\" must be a list of [start, end] pairs") from None
        if any(not 0 <= s < e <= len(text) for s, e in spans):
            raise DataFormatError(f"{path}, line {i}: a span lies outside the text (length {len(text)})")
        return SpanText(text, spans)
    if "span" in row:
        k = text.rfind(row["span"])
        if k < 0 or not row["span"]:
            raise DataFormatError(f"{path}, line {i}: span {row['span']!r} does not occur in the text")
        return SpanText(text, ((k, k + len(row["span"])),))
    return SpanText(text, find_spans(text, words))
