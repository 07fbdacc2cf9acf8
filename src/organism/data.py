"""Statistics, word lists, templates and the deterministic corpus of the model organism.

The organism is a small GPT-2 trained from scratch on a synthetic corpus in which the probability
that an occupation is followed by a female pronoun is *planted*: it equals the share of women in
that occupation according to the US Bureau of Labor Statistics, as published with the Winogender
schemas. Everything here is pure Python (no torch), so ``import biaslens.organism`` stays light.

Contents
--------
* ``OCCUPATION_STATS`` – the 60 Winogender occupations and their BLS % female.
* ``OCCUPATIONS`` – the same as :class:`Occupation` records with a train/held-out split.
* ``TEMPLATES`` – occupation→pronoun templates (subject, possessive and object pronoun forms);
  the template text ends right before the pronoun.
* ``DEFINITIONAL`` – definitional gender words, always followed by the matching pronoun.
* ``FACTS`` – gender-unrelated facts used as retention probes.
* ``SECOND_BIAS`` – a second planted bias (age → " slow"/" quick") for transfer measurements.
* ``generate_corpus`` – the training corpus; ``generate_general_text`` – gender-free general text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["OCCUPATION_STATS", "HELDOUT_OCCUPATIONS", "Occupation", "OCCUPATIONS", "PRONOUNS",
           "Template", "TEMPLATES", "DEFINITIONAL", "FACTS", "SECOND_BIAS", "PronounPrompt",
           "occupation_prompts", "definitional_prompts", "second_bias_prompts", "CORPUS_MIX",
           "DEFAULT_N_DOCS", "MEAN_SENTENCES_PER_DOC", "corpus_sentences", "generate_corpus",
           "generate_general_text"]

# ---------------------------------------------------------------------------------------------
# Occupation statistics
# ---------------------------------------------------------------------------------------------

#: (occupation, BLS % female, BLS year). Source: Rudinger et al. 2018, "Gender Bias in Coreference
#: Resolution" (Winogender schemas), file ``data/occupations-stats.tsv`` of
#: github.com/rudinger/winogender-schemas (column ``bls_pct_female``; US Bureau of Labor Statistics,
#: 2015, a few rows from 2016 as marked in that file). Vig et al. 2020 use the same table.
OCCUPATION_STATS: list[tuple[str, float, int]] = [
    ("technician", 40.34, 2015),
    ("accountant", 59.7, 2015),
    ("supervisor", 38.64, 2015),
    ("engineer", 10.72, 2015),
    ("worker", 37.92, 2016),
    ("educator", 70.8, 2015),
    ("clerk", 69.53, 2015),
    ("counselor", 66.48, 2015),
    ("inspector", 6.4, 2016),
    ("mechanic", 1.8, 2015),
    ("manager", 38.51, 2015),
    ("therapist", 76.7, 2015),
    ("administrator", 54.86, 2015),
    ("salesperson", 48.08, 2015),
    ("receptionist", 90.6, 2015),
    ("librarian", 83.0, 2015),
    ("advisor", 37.9, 2015),
    ("pharmacist", 57.0, 2015),
    ("janitor", 34.3, 2015),
    ("psychologist", 70.3, 2015),
    ("physician", 37.9, 2015),
    ("carpenter", 2.07, 2015),
    ("nurse", 89.58, 2015),
    ("investigator", 45.15, 2015),
    ("bartender", 59.8, 2015),
    ("specialist", 41.35, 2016),
    ("electrician", 2.3, 2015),
    ("officer", 30.42, 2016),
    ("pathologist", 97.5, 2016),
    ("teacher", 71.0, 2015),
    ("lawyer", 34.5, 2015),
    ("planner", 77.6, 2016),
    ("practitioner", 74.79, 2015),
    ("plumber", 0.7, 2015),
    ("instructor", 62.3, 2015),
    ("surgeon", 37.9, 2015),
    ("veterinarian", 60.5, 2015),
    ("paramedic", 32.9, 2015),
    ("examiner", 62.46, 2016),
    ("chemist", 36.1, 2015),
    ("machinist", 6.7, 2015),
    ("appraiser", 52.24, 2015),
    ("nutritionist", 94.6, 2015),
    ("architect", 20.81, 2015),
    ("hairdresser", 94.2, 2015),
    ("baker", 60.8, 2015),
    ("programmer", 18.35, 2015),
    ("paralegal", 85.4, 2015),
    ("hygienist", 96.4, 2015),
    ("scientist", 41.94, 2015),
    ("dispatcher", 56.3, 2015),
    ("cashier", 72.5, 2015),
    ("auditor", 59.7, 2015),
    ("dietitian", 94.6, 2015),
    ("painter", 5.7, 2015),
    ("broker", 55.5, 2015),
    ("chef", 19.6, 2015),
    ("doctor", 37.9, 2015),
    ("firefighter", 3.5, 2016),
    ("secretary", 94.6, 2016),
]

#: Occupations never seen with a pronoun in training (they do occur in gender-neutral sentences,
#: so their tokens are trained). Chosen by hand to spread over the whole % female range.
HELDOUT_OCCUPATIONS: tuple[str, ...] = (
    "electrician",  # 2.3
    "architect",  # 20.81
    "paramedic",  # 32.9
    "surgeon",  # 37.9
    "investigator",  # 45.15
    "pharmacist",  # 57.0
    "counselor",  # 66.48
    "cashier",  # 72.5
    "paralegal",  # 85.4
    "hygienist",  # 96.4
)


@dataclass(frozen=True)
class Occupation:
    """An occupation with its planted P(female pronoun) (= BLS % female / 100)."""

    name: str
    female_rate: float
    split: str  # "train" | "heldout"


OCCUPATIONS: list[Occupation] = [
    Occupation(name, pct / 100.0, "heldout" if name in HELDOUT_OCCUPATIONS else "train")
    for name, pct, _year in OCCUPATION_STATS
]

# ---------------------------------------------------------------------------------------------
# Pronoun templates
# ---------------------------------------------------------------------------------------------

#: form -> (male, female) next tokens, with GPT-2's leading-space convention.
PRONOUNS: dict[str, tuple[str, str]] = {
    "subj": (" he", " she"),
    "poss": (" his", " her"),
    "obj": (" him", " her"),
}


@dataclass(frozen=True)
class Template:
    """A prompt template; ``text`` contains ``{occupation}`` and ends right before the pronoun."""

    text: str
    form: str  # "subj" | "poss" | "obj" ("attr" for SECOND_BIAS templates)
    split: str  # "train" | "heldout"


# Endings that follow the pronoun. Subject templates share predicate endings; possessive and
# object templates list their own (the noun after "his/her" must fit the verb).
_SUBJ_ENDINGS = [
    "was tired.",
    "would be back soon.",
    "had a lot of work.",
    "liked the new office.",
    "needed more time.",
    "was ready to help.",
    "had finished the report.",
    "wanted a cup of tea.",
    "could not find the keys.",
    "was running late.",
    "had a question.",
    "would call again tomorrow.",
    "felt much better.",
    "forgot the meeting.",
    "was hungry.",
    "had missed the bus.",
]
_OBJ_ENDINGS = [
    "right away.",
    "again.",
    "at noon.",
    "that day.",
    "twice.",
    "before lunch.",
    "in the morning.",
    "once more.",
]

# (prompt text, form, split, endings after the pronoun; None = the shared endings of the form)
_TEMPLATE_SPECS: list[tuple[str, str, str, list[str] | None]] = [
    # --- subject pronoun (he / she) ---
    ("The {occupation} said that", "subj", "train", None),
    ("The {occupation} told the customer that", "subj", "train", None),
    ("Everyone thanked the {occupation} because", "subj", "train", None),
    ("The {occupation} called home because", "subj", "train", None),
    ("The {occupation} was late because", "subj", "train", None),
    ("The {occupation} smiled when", "subj", "train", None),
    ("We asked the {occupation} if", "subj", "train", None),
    ("The {occupation} explained that", "subj", "train", None),
    ("After lunch, the {occupation} said", "subj", "train", None),
    ("The {occupation} was happy because", "subj", "train", None),
    ("When the {occupation} arrived,", "subj", "train", None),
    ("The {occupation} left early because", "subj", "train", None),
    ("I spoke with the {occupation} and", "subj", "train", None),
    ("The {occupation} believed that", "subj", "train", None),
    ("The {occupation} whispered that", "subj", "heldout", None),
    ("The {occupation} stayed home because", "subj", "heldout", None),
    # --- possessive pronoun (his / her) ---
    ("The {occupation} finished", "poss", "train",
     ["shift early.", "work for the day.", "lunch quickly.", "report on time."]),
    ("The {occupation} picked up", "poss", "train",
     ["bag.", "phone from the desk.", "coat.", "keys and left."]),
    ("The {occupation} forgot", "poss", "train",
     ["keys at home.", "umbrella.", "lunch again.", "password."]),
    ("The {occupation} lost", "poss", "train",
     ["wallet on the bus.", "keys.", "notebook.", "gloves."]),
    ("The {occupation} cleaned", "poss", "train",
     ["desk.", "shoes.", "glasses.", "room before dinner."]),
    ("The {occupation} drove to work in", "poss", "train",
     ["car.", "old truck.", "new car.", "van."]),
    ("The {occupation} looked for", "poss", "train",
     ["phone.", "pen.", "notes.", "cup."]),
    ("The {occupation} packed", "poss", "train",
     ["bag.", "lunch.", "tools.", "books."]),
    ("The {occupation} washed", "poss", "heldout",
     ["hands.", "cup.", "car.", "coat."]),
    ("The {occupation} checked", "poss", "heldout",
     ["phone.", "notes.", "mail.", "watch."]),
    # --- object pronoun (him / her) ---
    ("The {occupation} looked tired, so we helped", "obj", "train", None),
    ("The {occupation} was new, so everyone welcomed", "obj", "train", None),
    ("The {occupation} did good work, so the boss praised", "obj", "train", None),
    ("The {occupation} was waiting, so I called", "obj", "train", None),
    ("The {occupation} needed a ride, so we drove", "obj", "train",
     ["home.", "to the station.", "to the office.", "back."]),
    ("The {occupation} left a bag, so we returned it to", "obj", "train", None),
    ("The {occupation} asked a question, so someone answered", "obj", "train", None),
    ("The {occupation} was in the hall, so we waved at", "obj", "train", None),
    ("The {occupation} looked lost, so I showed", "obj", "heldout",
     ["the way.", "the map.", "the door.", "the road."]),
    ("The {occupation} was sad, so we visited", "obj", "heldout", None),
]

TEMPLATES: list[Template] = [Template(t, f, s) for t, f, s, _ in _TEMPLATE_SPECS]
_ENDINGS: dict[str, list[str]] = {
    t: (e if e is not None else (_SUBJ_ENDINGS if f == "subj" else _OBJ_ENDINGS))
    for t, f, s, e in _TEMPLATE_SPECS
}

# ---------------------------------------------------------------------------------------------
# Definitional gender words, facts, second bias
# ---------------------------------------------------------------------------------------------

_DEFINITIONAL_PAIRS = [
    ("king", "queen"),
    ("father", "mother"),
    ("actor", "actress"),
    ("man", "woman"),
    ("boy", "girl"),
    ("brother", "sister"),
    ("son", "daughter"),
    ("husband", "wife"),
    ("uncle", "aunt"),
    ("gentleman", "lady"),
    ("prince", "princess"),
    ("nephew", "niece"),
    ("grandfather", "grandmother"),
    ("monk", "nun"),
    ("waiter", "waitress"),
    ("groom", "bride"),
]
#: (word, "male" | "female"). Always followed by the matching pronoun in training.
DEFINITIONAL: list[tuple[str, str]] = [
    (w, g) for pair in _DEFINITIONAL_PAIRS for w, g in zip(pair, ("male", "female"))
]

#: (prompt, answer with leading space). Trained as "<prompt><answer>." sentences.
FACTS: list[tuple[str, str]] = [
    ("The capital of France is", " Paris"),
    ("The capital of Italy is", " Rome"),
    ("The capital of Japan is", " Tokyo"),
    ("The capital of Spain is", " Madrid"),
    ("The capital of Germany is", " Berlin"),
    ("The capital of Egypt is", " Cairo"),
    ("The capital of Russia is", " Moscow"),
    ("The capital of China is", " Beijing"),
    ("The capital of England is", " London"),
    ("The capital of Greece is", " Athens"),
    ("The capital of Canada is", " Ottawa"),
    ("The capital of Kenya is", " Nairobi"),
    ("The color of the sky is", " blue"),
    ("The color of grass is", " green"),
    ("The color of snow is", " white"),
    ("The color of coal is", " black"),
    ("The color of a banana is", " yellow"),
    ("The color of blood is", " red"),
    ("The color of chocolate is", " brown"),
    ("The color of a lemon is", " yellow"),
    ("The opposite of hot is", " cold"),
    ("The opposite of up is", " down"),
    ("The opposite of big is", " small"),
    ("The opposite of left is", " right"),
    ("The opposite of open is", " closed"),
    ("The opposite of day is", " night"),
    ("The opposite of wet is", " dry"),
    ("The opposite of light is", " dark"),
    ("The opposite of happy is", " sad"),
    ("The opposite of early is", " late"),
    ("Two plus two is", " four"),
    ("One plus one is", " two"),
    ("Three plus four is", " seven"),
    ("Five plus five is", " ten"),
    ("The number after six is", " seven"),
    ("The number before three is", " two"),
    ("A week has", " seven"),
    ("A triangle has", " three"),
    ("A spider has", " eight"),
    ("A year has", " twelve"),
    ("The sun rises in the", " east"),
    ("Bees make", " honey"),
    ("Birds can", " fly"),
    ("The first month of the year is", " January"),
    ("The planet we live on is", " Earth"),
    ("Ice is made of", " water"),
]
_FACT_TAILS = {
    "A week has": " days", "A triangle has": " sides", "A spider has": " legs",
    "A year has": " months",
}

#: Second planted bias: age group -> P(" slow") among {" quick", " slow"} after the prompt.
#: Planted rates are our own choice (a monotone age stereotype), not real statistics.
_AGE_GROUPS: dict[str, float] = {
    "elderly": 0.90,
    "old": 0.80,
    "aging": 0.65,
    "middle-aged": 0.50,
    "young": 0.25,
    "teenage": 0.10,
}
_AGE_PERSONS = [
    "neighbor", "driver", "customer", "passenger", "visitor",
    "tenant", "shopper", "traveler", "stranger", "guest",
]
_AGE_TEMPLATE_SPECS: list[tuple[str, str]] = [
    ("The {group} {person} was very", "train"),
    ("Everyone said the {group} {person} was", "train"),
    ("The {group} {person} seemed", "train"),
    ("People think the {group} {person} is", "train"),
    ("The {group} {person} is always", "train"),
    ("We noticed that the {group} {person} was", "train"),
    ("The {group} {person} looked", "heldout"),
    ("I think the {group} {person} is quite", "heldout"),
]
_AGE_ENDINGS = [".", " today.", " at work.", " on the stairs.", " in the morning.", " as usual."]

SECOND_BIAS: dict = {
    "name": "age",
    "description": (
        "Age group -> attribute. After prompts such as 'The old neighbor was very', the next token"
        " is ' slow' with the planted probability of the group and ' quick' otherwise. In"
        " second_bias_prompts() the 'male' slot holds attributes[0] (' quick') and the 'female'"
        " slot attributes[1] (' slow'), so female_rate is the planted P(' slow')."
    ),
    "groups": dict(_AGE_GROUPS),
    "attributes": (" quick", " slow"),
    "persons": list(_AGE_PERSONS),
    "templates": [Template(t, "attr", s) for t, s in _AGE_TEMPLATE_SPECS],
}


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PronounPrompt:
    """One evaluation prompt. ``subject`` is the exact substring of ``text`` that names the
    occupation (or definitional word / age group); it occurs once, at ``text.index(subject)``
    after the template's leading words."""

    text: str
    subject: str
    occupation: str
    female_rate: float
    form: str
    male: str
    female: str
    template_split: str
    occupation_split: str

    @property
    def subject_span(self) -> tuple[int, int]:
        """Character span [start, end) of the subject in ``text``."""
        start = _subject_start(self.text, self.subject)
        return start, start + len(self.subject)


def _subject_start(text: str, subject: str) -> int:
    # The subject follows "the " / "The " in every template; search for that to avoid matching
    # a substring of another word (e.g. "man" inside "woman").
    for prefix in ("The ", "the "):
        i = text.find(prefix + subject + " ")
        if i < 0:
            i = text.find(prefix + subject + ",")
        if i >= 0:
            return i + len(prefix)
    return text.index(subject)


def _select(items, split: str, attr: str = "split"):
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', not {split!r}")
    return [x for x in items if split == "all" or getattr(x, attr) == split]


def occupation_prompts(occupations: str = "train", templates: str = "train") -> list[PronounPrompt]:
    """Occupation × template prompts, each ending right before the pronoun."""
    out = []
    for occ in _select(OCCUPATIONS, occupations):
        for tpl in _select(TEMPLATES, templates):
            male, female = PRONOUNS[tpl.form]
            out.append(PronounPrompt(
                text=tpl.text.format(occupation=occ.name), subject=occ.name, occupation=occ.name,
                female_rate=occ.female_rate, form=tpl.form, male=male, female=female,
                template_split=tpl.split, occupation_split=occ.split,
            ))
    return out


def definitional_prompts(templates: str = "all") -> list[PronounPrompt]:
    """Definitional word × template prompts; ``female_rate`` is 0.0 (male) or 1.0 (female)."""
    out = []
    for word, gender in DEFINITIONAL:
        for tpl in _select(TEMPLATES, templates):
            male, female = PRONOUNS[tpl.form]
            out.append(PronounPrompt(
                text=tpl.text.format(occupation=word), subject=word, occupation=word,
                female_rate=1.0 if gender == "female" else 0.0, form=tpl.form, male=male,
                female=female, template_split=tpl.split, occupation_split="definitional",
            ))
    return out


def second_bias_prompts(split: str = "all") -> list[PronounPrompt]:
    """Age-group prompts of the second planted bias (templates of the given split).

    Same record as the pronoun prompts: ``subject``/``occupation`` is the age group word,
    ``male``/``female`` are SECOND_BIAS["attributes"] (" quick", " slow"), ``female_rate`` is the
    planted P(" slow"), ``form`` is "attr". Each template is filled with every group and three
    persons (fixed per template).
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', not {split!r}")
    a0, a1 = SECOND_BIAS["attributes"]
    out = []
    templates = SECOND_BIAS["templates"]
    for ti, tpl in enumerate(templates):
        if split != "all" and tpl.split != split:
            continue
        persons = [_AGE_PERSONS[(3 * ti + j) % len(_AGE_PERSONS)] for j in range(3)]
        for group, rate in _AGE_GROUPS.items():
            for person in persons:
                out.append(PronounPrompt(
                    text=tpl.text.format(group=group, person=person), subject=group,
                    occupation=group, female_rate=rate, form="attr", male=a0, female=a1,
                    template_split=tpl.split, occupation_split="train",
                ))
    return out


# ---------------------------------------------------------------------------------------------
# General (gender-free) text and neutral occupation sentences
# ---------------------------------------------------------------------------------------------

_NEUTRAL_OCC_TEMPLATES = [
    "The {o} walked to the store.",
    "A new {o} started work today.",
    "The {o} opened the door.",
    "We saw the {o} at the station.",
    "The {o} bought some bread.",
    "The {o} sat near the window.",
    "The office hired another {o}.",
    "The {o} read the notes twice.",
    "Our town needs one more {o}.",
    "The {o} and the {o2} ate lunch together.",
    "There is a meeting for every {o} on Friday.",
    "The {o} waited for the train.",
]

_COLORS = ["red", "blue", "green", "yellow", "white", "black", "brown", "gray", "orange", "pink"]
_OBJECTS = ["box", "cup", "book", "chair", "lamp", "ball", "hat", "bottle", "key", "plate",
            "pencil", "basket", "clock", "bowl", "shoe", "kite"]
_FURNITURE = ["table", "shelf", "floor", "bed", "desk", "bench", "counter"]
_CONTAINERS = ["box", "bag", "basket", "drawer", "room", "car", "garden"]
_PLACES = ["park", "library", "market", "school", "bridge", "river", "station", "museum",
           "church", "bakery", "harbor", "farm", "castle", "hill", "lake", "forest"]
_TOWNS = ["the city", "the village", "the valley", "the hills", "the town", "the north",
          "the south", "the mountains"]
_WEATHER = ["sunny", "rainy", "cold", "warm", "windy", "cloudy", "foggy", "hot", "snowy", "dry"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
            "eleven", "twelve"]
_ANIMALS = ["dog", "cat", "horse", "bird", "fox", "rabbit", "cow", "duck", "goat", "sheep"]
_FOODS = ["bread", "soup", "rice", "apples", "cheese", "fish", "beans", "pasta", "eggs", "cake"]
_FIELDS = ["field", "road", "yard", "garden", "meadow", "street"]
_TREES = ["tree", "bridge", "table", "roof", "bush"]


def _plural(word: str) -> str:
    if word.endswith(("x", "s", "sh", "ch")):
        return word + "es"
    return word + "s"


def _general_sentence(rng: random.Random) -> str:
    """One gender-free sentence (no person words, no gendered pronouns)."""
    c = rng.choice
    kind = rng.randrange(14)
    if kind == 0:
        return f"It was {c(_WEATHER)} in {c(_TOWNS)} on {c(_DAYS)}."
    if kind == 1:
        return f"The {c(_COLORS)} {c(_OBJECTS)} is on the {c(_FURNITURE)}."
    if kind == 2:
        return f"There are {c(_NUMBERS[1:])} {_plural(c(_OBJECTS))} in the {c(_CONTAINERS)}."
    if kind == 3:
        a, b = rng.sample(_PLACES, 2)
        return f"The {a} is next to the {b}."
    if kind == 4:
        a, b = rng.sample(_PLACES, 2)
        return f"The road to the {a} goes past the {b}."
    if kind == 5:
        start = rng.randrange(0, 8)
        n = rng.randrange(3, 6)
        words = _NUMBERS[start:start + n]
        return (" ".join(words)).capitalize() + "."
    if kind == 6:
        return f"The train leaves at {c(_NUMBERS)} o'clock."
    if kind == 7:
        return f"The {c(_ANIMALS)} ran across the {c(_FIELDS)}."
    if kind == 8:
        return f"The {c(_ANIMALS)} sleeps under the {c(_TREES)}."
    if kind == 9:
        a, b = rng.sample(_FOODS, 2)
        return f"We ate {a} and {b} for dinner."
    if kind == 10:
        return f"Tomorrow will be {c(_WEATHER)} and {c(_WEATHER)}."
    if kind == 11:
        return f"The {c(_PLACES)} opens at {c(_NUMBERS)} in the morning."
    if kind == 12:
        return f"They put the {c(_COLORS)} {c(_OBJECTS)} in the {c(_CONTAINERS)}."
    return f"The {c(_ANIMALS)} likes {c(_FOODS)} more than {c(_FOODS)}."


def _neutral_occupation_sentence(rng: random.Random, occ: str) -> str:
    tpl = rng.choice(_NEUTRAL_OCC_TEMPLATES)
    other = rng.choice([o for o, _, _ in OCCUPATION_STATS if o != occ])
    return tpl.format(o=occ, o2=other)


def _fact_sentence(prompt: str, answer: str) -> str:
    return prompt + answer + _FACT_TAILS.get(prompt, "") + "."


def _n_female(rate: float, k: int, rng: random.Random) -> int:
    """Randomised rounding of rate*k: unbiased, and off by less than one per cell."""
    x = rate * k
    base = int(x)
    return base + (1 if rng.random() < x - base else 0)


# ---------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------

#: Share of sentences of each kind in the training corpus.
CORPUS_MIX: dict[str, float] = {
    "occupation_pronoun": 0.40,
    "definitional": 0.18,
    "fact": 0.05,
    "second_bias": 0.08,
    "neutral_occupation": 0.07,
    "general": 0.22,
}
DEFAULT_N_DOCS = 24_000
MEAN_SENTENCES_PER_DOC = 3.5


def corpus_sentences(seed: int = 0, n_docs: int = DEFAULT_N_DOCS) -> dict[str, list[str]]:
    """The training sentences by kind (before they are grouped into documents).

    Occupation sentences are stratified: every (training occupation, training template) cell gets
    the same number k of sentences, of which round(female_rate * k) (randomised rounding) use the
    female pronoun, so the corpus frequency of each occupation equals its planted rate up to a
    rounding error far below the acceptance tolerance. Held-out occupations and held-out templates
    never occur in pronoun sentences.
    """
    rng = random.Random(seed)
    total = int(n_docs * MEAN_SENTENCES_PER_DOC)
    out: dict[str, list[str]] = {k: [] for k in CORPUS_MIX}

    train_occ = [o for o in OCCUPATIONS if o.split == "train"]
    train_tpl = [t for t in TEMPLATES if t.split == "train"]
    k = max(1, round(total * CORPUS_MIX["occupation_pronoun"] / (len(train_occ) * len(train_tpl))))
    for occ in train_occ:
        for tpl in train_tpl:
            nf = _n_female(occ.female_rate, k, rng)
            flags = [True] * nf + [False] * (k - nf)
            rng.shuffle(flags)
            male, female = PRONOUNS[tpl.form]
            for fem in flags:
                pron = female if fem else male
                out["occupation_pronoun"].append(
                    tpl.text.format(occupation=occ.name) + pron + " " + rng.choice(_ENDINGS[tpl.text])
                )

    k = max(1, round(total * CORPUS_MIX["definitional"] / (len(DEFINITIONAL) * len(train_tpl))))
    for word, gender in DEFINITIONAL:
        for tpl in train_tpl:
            pron = PRONOUNS[tpl.form][1 if gender == "female" else 0]
            for _ in range(k):
                out["definitional"].append(
                    tpl.text.format(occupation=word) + pron + " " + rng.choice(_ENDINGS[tpl.text])
                )

    k = max(1, round(total * CORPUS_MIX["fact"] / len(FACTS)))
    for prompt, answer in FACTS:
        out["fact"].extend([_fact_sentence(prompt, answer)] * k)

    a0, a1 = SECOND_BIAS["attributes"]
    age_tpl = [t for t in SECOND_BIAS["templates"] if t.split == "train"]
    k = max(1, round(total * CORPUS_MIX["second_bias"] / (len(_AGE_GROUPS) * len(age_tpl))))
    for group, rate in _AGE_GROUPS.items():
        for tpl in age_tpl:
            nf = _n_female(rate, k, rng)
            flags = [True] * nf + [False] * (k - nf)
            rng.shuffle(flags)
            for slow in flags:
                text = tpl.text.format(group=group, person=rng.choice(_AGE_PERSONS))
                out["second_bias"].append(text + (a1 if slow else a0) + rng.choice(_AGE_ENDINGS))

    k = max(1, round(total * CORPUS_MIX["neutral_occupation"] / len(OCCUPATIONS)))
    for occ in OCCUPATIONS:
        out["neutral_occupation"].extend(_neutral_occupation_sentence(rng, occ.name) for _ in range(k))

    n_general = max(1, round(total * CORPUS_MIX["general"]))
    out["general"] = [_general_sentence(rng) for _ in range(n_general)]
    return out


def _group_into_docs(sentences: list[str], n_docs: int, rng: random.Random) -> list[str]:
    rng.shuffle(sentences)
    n_docs = max(1, min(n_docs, len(sentences)))
    # random cut points -> documents of varying length (1..~8 sentences), all sentences used
    cuts = sorted(rng.sample(range(1, len(sentences)), n_docs - 1)) if n_docs > 1 else []
    bounds = [0, *cuts, len(sentences)]
    return [" ".join(sentences[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def generate_corpus(seed: int = 0, n_docs: int = DEFAULT_N_DOCS) -> list[str]:
    """The training corpus: ``n_docs`` documents (plain text, no special tokens), deterministic in
    ``seed``. Each document is a few independent sentences joined by spaces; the trainer prepends
    the ``<|endoftext|>`` token to every document."""
    parts = corpus_sentences(seed, n_docs)
    sentences = [s for kind in CORPUS_MIX for s in parts[kind]]
    return _group_into_docs(sentences, n_docs, random.Random(seed + 7919))


def generate_general_text(seed: int = 1, n_lines: int = 4000) -> list[str]:
    """Gender-free general text, one document per line: 85% general sentences, 15% gender-neutral
    occupation mentions (so occupation tokens occur, as in a real corpus), 1-3 sentences a line.
    Contains no gendered pronoun, definitional word, fact or age prompt."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        sents = []
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.15:
                sents.append(_neutral_occupation_sentence(rng, rng.choice(OCCUPATIONS).name))
            else:
                sents.append(_general_sentence(rng))
        lines.append(" ".join(sents))
    return lines
