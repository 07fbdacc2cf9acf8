"""Prompts with token roles, so prompts of different lengths batch and align.

A prompt is text plus (optionally) the subject substring, e.g. ``Prompt("The nurse said that",
subject="nurse")``. After tokenisation every token gets roles from character offsets:

``prefix``          tokens before the subject (including BOS)
``subject_first``   first token of the subject
``subject_middle``  subject tokens strictly between its first and last
``subject_last``    last token of the subject (equals ``subject_first`` for one-token subjects)
``after_subject``   tokens after the subject and before the last token
``last``            the last token (where the next-token metric is read)

Roles of one prompt may share a position; a role may be empty for a prompt (a one-token subject
has no ``subject_middle``). Effects are averaged per role across prompts (docs/methods/tracing.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence


if TYPE_CHECKING:
    import torch
    from jaxtyping import Int

__all__ = ["ROLES", "SINGLE_ROLES", "Prompt", "as_prompt", "female_rate", "subject_span",
           "roles_from_offsets", "pad_rows", "TokenBatch"]

ROLES: tuple[str, ...] = (
    "prefix",
    "subject_first",
    "subject_middle",
    "subject_last",
    "after_subject",
    "last",
)
# Roles that hold exactly one position in every prompt with a subject.
SINGLE_ROLES: tuple[str, ...] = ("subject_first", "subject_last", "last")


@dataclass(frozen=True)
class Prompt:
    """A prompt and the substring playing the subject, with the two facts the pronoun metrics
    read typed: ``pronouns``, the ``(male, female)`` continuations compared after it (None: the
    default he/she pair, :func:`biaslens.metrics.pronoun_pair`), and ``female_rate``, the
    occupation's share of women (None: no occupation statistic). ``meta`` carries anything else;
    a ``meta`` holding ``"female_rate"`` or ``"male"``/``"female"`` (a prompts file's extra keys)
    fills the typed fields when they are not given (the pair only when both words are). Read the
    rate with :func:`female_rate`, the pair with :func:`biaslens.metrics.pronoun_pair`."""

    text: str
    subject: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    pronouns: tuple[str, str] | None = field(default=None, compare=False, hash=False)
    female_rate: float | None = field(default=None, compare=False, hash=False)

    def __post_init__(self) -> None:
        meta = self.meta or {}
        rate = self.female_rate if self.female_rate is not None else meta.get("female_rate")
        object.__setattr__(self, "female_rate", None if rate is None else float(rate))
        pair = self.pronouns
        if pair is None and isinstance(meta.get("male"), str) and isinstance(meta.get("female"), str) \
                and meta["male"] and meta["female"]:
            pair = (meta["male"], meta["female"])
        elif pair is not None:
            if len(pair) != 2 or not all(isinstance(w, str) and w for w in pair):
                from biaslens.errors import BiasLensError

                raise BiasLensError(f"a prompt's pronouns are a (male, female) pair of words such "
                                    f"as (' he', ' she'), not {pair!r}")
            pair = (pair[0], pair[1])
        object.__setattr__(self, "pronouns", pair)

    @property
    def male(self) -> str | None:
        """The male continuation (``pronouns[0]``), None without a pair."""
        return self.pronouns[0] if self.pronouns else None

    @property
    def female(self) -> str | None:
        """The female continuation (``pronouns[1]``), None without a pair."""
        return self.pronouns[1] if self.pronouns else None


def as_prompt(p: Any) -> Prompt:
    """Accept ``Prompt``, a string, a ``(text, subject)`` tuple, or any object with ``.text``
    (and optionally ``.subject``), such as the organism's ``PronounPrompt``."""
    if isinstance(p, Prompt):
        return p
    if isinstance(p, str):
        return Prompt(p)
    if isinstance(p, tuple):
        return Prompt(p[0], p[1] if len(p) > 1 else None)
    if hasattr(p, "text"):
        meta = dict(vars(p)) if hasattr(p, "__dict__") else {}
        if not meta and hasattr(p, "__dataclass_fields__"):
            meta = {k: getattr(p, k) for k in p.__dataclass_fields__}
        male, female = getattr(p, "male", None), getattr(p, "female", None)
        words = isinstance(male, str) and isinstance(female, str) and male and female
        pair = (male, female) if words else None
        rate = female_rate(p)
        return Prompt(p.text, getattr(p, "subject", None), meta, pair, None if rate != rate else rate)
    raise TypeError(f"cannot make a prompt from {type(p).__name__}")


def female_rate(p: Any) -> float:
    """A prompt's female rate (the occupation's share of women), the one way every module reads
    it: the typed field :attr:`Prompt.female_rate` (or the attribute of another prompt type, e.g.
    the organism's ``PronounPrompt``), else ``meta["female_rate"]``; NaN when it has none."""
    r = getattr(p, "female_rate", None)
    if r is None:
        r = (getattr(p, "meta", None) or {}).get("female_rate")
    return float("nan") if r is None else float(r)


def subject_span(text: str, subject: str | None) -> tuple[int, int] | None:
    """Character span of the subject: its last occurrence as a whole word, else last occurrence."""
    if not subject:
        return None
    import re

    matches = [m.span() for m in re.finditer(r"(?<!\w)" + re.escape(subject) + r"(?!\w)", text)]
    if not matches:
        start = text.rfind(subject)
        if start < 0:
            from biaslens.errors import BiasLensError

            raise BiasLensError(f"subject '{subject}' does not occur in prompt '{text}'")
        return start, start + len(subject)
    return matches[-1]


def roles_from_offsets(
    offsets: Sequence[tuple[int, int]], span: tuple[int, int] | None
) -> dict[str, list[int]]:
    """Positions of each role, from each token's character offsets ((0, 0) for special tokens)."""
    n = len(offsets)
    roles: dict[str, list[int]] = {r: [] for r in ROLES}
    roles["last"] = [n - 1]
    if span is None:
        roles["prefix"] = list(range(n - 1))
        return roles
    s0, s1 = span
    subj = [i for i, (a, b) in enumerate(offsets) if b > a and a < s1 and b > s0]
    if not subj:
        from biaslens.errors import BiasLensError

        raise BiasLensError("the subject has no tokens of its own in this prompt")
    first, lastsub = subj[0], subj[-1]
    roles["prefix"] = list(range(0, first))
    roles["subject_first"] = [first]
    roles["subject_middle"] = list(range(first + 1, lastsub))
    roles["subject_last"] = [lastsub]
    roles["after_subject"] = list(range(lastsub + 1, n - 1))
    return roles


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, device=None):
    """Right-pad token rows into ``(input_ids, attention_mask)``, both ``LongTensor[len(rows), width]``."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return (ids, mask) if device is None else (ids.to(device), mask.to(device))


@dataclass
class TokenBatch:
    """Right-padded token ids of a prompt set, with each prompt's role positions.

    ``input_ids``/``attention_mask``: ``[batch, pos]``; ``lengths``: ``[batch]``;
    ``roles[role][i]``: positions of ``role`` in prompt ``i``.
    """

    input_ids: Int[torch.Tensor, "batch pos"]
    attention_mask: Int[torch.Tensor, "batch pos"]
    lengths: Int[torch.Tensor, " batch"]
    roles: dict[str, list[list[int]]]
    prompts: list[Prompt]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.prompts]

    def positions(self, role: str) -> list[list[int]]:
        if role not in self.roles:
            raise KeyError(f"unknown role '{role}' (roles: {', '.join(ROLES)})")
        return self.roles[role]

    def index(self, role: str):
        """``LongTensor[batch]`` of the single position of ``role`` in each prompt."""
        import torch

        pos = self.positions(role)
        if any(len(p) != 1 for p in pos):
            raise ValueError(f"role '{role}' does not have exactly one position in every prompt")
        return torch.tensor([p[0] for p in pos], dtype=torch.long, device=self.input_ids.device)

    def role_mask(self, role: str):
        """``BoolTensor[batch, pos]``: True where the token plays ``role``."""
        import torch

        mask = torch.zeros(self.input_ids.shape, dtype=torch.bool, device=self.input_ids.device)
        for i, ps in enumerate(self.positions(role)):
            if ps:
                mask[i, ps] = True
        return mask

    def select(self, idx: Iterable[int]) -> "TokenBatch":
        idx = list(idx)
        width = int(self.lengths[idx].max()) if idx else 0
        return TokenBatch(
            input_ids=self.input_ids[idx, :width],
            attention_mask=self.attention_mask[idx, :width],
            lengths=self.lengths[idx],
            roles={r: [v[i] for i in idx] for r, v in self.roles.items()},
            prompts=[self.prompts[i] for i in idx],
        )

    def to(self, device) -> "TokenBatch":
        return TokenBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.lengths.to(device),
            self.roles,
            self.prompts,
        )
