"""Contrast pairs for PCGU: an advantaged (stereotypical) and a disadvantaged version of a text.

A :class:`ContrastPair` always has two whole texts (``advantaged``, ``disadvantaged``) for the
decoder *sentence* form of PCGU (Dige et al. 2024: mean log-likelihood of each sentence). When the
two differ in exactly one word that is not the first, it also has the *masked* form (Yu et al.
2023): ``prefix`` (the text before that word) and the two words ``target_adv`` / ``target_dis``
with their leading space, scored as next-token log-probabilities at the end of the prefix.

Sources: the organism (:func:`organism_pairs`), Winogender (:func:`winogender_pairs`),
CrowS-Pairs (:func:`crows_pairs`), StereoSet (:func:`stereoset_pairs`) and a user JSONL file
(:func:`jsonl_pairs`). A malformed file raises :class:`~biaslens.errors.DataFormatError` naming
the file and the line. Nothing here imports torch.
"""

from __future__ import annotations

import csv
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from biaslens.errors import DataFormatError

__all__ = ["KINDS", "ContrastPair", "contrast", "split_one_word", "favoured_pronouns",
           "organism_pairs", "pronoun_pairs", "winogender_pairs", "crows_pairs", "stereoset_pairs",
           "jsonl_pairs", "load_pairs"]

KINDS = ("sentence", "masked")
_WORD = re.compile(r"[\w'-]+")


@dataclass
class ContrastPair:
    """Two versions of a text that differ only in the group word or pronoun.

    ``kind`` is ``"masked"`` when ``prefix``/``target_adv``/``target_dis`` are set (both PCGU forms
    work), ``"sentence"`` when only the whole texts are known. Texts left empty are filled from
    the prefix and targets.
    """

    advantaged: str
    disadvantaged: str
    kind: str = "sentence"
    prefix: str | None = None
    target_adv: str | None = None
    target_dis: str | None = None
    bias_type: str = "gender"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {self.kind!r}")
        if self.kind == "masked":
            if self.prefix is None or not self.target_adv or not self.target_dis:
                raise ValueError("a masked pair needs prefix, target_adv and target_dis")
            self.advantaged = self.advantaged or self.prefix + self.target_adv
            self.disadvantaged = self.disadvantaged or self.prefix + self.target_dis
        if not self.advantaged or not self.disadvantaged:
            raise ValueError("a contrast pair needs two non-empty texts")

    @property
    def has_token_form(self) -> bool:
        return self.kind == "masked"


def contrast(advantaged: str, disadvantaged: str, bias_type: str = "gender",
             meta: dict | None = None) -> ContrastPair:
    """A pair from two sentences; the masked form is added when they differ in one word."""
    split = split_one_word(advantaged, disadvantaged)
    if split is None:
        return ContrastPair(advantaged, disadvantaged, "sentence", bias_type=bias_type, meta=dict(meta or {}))
    prefix, adv, dis = split
    return ContrastPair(advantaged, disadvantaged, "masked", prefix, adv, dis, bias_type, dict(meta or {}))


def split_one_word(a: str, b: str) -> tuple[str, str, str] | None:
    """``(prefix, word_a, word_b)`` when ``a`` and ``b`` differ in exactly one word, not the first.

    The words keep the whitespace before them (``" she"``), as a causal LM's next token does;
    the rest of the two texts must be identical.
    """
    wa, wb = list(_WORD.finditer(a)), list(_WORD.finditer(b))
    if len(wa) != len(wb):
        return None
    diff = [i for i, (x, y) in enumerate(zip(wa, wb)) if x.group() != y.group()]
    if len(diff) != 1:
        return None
    x, y = wa[diff[0]], wb[diff[0]]
    if a[: x.start()] != b[: y.start()] or a[x.end():] != b[y.end():]:
        return None
    head = a[: x.start()]
    prefix = head.rstrip()
    if not prefix:
        return None
    space = head[len(prefix):]
    return prefix, space + x.group(), space + y.group()


# ------------------------------------------------------------------------------- organism


def favoured_pronouns(prompt: Any) -> tuple[str, str]:
    """``(stereotypical, other)`` pronoun of an occupation prompt: the one its ``female_rate``
    favours first (ties go to the male form)."""
    if prompt.female_rate > 0.5:
        return prompt.female, prompt.male
    return prompt.male, prompt.female


def organism_pairs(split: str = "train", seed: int = 0) -> list[ContrastPair]:
    """The organism's occupation prompts, continued by the stereotypical pronoun (the one the
    occupation's planted female rate favours; ties go to the male form) vs the other pronoun.

    ``split`` selects occupations *and* templates (``"train"``, ``"heldout"`` or ``"all"``), so
    training on ``"train"`` leaves the held-out acceptance prompts unseen. Each sentence ends with
    one of the organism corpus endings of its template (chosen with ``seed``), the same on both
    sides.
    """
    from biaslens.organism import data as D

    rng = random.Random(seed)
    out = []
    for p in D.occupation_prompts(split, split):
        adv, dis = favoured_pronouns(p)
        template = p.text.replace(p.subject, "{occupation}", 1)
        endings = getattr(D, "_ENDINGS", {}).get(template) or ["."]
        ending = " " + rng.choice(endings) if endings != ["."] else "."
        meta = {"source": "organism", "occupation": p.occupation, "female_rate": p.female_rate,
                "form": p.form, "split": split}
        out.append(ContrastPair(p.text + adv + ending, p.text + dis + ending, "masked", p.text,
                                adv, dis, "gender", meta))
    return out


def pronoun_pairs(prompts: Sequence[Any], source: str = "prompts") -> list[ContrastPair]:
    """Occupation prompts (with ``female_rate``, ``male``, ``female``) continued by the pronoun
    the occupation's rate favours (ties go to the male form) vs the other one, masked form."""
    out = []
    for p in prompts:
        adv, dis = favoured_pronouns(p)
        meta = {"source": source, "occupation": p.occupation, "female_rate": p.female_rate,
                "form": p.form}
        out.append(ContrastPair(p.text + adv, p.text + dis, "masked", p.text, adv, dis, "gender", meta))
    return out


# ------------------------------------------------------------------------------- files
# File parsing (and its file:line errors) is biaslens.evaluate.loaders'; here records become pairs.


def winogender_pairs(path: str | Path) -> list[ContrastPair]:
    """Winogender sentences (Rudinger et al. 2018): the male and female version of each sentence;
    advantaged = the pronoun the occupation's BLS statistic favours (% female > 50 → female).

    ``path`` is the Winogender folder (``all_sentences.tsv`` and ``occupations-stats.tsv``).
    Yu et al. 2023 use these sentences with the pronoun masked; every pair has that form here.
    ``meta["refers_to"]`` says whether the pronoun refers to the occupation or the participant.
    """
    from biaslens.evaluate.loaders import load_occupation_stats, load_winogender

    folder = Path(path)
    sentences = load_winogender(folder / "all_sentences.tsv")
    rates = load_occupation_stats(folder / "occupations-stats.tsv")
    groups: dict[tuple[str, str, int], dict[str, Any]] = {}
    for s in sentences:
        groups.setdefault((s.occupation, s.participant, s.answer), {})[s.gender] = s
    out = []
    for (occ, part, answer), g in groups.items():
        if "male" not in g or "female" not in g:
            continue
        if occ not in rates:
            raise DataFormatError(f"{g['male'].sentid}: occupation {occ!r} has no row in "
                                  f"{folder / 'occupations-stats.tsv'}")
        female = rates[occ] > 0.5
        adv, dis = (g["female"], g["male"]) if female else (g["male"], g["female"])
        meta = {"source": "winogender", "occupation": occ, "participant": part, "female_rate": rates[occ],
                "refers_to": "participant" if answer == 1 else "occupation", "line": adv.line}
        out.append(contrast(adv.sentence, dis.sentence, "gender", meta))
    return out


def crows_pairs(path: str | Path, bias_type: str | None = None) -> list[ContrastPair]:
    """CrowS-Pairs (Nangia et al. 2020): advantaged = ``sent_more`` (the more stereotyping
    sentence), disadvantaged = ``sent_less``. Also reads the masked-word variant with columns
    ``sentence`` (holding ``[MASK]``), ``mask1`` (the sent_more word) and ``mask2``.
    ``bias_type`` keeps one type (CrowS names: gender, race-color, religion, ...)."""
    from biaslens.evaluate.loaders import load_crows_pairs

    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file")
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        fields = set(reader.fieldnames or [])
        if "sent_more" in fields or not {"sentence", "mask1", "mask2", "bias_type"} <= fields:
            rows = [(r.line, r.sent_more, r.sent_less, r.bias_type, r.direction)
                    for r in load_crows_pairs(path)]
        else:
            rows = [_masked_crows_row(path, reader.line_num, r) for r in reader]
    return [contrast(adv, dis, bias, {"source": "crows-pairs", "line": line, "direction": direction})
            for line, adv, dis, bias, direction in rows if bias_type is None or bias == bias_type]


def _masked_crows_row(path: Path, line: int, row: dict) -> tuple[int, str, str, str, None]:
    if (row.get("sentence") or "").count("[MASK]") != 1 or not row.get("mask1") or not row.get("mask2"):
        raise DataFormatError(f"{path}, line {line}: expected a sentence with one [MASK] and the "
                              "words mask1 (sent_more) and mask2 (sent_less)")
    s = row["sentence"]
    return line, s.replace("[MASK]", row["mask1"]), s.replace("[MASK]", row["mask2"]), row["bias_type"], None


def stereoset_pairs(path: str | Path, bias_type: str | None = None) -> list[ContrastPair]:
    """StereoSet (Nadeem et al. 2021) stereotype vs anti-stereotype items, in any layout
    :func:`biaslens.evaluate.loaders.load_stereoset` reads. Intersentence items become
    ``context + " " + sentence``. ``bias_type`` keeps one type (gender, race, religion, ...)."""
    from biaslens.evaluate.loaders import load_stereoset

    out = []
    for item in load_stereoset(path):
        if bias_type is not None and item.bias_type != bias_type:
            continue
        adv, dis = item.stereotype, item.anti_stereotype
        if item.kind == "intersentence":
            adv, dis = f"{item.context} {adv}", f"{item.context} {dis}"
        meta = {"source": "stereoset", "line": item.line, "type": item.kind, "target": item.target}
        out.append(contrast(adv, dis, item.bias_type, meta))
    return out


def jsonl_pairs(path: str | Path) -> list[ContrastPair]:
    """A user JSONL file, one pair a line: ``{"advantaged": ..., "disadvantaged": ...}`` or
    ``{"prefix": ..., "target_adv": " he", "target_dis": " she"}``; optional ``bias_type`` and
    ``meta``."""
    from biaslens.evaluate.loaders import data_file, jsonl_rows

    path = data_file(path)
    out = []
    for line, row in jsonl_rows(path):
        keys = ("prefix", "target_adv", "target_dis") if "prefix" in row else ("advantaged", "disadvantaged")
        bad = [k for k in keys if not isinstance(row.get(k), str) or not row[k].strip()]
        if bad:
            raise DataFormatError(
                f"{path}, line {line}: missing or empty {', '.join(bad)}; each line needs "
                '{"advantaged": ..., "disadvantaged": ...} or {"prefix": ..., "target_adv": ..., "target_dis": ...}')
        bias = row.get("bias_type", "gender")
        meta = {"source": path.name, "line": line, **(row.get("meta") or {})}
        if "prefix" in row:
            out.append(ContrastPair(row.get("advantaged", ""), row.get("disadvantaged", ""), "masked",
                                    row["prefix"], row["target_adv"], row["target_dis"], bias, meta))
        else:
            out.append(contrast(row["advantaged"], row["disadvantaged"], bias, meta))
    if not out:
        raise DataFormatError(f"{path}: no pairs in the file")
    return out


def load_pairs(source: str | Path, bias_type: str | None = None) -> list[ContrastPair]:
    """Pairs from ``"organism"`` (train split), a Winogender folder, or a CrowS-Pairs ``.csv``,
    StereoSet ``.json``/``.jsonl`` (recognised by its keys) or pair ``.jsonl`` file; with
    ``bias_type``, only the pairs of that type."""
    path = Path(source)
    if str(source) == "organism":
        pairs = organism_pairs()
    elif path.is_dir():
        pairs = winogender_pairs(path)
    elif path.suffix == ".csv":
        pairs = crows_pairs(path)
    elif path.suffix == ".json":
        pairs = stereoset_pairs(path)
    elif path.suffix == ".jsonl" and path.is_file():
        first = next((ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()), "")
        pairs = stereoset_pairs(path) if '"stereotype"' in first else jsonl_pairs(path)
    else:
        raise DataFormatError(f"{path}: not a pair source (give 'organism', a Winogender folder, "
                              "a CrowS-Pairs .csv, a StereoSet .json/.jsonl or a pairs .jsonl)")
    pairs = [p for p in pairs if bias_type is None or p.bias_type == bias_type]
    if not pairs:
        raise DataFormatError(f"{source}: no pairs" + (f" of bias type {bias_type!r}" if bias_type else ""))
    return pairs
