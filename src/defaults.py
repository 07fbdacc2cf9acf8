"""The one place that decides a model's defaults: prompts, general text, benchmark data.

:func:`defaults_for` answers for any model. The embedded organism keeps its own data (its
synthetic prompts, general text, facts and stereotyped sentences: :mod:`biaslens.organism`);
every other model gets the data shipped in :mod:`biaslens.data`:

- occupations: the 60 Winogender occupations with their BLS % female (10 held out);
- prompts: the template bank's ``edit`` / ``validation`` / ``test`` templates (subject,
  possessive and object pronoun forms; no shared last word across splits);
- definitional keep prompts: 16 definitional gender pairs in every template;
- general text: WikiText-2 paragraphs, one part for key statistics (``corpus``), the other for
  perplexity (``ppl_text``), so an edit is never scored on the text its statistics came from;
- unlearning: forget pairs (edit occupations × edit templates, continued by the pronoun the
  occupation's BLS rate favours), retain text (general text and definitional sentences),
  validation prompts (edit occupations × validation templates), and general text for the
  perplexity guard;
- evaluation: the shipped benchmark files (``data_dir``) and knowledge probes.

Split names mean the same for both: occupations ``edit | heldout | all``, templates
``edit | validation | test | all``. For the embedded organisms (``organism``, ``organism-llama``,
which share their data) the ``edit`` and ``validation`` templates come from their own template
bank (``organism_bank.json``: templates in the organism corpus's words, no held-out template, no
held-out last word, edit and validation sharing no last word; see ``src/data/README.md``),
``test`` is their 6 held-out templates, and ``all`` their own 36 templates (30 training + 6
held-out: where they learned their pronouns, so the suite's definitional accuracy is scored
there); edit occupations are their training occupations.

Nothing here imports torch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from biaslens.errors import BiasLensError

if TYPE_CHECKING:
    from biaslens.model import BiasModel
    from biaslens.organism.data import PronounPrompt
    from biaslens.unlearn.pairs import ContrastPair

__all__ = ["OCCUPATION_SPLITS", "TEMPLATE_SPLITS", "which_organism", "is_organism", "Defaults",
           "defaults_for", "general_occupations", "definitional_words", "templates", "pronouns",
           "organism_templates", "fill_templates", "balanced_sample"]

OCCUPATION_SPLITS = ("edit", "heldout", "all")
TEMPLATE_SPLITS = ("edit", "validation", "test", "all")
# the organism's own split names (its "edit" / "validation" templates are its bank's)
_ORG_OCC = {"edit": "train", "heldout": "heldout", "all": "all"}
_ORG_TPL = {"test": "heldout", "all": "all"}


def which_organism(model: "BiasModel | str") -> str | None:
    """The name of the embedded organism ``model`` (a :class:`BiasModel` or a spec) is
    (``"organism"``, ``"organism-llama"``: :data:`biaslens.organism.ORGANISMS`), else None."""
    from biaslens import organism as org

    spec = model if isinstance(model, str) else getattr(model, "spec", "")
    path = None if isinstance(model, str) else getattr(model, "path", None)
    if spec in org.ORGANISMS:
        return spec
    candidate = path or spec
    return org.name_of(candidate) if candidate else None


def is_organism(model: "BiasModel | str") -> bool:
    """Whether ``model`` (a :class:`BiasModel` or a spec) is one of the embedded organisms (they
    share their data: :mod:`biaslens.organism`)."""
    return which_organism(model) is not None


def _check(split: str, allowed: tuple[str, ...], what: str) -> None:
    if split not in allowed:
        raise BiasLensError(f"unknown {what} split '{split}' (use one of: {', '.join(allowed)})")


@dataclass(frozen=True)
class Defaults:
    """Default data of one kind of model (``"organism"`` or ``"general"``)."""

    kind: str
    #: which embedded organism (its own folder's general text); None for ``"general"``
    organism_name: str | None = None

    @property
    def organism(self) -> bool:
        return self.kind == "organism"

    # ------------------------------------------------------------------ prompts
    def occupation_prompts(self, occupations: str = "edit", templates: str = "edit") -> list["PronounPrompt"]:
        """Occupation × template prompts, each ending right before the pronoun."""
        _check(occupations, OCCUPATION_SPLITS, "occupation")
        _check(templates, TEMPLATE_SPLITS, "template")
        if self.organism:
            from biaslens import organism

            if templates in _ORG_TPL:
                return organism.occupation_prompts(_ORG_OCC[occupations], _ORG_TPL[templates])
            occs = [(o.name, o.female_rate, o.split) for o in organism.OCCUPATIONS
                    if occupations == "all" or o.split == _ORG_OCC[occupations]]
            return fill_templates(occs, templates, organism_templates(templates))
        return fill_templates(_select(general_occupations(), occupations), templates)

    def definitional_prompts(self, templates: str = "all") -> list["PronounPrompt"]:
        """Definitional gender word × template prompts (``female_rate`` 0 or 1)."""
        _check(templates, TEMPLATE_SPLITS, "template")
        if self.organism:
            from biaslens import organism

            if templates in _ORG_TPL:
                return organism.definitional_prompts(_ORG_TPL[templates])
            words = [(w, 1.0 if g == "female" else 0.0, "definitional") for w, g in organism.DEFINITIONAL]
            return fill_templates(words, templates, organism_templates(templates))
        words = [(w, 1.0 if g == "female" else 0.0, "definitional") for w, g in definitional_words()]
        return fill_templates(words, templates)

    def user_occupation_prompts(self, rows: list[tuple[str, float, str]]) -> list["PronounPrompt"]:
        """The user's ``(occupation, share female, split)`` rows (e.g. ``biaslens edit
        --occupations``) × this model's edit templates: the organism's training templates, else
        the bank's ``edit`` templates."""
        if not self.organism:
            return fill_templates(rows, "edit")
        from biaslens import organism
        from biaslens.organism.data import PronounPrompt

        return [PronounPrompt(t.text.format(occupation=name), name, name, rate, t.form,
                              *organism.PRONOUNS[t.form], t.split, "train")
                for name, rate, _ in rows for t in organism.TEMPLATES if t.split == "train"]

    def edit_sample(self, max_prompts: int, prompts: list[Any] | None = None,
                    seed: int = 0) -> tuple[list[Any], list["PronounPrompt"]]:
        """``(edit prompts, keep prompts)`` of a quick edit: a seeded sample of at most
        ``max_prompts`` of ``prompts`` (default: edit occupations × edit templates) and as many
        definitional keep prompts of the edit templates, every occupation (word) equally often
        (:func:`balanced_sample`)."""
        return (balanced_sample(prompts or self.occupation_prompts("edit", "edit"), max_prompts, seed),
                balanced_sample(self.definitional_prompts("edit"), max_prompts, seed))

    def trace_prompts(self, max_prompts: int | None = 120, seed: int = 0) -> list["PronounPrompt"]:
        """Edit occupations × edit templates; with ``max_prompts`` a seeded sample that keeps
        every occupation equally represented (round robin over occupations, each with its
        templates shuffled). ``None`` returns them all."""
        return balanced_sample(self.occupation_prompts("edit", "edit"), max_prompts, seed)

    def facts(self) -> list[tuple[str, str]]:
        """Knowledge probes ``(prompt, answer with its leading space)``."""
        if self.organism:
            from biaslens import organism

            return list(organism.FACTS)
        from biaslens import data

        return [(p, a) for p, a in data.bank()["knowledge"]]

    # ------------------------------------------------------------------ text
    @property
    def corpus(self) -> Path:
        """General text, one document a line, for the key statistics of the weight edits."""
        if self.organism:
            from biaslens import organism

            return Path(organism.general_text(self.organism_name or "organism"))
        from biaslens import data

        return data.STATS_TEXT

    @property
    def ppl_text(self) -> Path:
        """General text, one document a line, for perplexity in the retention checks."""
        if self.organism:
            return self.corpus  # the organism's suite has always scored its general text
        from biaslens import data

        return data.HELDOUT_TEXT

    def general_lines(self, n: int | None = 100, part: str = "ppl") -> list[str]:
        """Lines of general text: ``part="ppl"`` (the perplexity guard's) or ``"retain"``
        (text kept apart from it, for the retain sets)."""
        if self.organism:
            from biaslens.unlearn.data import organism_general

            return organism_general(n) if part == "ppl" else organism_general(n, offset=1000)
        path = self.ppl_text if part == "ppl" else self.corpus
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        return lines if n is None else lines[:n]

    @property
    def data_dir(self) -> Path | None:
        """The benchmark folder of :func:`biaslens.evaluate.evaluate` (None: the organism's own probes)."""
        if self.organism:
            return None
        from biaslens import data

        return data.ROOT

    # ------------------------------------------------------------------ unlearning
    def unlearn_pairs(self, seed: int = 0) -> list["ContrastPair"]:
        """Stereotyped vs anti-stereotyped continuations of the edit prompts (masked form)."""
        from biaslens.unlearn.pairs import organism_pairs, pronoun_pairs

        if self.organism:
            return organism_pairs(seed=seed)
        return pronoun_pairs(self.occupation_prompts("edit", "edit"), source="biaslens bank")

    def retain_texts(self, n_general: int = 200, seed: int = 0) -> list[str]:
        """General text (apart from the perplexity lines) and definitional sentences."""
        from biaslens.unlearn import data as D

        if self.organism:
            return D.organism_retain(n_general, seed)
        texts = self.general_lines(n_general, part="retain")
        texts += [p.text + (p.female if p.female_rate >= 0.5 else p.male) + "."
                  for p in self.definitional_prompts("edit")]
        random.Random(seed).shuffle(texts)
        return texts

    def validation_prompts(self, n: int | None = 240, seed: int = 0) -> list["PronounPrompt"]:
        """Prompts for choosing a strength or stopping early (never the test templates)."""
        prompts = self.occupation_prompts("edit", "validation")
        if n is not None and n < len(prompts):
            prompts = random.Random(seed).sample(prompts, n)
        return prompts

    def unlearn_data(self, seed: int = 0) -> dict[str, Any]:
        """Everything an unlearning method needs: ``pairs``, ``forget`` (:class:`SpanText`),
        ``retain``, ``val_prompts``, ``ppl_texts`` and ``source``."""
        from biaslens.unlearn.data import from_pairs

        pairs = self.unlearn_pairs(seed)
        source = ("organism" if self.organism
                  else "biaslens bank: edit occupations x edit templates, BLS-favoured pronoun")
        return {"source": source, "pairs": pairs, "forget": from_pairs(pairs),
                "retain": self.retain_texts(seed=seed), "val_prompts": self.validation_prompts(seed=seed),
                "ppl_texts": self.general_lines(100, part="ppl")}


def defaults_for(model: "BiasModel | str") -> Defaults:
    """The defaults of ``model`` (a :class:`BiasModel` or a spec)."""
    name = which_organism(model)
    return Defaults("organism", name) if name else Defaults("general")


# ---------------------------------------------------------------------------- the bank


@lru_cache(maxsize=1)
def _occupations() -> tuple[tuple[str, float, str], ...]:
    from biaslens import data
    from biaslens.evaluate.loaders import load_occupation_stats

    held = set(data.bank()["heldout_occupations"])
    rates = load_occupation_stats(data.OCCUPATION_STATS)
    return tuple((name, rate, "heldout" if name in held else "edit") for name, rate in rates.items())


def general_occupations() -> list[tuple[str, float, str]]:
    """``(occupation, BLS share female in [0, 1], split)`` for the 60 Winogender occupations."""
    return list(_occupations())


def definitional_words() -> list[tuple[str, str]]:
    """``(word, "male" | "female")`` for the bank's definitional pairs."""
    from biaslens import data

    return [(w, g) for pair in data.bank()["definitional"] for w, g in zip(pair, ("male", "female"))]


def templates(split: str = "all") -> list[tuple[str, str, str]]:
    """``(text with {occupation}, form, split)`` of the bank's templates."""
    from biaslens import data

    _check(split, TEMPLATE_SPLITS, "template")
    return [tuple(t) for t in data.bank()["templates"] if split in ("all", t[2])]  # type: ignore[misc]


def pronouns() -> dict[str, tuple[str, str]]:
    """Pronoun form → ``(male, female)`` continuation words."""
    from biaslens import data

    return {k: (m, f) for k, (m, f) in data.bank()["pronouns"].items()}


def organism_templates(split: str = "all") -> list[tuple[str, str, str]]:
    """``(text with {occupation}, form, split)`` of the organisms' template bank
    (``organism_bank.json``; splits ``edit`` / ``validation``, ``all`` = both). The organisms'
    test templates are their held-out templates (:data:`biaslens.organism.TEMPLATES`), not here."""
    if split not in ("edit", "validation", "all"):
        raise BiasLensError(f"the organism bank has edit and validation templates, not '{split}'")
    return [(t, f, s) for t, f, s, _ in _organism_bank()["templates"] if split in ("all", s)]


@lru_cache(maxsize=1)
def _organism_bank() -> dict:
    import json

    from biaslens import data

    return json.loads((data.ROOT / "organism_bank.json").read_text(encoding="utf-8"))


def fill_templates(subjects: list[tuple[str, float, str]], split: str = "edit",
                   rows: list[tuple[str, str, str]] | None = None) -> list["PronounPrompt"]:
    """``(subject, female_rate, subject split)`` × the bank's templates of ``split`` (or the
    given ``(text, form, split)`` template rows)."""
    from biaslens.organism.data import PronounPrompt

    forms = pronouns()
    out = []
    for name, rate, occ_split in subjects:
        for text, form, tsplit in (templates(split) if rows is None else rows):
            male, female = forms[form]
            out.append(PronounPrompt(text=text.format(occupation=name), subject=name, occupation=name,
                                     female_rate=rate, form=form, male=male, female=female,
                                     template_split=tsplit, occupation_split=occ_split))
    return out


def _select(rows: list[tuple[str, float, str]], split: str) -> list[tuple[str, float, str]]:
    return [r for r in rows if split == "all" or r[2] == split]


def balanced_sample(prompts: list[Any], max_prompts: int | None, seed: int = 0) -> list[Any]:
    """At most ``max_prompts`` prompts, every occupation equally often (seeded)."""
    if max_prompts is None or len(prompts) <= max_prompts:
        return list(prompts)
    rng = random.Random(seed)
    by_occ: dict[str, list[Any]] = {}
    for p in prompts:
        by_occ.setdefault(p.occupation, []).append(p)
    for group in by_occ.values():
        rng.shuffle(group)
    out: list[Any] = []
    for i in range(max(len(g) for g in by_occ.values())):
        out += [g[i] for g in by_occ.values() if i < len(g)]
    return out[:max_prompts]
