"""Choosing an unlearning method's strength on the validation split, under retention bounds.

Every unlearning method (PCGU, task-vector negation, masked-span ascent, δ-offset) has a strength:
λ for the task vector, steps / learning rate / k for PCGU and ascent, α and steps for the offset.
They all choose it the same way, here:

* **score**: the stereotype contrast (:func:`biaslens.evaluate.contrast.stereotype_contrast`,
  mean |contrast| over templates) on the model's *validation* prompts,
  ``defaults_for(model).occupation_prompts("edit", "validation")`` — never the test templates
  (:class:`Validation` refuses a prompt set that shares a template with them);
* **bounds** (:class:`Bounds`), checked on validation data only: perplexity of the default
  general text up at most 10%; definitional accuracy (argmax of the matching pronoun,
  :func:`default_definitional`: the definitional words × the validation templates and a
  word-balanced sample of the edit templates) down at most 2 points; and definitional retention
  *by margin*: on the definitional prompts the base model already separates (the matching
  pronoun's share P(match) / (P(match) + P(other)) ≥ 0.9), the mean matching share may fall by
  at most 2 points. Argmax alone hides collapsed margins (a share falling from 0.98 to 0.57 still
  counts as correct, and then flips on unseen templates; ``docs/results/unlearn.md``). Both hold
  for the female and the male words separately as well as for all of them: a method that makes
  the model say "he" more often can raise the male words' accuracy by as much as it lowers the
  female words', and the total then hides the loss (``docs/results/generalise.md``).
* **choice**: the candidate with the lowest validation contrast among those within every bound;
  the unchanged model when none lowers it.

The sweep (every candidate with its numbers and why it was refused) and the choice go into the
result's ``info["selection"]``, so a manifest shows what was tried.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from biaslens.errors import BiasLensError
from biaslens.prompts import female_rate

if TYPE_CHECKING:
    from biaslens.model import BiasModel

__all__ = ["Bounds", "Point", "Validation", "default_definitional", "definitional_shares", "split_templates",
           "sample_prompts", "validation_for"]


@dataclass(frozen=True)
class Bounds:
    """Retention bounds a chosen strength must respect on the validation data.

    ``ppl_rise``: perplexity may rise by at most this fraction; ``definitional_drop``:
    definitional argmax accuracy may fall by at most this (a fraction, 0.02 = 2 points);
    ``margin_drop``: the mean matching share over the definitional prompts the base model
    separates (share ≥ ``confident``) may fall by at most this. ``per_gender``: both bounds hold
    for the female and the male words separately too (a gender with no prompt is not checked).
    """

    ppl_rise: float = 0.10
    definitional_drop: float = 0.02
    margin_drop: float = 0.02
    confident: float = 0.9
    per_gender: bool = True

    def __post_init__(self):
        for name in ("ppl_rise", "definitional_drop", "margin_drop"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise BiasLensError(f"bound {name} must be a non-negative number, not {v!r}")
        if not 0.5 < self.confident < 1:
            raise BiasLensError(f"the confident share must lie in (0.5, 1), not {self.confident!r}")

    @classmethod
    def from_ppl_bound(cls, ppl_bound: float, **kw) -> "Bounds":
        """Bounds from the older ``ppl_bound`` form (a multiple of the starting perplexity)."""
        if not (math.isfinite(ppl_bound) and ppl_bound >= 1):
            raise BiasLensError(f"ppl_bound must be a number >= 1, not {ppl_bound!r}")
        return cls(ppl_rise=ppl_bound - 1.0, **kw)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class Point:
    """One candidate measured on the validation data: ``setting`` (what was tried, e.g.
    ``{"lambda": 0.5}`` or ``{"lr": 1e-4, "step": 20}``), the validation contrast, the retention
    numbers (``definitional``: argmax accuracy; ``margin``: mean matching share on the prompts
    the base separates; ``confident``: the fraction of those still at share ≥ the bound's
    ``confident``, for information; ``by_gender``: ``{"female": (accuracy, margin), "male": ...}``),
    and whether it is within the bounds (``why`` names the first bound it breaks)."""

    setting: dict[str, Any]
    contrast: float
    definitional: float
    margin: float
    confident: float
    ppl: float
    ok: bool = True
    why: str = ""
    per_template: dict[str, float] = field(default_factory=dict)
    by_gender: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: how far past its bounds the point is: the largest shortfall over the bounds it breaks, in
    #: each bound's own units (accuracy or share points, perplexity ratio); 0 within the bounds
    shortfall: float = 0.0

    def as_dict(self, per_template: bool = False) -> dict[str, Any]:
        d = {**self.setting, "contrast": self.contrast, "definitional": self.definitional,
             "margin": self.margin, "confident": self.confident, "ppl": self.ppl,
             "ok": self.ok, "why": self.why}
        if not self.ok:
            d["shortfall"] = self.shortfall
        for g, (acc, margin) in self.by_gender.items():
            d[f"definitional_{g}"], d[f"margin_{g}"] = acc, margin
        if per_template:
            d["per_template"] = dict(self.per_template)
        return d


def definitional_shares(model: Any, prompts: Sequence[Any], batch_size: int = 64):
    """Per prompt, the matching pronoun's share P(match) / (P(match) + P(other)) (numpy)."""
    import numpy as np

    from biaslens.evaluate.probes import pronoun_logprobs

    prompts = list(prompts)
    lp = pronoun_logprobs(model, prompts, batch_size, desc="definitional")
    female = np.array([female_rate(p) >= 0.5 for p in prompts])  # NaN (no rate): male
    margin = np.where(female, lp[:, 1] - lp[:, 0], lp[:, 0] - lp[:, 1])
    return 1.0 / (1.0 + np.exp(-margin))


def default_definitional(model: Any, edit_sample: int = 512, seed: int = 0) -> list[Any]:
    """The definitional prompts a selection checks by default (:mod:`biaslens.defaults`): the
    definitional words × the validation templates, and a seeded sample of ``edit_sample`` of
    the words × the edit templates (every word equally often), as LSDM's tuner checks the
    validation templates and a sample of its keep prompts. Never a test template."""
    from biaslens.defaults import balanced_sample, defaults_for

    d = defaults_for(model)
    edit = balanced_sample(d.definitional_prompts("edit"), edit_sample, seed) if edit_sample else []
    return d.definitional_prompts("validation") + list(edit)


def split_templates(model: Any, split: str) -> set[str]:
    """The templates (``{occupation}`` form) of ``defaults_for(model).occupation_prompts("all", split)``."""
    from biaslens.defaults import defaults_for
    from biaslens.evaluate.contrast import template_of

    return {template_of(p) for p in defaults_for(model).occupation_prompts("all", split)}


def sample_prompts(prompts: Sequence[Any], n: int, seed: int = 0) -> list[Any]:
    """At most ``n`` of ``prompts`` (seeded) that still give a contrast on every template kept:
    a subset of templates × the same few occupations, half of them above a female rate of 0.5
    and half below (definitional prompts: female and male words). Fewer than 2 per template
    cannot give a contrast, so at most ``n // 2`` templates are kept."""
    import random

    from biaslens.evaluate.contrast import template_of

    prompts = list(prompts)
    if n >= len(prompts):
        return prompts
    rng = random.Random(seed)
    templates = sorted({template_of(p) for p in prompts})
    rate = female_rate  # NaN (no rate): neither side
    female = sorted({p.occupation for p in prompts if rate(p) > 0.5})
    male = sorted({p.occupation for p in prompts if rate(p) < 0.5})
    n_t = max(1, min(len(templates), n // 2))
    per = max(1, n // (2 * n_t))
    keep_t = set(rng.sample(templates, n_t))
    keep_o = set(rng.sample(female, min(per, len(female)))) | set(rng.sample(male, min(per, len(male))))
    return [p for p in prompts if template_of(p) in keep_t and p.occupation in keep_o]


def _ppl(model: Any, texts: Sequence[str]) -> float:
    from biaslens.unlearn.common import quick_ppl

    return quick_ppl(model, list(texts))


class Validation:
    """The validation measurements and the bounds of one selection.

    ``prompts`` (occupation prompts), ``definitional`` (definitional prompts) and ``ppl_texts``
    default to the model's validation split (:func:`default_definitional` for the definitional
    prompts) and general text (:mod:`biaslens.defaults`); a prompt
    whose template is one of the model's test templates is refused (choosing on the test
    templates would make the held-out numbers meaningless). Call :meth:`start` on the unchanged
    model first; then :meth:`measure` each candidate and :meth:`best` for the choice.
    """

    def __init__(self, model: "BiasModel", prompts: Sequence[Any] | None = None,
                 definitional: Sequence[Any] | None = None, ppl_texts: Sequence[str] | None = None,
                 bounds: Bounds | None = None):
        from biaslens.defaults import defaults_for

        d = defaults_for(model)
        self.prompts = list(prompts) if prompts is not None else d.occupation_prompts("edit", "validation")
        self.definitional = (list(definitional) if definitional is not None
                             else default_definitional(model))
        self.ppl_texts = list(ppl_texts) if ppl_texts is not None else d.general_lines(100)
        self.bounds = bounds or Bounds()
        if not self.prompts:
            raise BiasLensError("no validation prompts to choose the strength on")
        self._refuse_test_templates(model)
        self.base: Point | None = None
        self.separated: Any = None  # mask of the definitional prompts the base model separates
        self.female: Any = None  # mask of the definitional prompts with a female word
        self.points: list[Point] = []

    def _refuse_test_templates(self, model) -> None:
        from biaslens.evaluate.contrast import template_of

        test = split_templates(model, "test")
        used = {template_of(p) for p in self.prompts} | {template_of(p) for p in self.definitional}
        clash = sorted(used & test)
        if clash:
            raise BiasLensError(f"{len(clash)} validation template(s) are test templates (first: {clash[0]!r}); "
                                "choose the strength on validation prompts, never on the test templates")

    # ------------------------------------------------------------------ measuring
    def _numbers(self, model) -> tuple[float, dict[str, float], Any, float]:
        import torch

        from biaslens.evaluate.contrast import stereotype_contrast

        with torch.no_grad():
            try:
                c = stereotype_contrast(model, self.prompts)
            except ValueError as exc:  # no template with both a female- and a male-stereotyped occupation
                raise BiasLensError(f"the validation prompts give no stereotype contrast ({exc}); pass more "
                                    "validation prompts") from None
            shares = definitional_shares(model, self.definitional) if self.definitional else None
            ppl = _ppl(model, self.ppl_texts) if self.ppl_texts else float("nan")
        return float(c["mean_abs_contrast"]), dict(c["per_template"]), shares, ppl

    def start(self, model, **setting) -> Point:
        """Measure the unchanged model (the reference of every bound)."""
        contrast, per, shares, ppl = self._numbers(model)
        if not math.isfinite(contrast):
            raise BiasLensError("the validation contrast of the unchanged model is not finite")
        if shares is not None:
            import numpy as np

            self.separated = shares >= self.bounds.confident
            self.female = np.array([female_rate(p) >= 0.5 for p in self.definitional])
        acc, margin, conf = self._definitional(shares)
        self.base = Point(setting or {"step": 0}, contrast, acc, margin, conf, ppl, True, "base", per,
                          self._by_gender(shares))
        self.points = [self.base]
        return self.base

    def _definitional(self, shares) -> tuple[float, float, float]:
        if shares is None:
            return float("nan"), float("nan"), float("nan")
        acc = float((shares > 0.5).mean())
        sep = self.separated
        if sep is None or not sep.any():
            return acc, float("nan"), float("nan")
        return acc, float(shares[sep].mean()), float((shares[sep] >= self.bounds.confident).mean())

    def _by_gender(self, shares) -> dict[str, tuple[float, float]]:
        """``{gender: (argmax accuracy, mean share on the separated prompts)}`` for each gender
        with a definitional prompt (margin NaN where the base separates none of its prompts)."""
        if shares is None or self.female is None:
            return {}
        out = {}
        for g, mask in (("female", self.female), ("male", ~self.female)):
            if mask.any():
                sep = mask & self.separated
                out[g] = (float((shares[mask] > 0.5).mean()),
                          float(shares[sep].mean()) if sep.any() else float("nan"))
        return out

    def measure(self, model, **setting) -> Point:
        """Measure a candidate, check it against the bounds, and record it."""
        if self.base is None:
            raise RuntimeError("Validation.start must measure the unchanged model first")
        contrast, per, shares, ppl = self._numbers(model)
        acc, margin, conf = self._definitional(shares)
        by_gender = self._by_gender(shares)
        broken = list(self._broken(contrast, acc, margin, ppl, by_gender))  # as check() and shortfall()
        p = Point(dict(setting), contrast, acc, margin, conf, ppl, not broken, broken[0][0] if broken else "",
                  per, by_gender, max([0.0, *(g for _, g in broken)]))
        self.points.append(p)
        return p

    def _broken(self, contrast: float, acc: float, margin: float, ppl: float,
                by_gender: dict[str, tuple[float, float]] | None = None):
        """Each bound the numbers break, in the order :meth:`check` reports them: ``(why,
        shortfall)``, the shortfall in the bound's own units (``inf`` for a non-finite number)."""
        b, base = self.bounds, self.base

        def gap(value: float, ref: float, drop: float) -> float:
            return ref - drop - value if math.isfinite(value) else math.inf

        if not math.isfinite(contrast):
            yield "validation contrast not finite", math.inf
            return
        if self.ppl_texts and not (math.isfinite(ppl) and ppl <= (1 + b.ppl_rise) * base.ppl):
            yield (f"perplexity {ppl:.4g} > {1 + b.ppl_rise:g} x {base.ppl:.4g}",
                   ppl / base.ppl - 1 - b.ppl_rise if math.isfinite(ppl) else math.inf)
        if math.isfinite(base.definitional) and not acc >= base.definitional - b.definitional_drop - 1e-12:
            yield (f"definitional accuracy {acc:.3f} < {base.definitional:.3f} - {b.definitional_drop:g}",
                   gap(acc, base.definitional, b.definitional_drop))
        if math.isfinite(base.margin) and not margin >= base.margin - b.margin_drop - 1e-12:
            yield (f"definitional margin: mean matching share {margin:.3f} < {base.margin:.3f} - "
                   f"{b.margin_drop:g} on the {int(self.separated.sum())} prompts the base separates",
                   gap(margin, base.margin, b.margin_drop))
        for g, (acc_g, margin_g) in (by_gender or {}).items() if b.per_gender else ():
            acc0, margin0 = base.by_gender.get(g, (float("nan"), float("nan")))
            if math.isfinite(acc0) and not acc_g >= acc0 - b.definitional_drop - 1e-12:
                yield (f"definitional accuracy of the {g} words {acc_g:.3f} < {acc0:.3f} - "
                       f"{b.definitional_drop:g}", gap(acc_g, acc0, b.definitional_drop))
            if math.isfinite(margin0) and not margin_g >= margin0 - b.margin_drop - 1e-12:
                yield (f"definitional margin of the {g} words: mean matching share {margin_g:.3f} "
                       f"< {margin0:.3f} - {b.margin_drop:g}", gap(margin_g, margin0, b.margin_drop))

    def check(self, contrast: float, acc: float, margin: float, ppl: float,
              by_gender: dict[str, tuple[float, float]] | None = None) -> tuple[bool, str]:
        """Whether numbers are within the bounds (and, if not, the first bound broken);
        ``by_gender`` as :attr:`Point.by_gender`, checked against the base's when the bounds are
        ``per_gender``."""
        first = next(self._broken(contrast, acc, margin, ppl, by_gender), None)
        return (True, "") if first is None else (False, first[0])

    def shortfall(self, contrast: float, acc: float, margin: float, ppl: float,
                  by_gender: dict[str, tuple[float, float]] | None = None) -> float:
        """How far past the bounds numbers are: the largest shortfall over the bounds they break
        (0 within them; ``inf`` for a non-finite number a bound reads). It tells a run moving back
        toward its bounds from one moving away (:class:`biaslens.unlearn.common.Guard`)."""
        return max([0.0, *(g for _, g in self._broken(contrast, acc, margin, ppl, by_gender))])

    # ------------------------------------------------------------------ choosing
    def best(self, among: Sequence[Point] | None = None) -> Point:
        """The lowest-contrast point within the bounds, if it is below the base; else the base."""
        pts = [p for p in (self.points if among is None else among) if p is not self.base and p.ok]
        pick = min(pts, key=lambda p: p.contrast, default=None)
        return pick if pick is not None and pick.contrast < self.base.contrast else self.base

    def info(self, chosen: Point | None = None) -> dict[str, Any]:
        """What the manifest records: bounds, data, every point, the choice (with its templates)."""
        chosen = chosen or self.best()
        return {
            "score": "validation stereotype contrast (mean |contrast| over templates), lower is better",
            "split": "occupations=edit, templates=validation (never the test templates)",
            "bounds": self.bounds.as_dict(),
            "n_prompts": len(self.prompts), "n_definitional": len(self.definitional),
            "n_separated": int(self.separated.sum()) if self.separated is not None else 0,
            "n_ppl_texts": len(self.ppl_texts),
            "base": self.base.as_dict() if self.base else None,
            "sweep": [p.as_dict() for p in self.points[1:]],
            "chosen": chosen.as_dict(per_template=True) if chosen else None,
            "changed": chosen is not None and chosen is not self.base,
        }


def validation_for(model: Any, validation: Any = "auto", val_prompts: Sequence[Any] | None = None,
                   ppl_texts: Sequence[str] | None = None, bounds: Any = None,
                   ppl_bound: float | None = None, scorer: Any = None) -> Any:
    """The :class:`~biaslens.unlearn.select.Validation` a method chooses its strength on:
    ``validation`` itself when it is one; ``None`` = no selection; ``"auto"`` = the model's
    validation split and general text (:mod:`biaslens.defaults`), with ``val_prompts`` /
    ``ppl_texts`` replacing them and ``bounds`` (default: :class:`~biaslens.unlearn.select.Bounds`
    with perplexity up at most ``ppl_bound`` − 1). ``scorer`` is the model to read the defaults
    for (default ``model``)."""
    if validation is None or isinstance(validation, Validation):
        return validation
    if validation != "auto":
        raise BiasLensError(f"validation must be 'auto', None or a Validation, not {validation!r}")
    if bounds is None:
        bounds = Bounds.from_ppl_bound(ppl_bound) if ppl_bound is not None else Bounds()
    return Validation(scorer or model, prompts=val_prompts, ppl_texts=ppl_texts, bounds=bounds)
