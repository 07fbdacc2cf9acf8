"""Write ``src/data/organism_bank.json``: the organism's edit / validation template bank.

The embedded organisms (``organism``, ``organism-llama``) learned pronouns after an occupation in
30 training templates only; 6 held-out templates are the test. An edit that should generalise to
unseen wordings needs many templates with many distinct last words, so this bank adds ~150
templates written with the organism corpus's own words (:mod:`biaslens.organism.data`), in all
three pronoun forms:

* none is a held-out template, none ends in a held-out template's last word ("that",
  "because", "washed", "checked", "showed", "visited") and none reuses a held-out template's
  opening ("was sad, so we", "looked lost, so I"), so the held-out score measures unseen endings;
* the 21 training templates whose last word is not a held-out last word are in the bank (edit
  split): they are where the organism learned its bias and its definitional pronouns, and the
  9 that end in "that" / "because" stay out (they would make 2 of the 6 held-out endings seen);
* every word occurs in the organism's training corpus (checked here against
  ``generate_corpus(0)``, the corpus the checkpoints were trained on), so no template needs a
  word the tokenizer never saw in training;
* split by last word: all last words are sorted (per pronoun form) by a hash and every fourth is
  a validation word, so edit and validation templates are disjoint and share no last word, and
  both splits hold training templates and new ones: the test has both kinds too (endings the
  organism learned but no edit saw, "that" and "because", and words it never saw).

Deterministic: no randomness, the hash is sha256 of the word.

    python scripts/build_organism_bank.py        # rewrites src/data/organism_bank.json
    python scripts/build_organism_bank.py --check  # exit 1 if the file is not what this writes
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "data" / "organism_bank.json"

# ---------------------------------------------------------------------------------- subject form
_SUBJ_PREDICATES = [
    "was tired", "looked happy", "felt much better", "had a lot of work", "was late again",
    "was hungry", "ate lunch", "read the report", "left the office", "called the office",
    "sat near the window", "waited at the station", "walked to the market", "smiled",
    "was ready", "opened the door",
]
# conjunction -> does a comma come before it
_SUBJ_CONJ = [("when", False), ("and", True), ("so", True), ("before", False), ("after", False),
              ("once", False), ("as", False)]
_SUBJ_EXTRA = [
    "I asked the {occupation} if", "Everyone asked the {occupation} if",
    "The boss asked the {occupation} if", "The {occupation} said",
    "After dinner, the {occupation} said", "It was cold, so the {occupation} said",
    "The {occupation} told everyone", "The {occupation} told the boss",
    "The {occupation} told the customer", "After the {occupation} left,",
    "After the {occupation} ate lunch,", "When the {occupation} called,",
]

# ----------------------------------------------------------------------------------- object form
# (verb, two situations that make it natural); the agent rotates over _OBJ_AGENTS
_OBJ_VERBS = [
    ("called", ["was late", "was waiting"]),
    ("helped", ["was tired", "needed a ride"]),
    ("thanked", ["did good work", "was ready to help"]),
    ("told", ["had a question", "was in the office"]),
    ("saw", ["was at the station", "was in the park"]),
    ("hired", ["did good work", "was ready"]),
    ("liked", ["was new", "was happy"]),
    ("missed", ["left early", "was away"]),
    ("noticed", ["was late", "was tired"]),
    ("asked", ["was in the office", "was at the station"]),
    ("welcomed", ["was new", "arrived early"]),
    ("praised", ["did good work", "finished the report"]),
    ("answered", ["had a question", "called the office"]),
    ("drove", ["needed a ride", "was tired"]),
    ("could not find", ["left early", "was in the park"]),
    ("will help", ["is tired", "needs a ride"]),
    ("will call", ["is late", "has a question"]),
    ("spoke with", ["was in the office", "had a question"]),
    ("sat with", ["was hungry", "was at the station"]),
    ("waited for", ["was late", "was running late"]),
    ("looked for", ["left a cup", "was in the park"]),
    ("waved at", ["was at the station", "was at the market"]),
    ("looked at", ["was new", "was late again"]),
    ("ran to", ["was waiting", "needed help"]),
    ("walked with", ["was at the market", "walked to the station"]),
]
_OBJ_AGENTS = ["we", "I", "the boss", "everyone", "someone", "the customer"]

# ------------------------------------------------------------------------------ possessive form
_POSS_VERBS = [
    "opened", "bought", "read", "put", "ate", "left", "liked", "needed", "wanted", "missed",
    "returned", "started", "walked to", "sat at", "waited in", "ran to", "could not find",
    "drove home in", "put the cup on", "opened the door of", "put the keys in",
    "put the notes under", "put down",
]
_POSS_PREFIXES = ["After lunch, the", "After dinner, the", "When it was late, the", "After work, the"]

HELDOUT_OPENINGS = ("was sad, so we", "looked lost, so I")


def novel_templates() -> list[tuple[str, str]]:
    """``(text, form)`` of the bank's own templates (not the organism's training templates)."""
    out: list[tuple[str, str]] = []
    for j, (conj, comma) in enumerate(_SUBJ_CONJ):  # each conjunction after 4 predicates
        for i in range(4):
            pred = _SUBJ_PREDICATES[(4 * j + i) % len(_SUBJ_PREDICATES)]
            out.append((f"The {{occupation}} {pred}{',' if comma else ''} {conj}", "subj"))
    out += [(t, "subj") for t in _SUBJ_EXTRA]
    for j, (verb, situations) in enumerate(_OBJ_VERBS):  # each verb: 2 situations, 2 agents
        for i, sit in enumerate(situations):
            agent = _OBJ_AGENTS[(j + 3 * i) % len(_OBJ_AGENTS)]
            out.append((f"The {{occupation}} {sit}, so {agent} {verb}", "obj"))
    for j, verb in enumerate(_POSS_VERBS):  # each verb plain and after one opening
        out.append((f"The {{occupation}} {verb}", "poss"))
        prefix = _POSS_PREFIXES[j % len(_POSS_PREFIXES)]
        out.append((f"{prefix} {{occupation}} {verb}", "poss"))
    return out


def last_word(text: str) -> str:
    """The template's last word (a trailing comma counts as the word ",")."""
    return "," if text.endswith(",") else text.split()[-1]


def words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z'-]+", text.replace("{occupation}", ""))


def build() -> dict:
    from biaslens.organism import data as D

    held = [t for t in D.TEMPLATES if t.split == "heldout"]
    held_last = sorted({last_word(t.text) for t in held})
    held_texts = {t.text for t in held}
    train = [(t.text, t.form) for t in D.TEMPLATES
             if t.split == "train" and last_word(t.text) not in held_last]
    excluded_train = [t.text for t in D.TEMPLATES if t.split == "train" and last_word(t.text) in held_last]
    novel = novel_templates()

    vocab = {w for doc in D.generate_corpus(0) for w in re.findall(r"[A-Za-z'-]+", doc)}
    problems = []
    seen: set[str] = set()
    for text, form in train + novel:
        if text.count("{occupation}") != 1:
            problems.append(f"{text!r}: needs one {{occupation}}")
        if text in seen:
            problems.append(f"{text!r}: duplicate")
        seen.add(text)
        if text in held_texts or last_word(text) in held_last:
            problems.append(f"{text!r}: a held-out template or a held-out last word")
        if any(o in text for o in HELDOUT_OPENINGS):
            problems.append(f"{text!r}: reuses a held-out template's opening")
        unknown = [w for w in words(text) if w not in vocab]
        if unknown:
            problems.append(f"{text!r}: {unknown} not in the organism's training corpus")
    if problems:
        raise SystemExit("organism bank: " + "; ".join(problems))

    by_form: dict[str, list[str]] = {}
    for text, form in train + novel:  # a last word belongs to the form it first appears with
        w = last_word(text)
        if all(w not in v for v in by_form.values()):
            by_form.setdefault(form, []).append(w)
    val_words: set[str] = set()
    for form, ws in by_form.items():
        ranked = sorted(ws, key=lambda w: hashlib.sha256(w.encode()).hexdigest())
        val_words |= set(ranked[::4])
    split = lambda t: "validation" if last_word(t) in val_words else "edit"  # noqa: E731
    rows = [[t, f, split(t), "organism-train"] for t, f in train]
    rows += [[t, f, split(t), "bank"] for t, f in novel]
    count = {s: sum(r[2] == s for r in rows) for s in ("edit", "validation")}
    return {
        "about": ("Edit and validation templates for the embedded organisms (organism, "
                  "organism-llama), in the organism corpus's own words; written by "
                  "scripts/build_organism_bank.py. Columns: text, pronoun form, split, source "
                  "('organism-train' = one of the organism's training templates, 'bank' = new). "
                  "The organisms' held-out templates are the test split and are not here."),
        "heldout_last_words": held_last,
        "excluded_training_templates": excluded_train,
        "validation_last_words": sorted(val_words),
        "counts": {**count, "last_words": {
            s: len({last_word(r[0]) for r in rows if r[2] == s}) for s in ("edit", "validation")},
            "forms": {s: {f: sum(r[2] == s and r[1] == f for r in rows) for f in ("subj", "poss", "obj")}
                      for s in ("edit", "validation")}},
        "templates": rows,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only compare with the written file")
    args = ap.parse_args(argv)
    text = json.dumps(build(), indent=1) + "\n"
    if args.check:
        same = OUT.exists() and OUT.read_text(encoding="utf-8") == text
        print("up to date" if same else f"{OUT.name} differs from what the builder writes")
        return 0 if same else 1
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
