"""Hyperparameters of the unlearning methods: dataclasses loadable from one JSON file each.

As for the editors (:mod:`biaslens.edit.hparams`), every method takes ``hparams=`` (one of these
dataclasses, a dict or the path of a JSON object) while its keyword arguments keep working, and
the delta's manifest records ``hparams.to_dict()`` (with what the run resolved or chose on top:
the chosen ``k`` / ``lr`` of a grid, a default learning rate). Values are checked when the
dataclass is made, before any work: a wrong type, a non-finite number or a value out of range is
one :class:`~biaslens.errors.DataFormatError` naming the field.

The fields are each method's keyword arguments of the same names (docs/methods/unlearning.md);
data (pairs, texts, validation prompts, effect maps) and ``progress`` are not hyperparameters.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, TypeVar

from biaslens.edit.hparams import SEED_RANGE, Loadable, Range, read_object
from biaslens.errors import BiasLensError, DataFormatError

__all__ = ["PCGU_VARIANTS", "PCGUHparams", "TaskVectorHparams", "MaskedAscentHparams", "OffsetHparams", "UnlearnHparams",
           "resolve_hparams", "DEFAULT_LAMBDAS", "DEFAULT_ALPHAS", "DEFAULT_KEEP_WEIGHTS", "DEFAULT_OFFSET_LRS", "LOSSES"]

#: the task-vector strengths λ swept on validation (:mod:`biaslens.unlearn.task_vector`)
DEFAULT_LAMBDAS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
#: the offset losses (:mod:`biaslens.unlearn.offset`)
LOSSES = ("grad_ascent", "grad_diff", "kl")
#: the offset strengths α tried on the chosen checkpoint (the training α is always among them)
DEFAULT_ALPHAS = (0.5, 1.0, 1.5, 2.0, 3.0)
#: the definitional keep-term weights β that masked-span ascent and δ-offset try by default, each
#: a run chosen from on the validation split (without validation the first). On both organisms
#: validation chose 100 over the earlier fixed 30 for both methods (docs/methods/unlearning.md)
DEFAULT_KEEP_WEIGHTS = (100.0, 30.0)
#: the learning rates δ-offset tries by default (Adam), each with every keep weight; without
#: validation the first. At 2e-4 alone organism-llama's run broke the male words' definitional
#: bounds from its first check; at 1e-4 it did not (docs/methods/unlearning.md)
DEFAULT_OFFSET_LRS = (2e-4, 1e-4)

H = TypeVar("H", bound="UnlearnHparams")


def _number(where: str, v: Any, whole: bool) -> float | int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (whole and not isinstance(v, int)):
        raise DataFormatError(f"{where} must be a {'whole number' if whole else 'number'}, not {v!r}")
    if not math.isfinite(v):
        raise DataFormatError(f"{where} must be a finite number, not {v!r}")
    return v


def _in(where: str, v: float, r: Range) -> None:
    lo, hi, open_lo = r
    if (lo is not None and (v < lo or (open_lo and v == lo))) or (hi is not None and v > hi):
        span = (f"{'>' if open_lo else '>='} {lo:g}" if hi is None
                else f"in {'(' if open_lo else '['}{lo:g}, {hi:g}]")
        raise DataFormatError(f"{where} must be {span}, not {v!r}")


class UnlearnHparams(Loadable):
    """:class:`~biaslens.edit.hparams.Loadable` plus the field kinds the unlearning methods need:
    ``OPTIONAL`` (``int``/``float`` or None), ``SEQUENCES`` (a non-empty list of numbers, or
    None), ``FLAGS`` (booleans) and ``NAMES`` (a parameter group name, a list of parameter names,
    or None). Sequences are stored as lists, so ``to_dict()`` is plain JSON."""

    OPTIONAL: ClassVar[dict[str, str]] = {}
    SEQUENCES: ClassVar[dict[str, str]] = {}
    FLAGS: ClassVar[tuple[str, ...]] = ()
    NAMES: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        name = type(self).__name__
        special = set(self.OPTIONAL) | set(self.SEQUENCES) | set(self.FLAGS) | set(self.NAMES)
        for f in fields(self):  # type: ignore[arg-type]
            v, where = getattr(self, f.name), f"{name}.{f.name}"
            r = self.RANGES.get(f.name)
            if f.name in self.OPTIONAL and v is not None:
                v = _number(where, v, self.OPTIONAL[f.name] == "int")
                if r is not None:
                    _in(where, v, r)
            elif f.name in self.SEQUENCES and v is not None:
                if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
                    raise DataFormatError(f"{where} must be a list of numbers, not {v!r}")
                v = [_number(where, x, self.SEQUENCES[f.name] == "int") for x in v]
                if not v:
                    raise DataFormatError(f"{where} must name at least one value (or be null)")
                for x in v:
                    if r is not None:
                        _in(where, x, r)
                object.__setattr__(self, f.name, v)
            elif f.name in self.FLAGS and not isinstance(v, bool):
                raise DataFormatError(f"{where} must be true or false, not {v!r}")
            elif f.name in self.NAMES and v is not None and not isinstance(v, str):
                if not hasattr(v, "__iter__") or not all(isinstance(x, str) for x in v):
                    raise DataFormatError(f"{where} must be a group name, a list of parameter names "
                                          f"or null, not {v!r}")
                object.__setattr__(self, f.name, list(v))
        # the plain int/float/str fields and their ranges
        saved = self.RANGES
        try:
            type(self).RANGES = {k: v for k, v in saved.items() if k not in special}
            Loadable.__post_init__(self)
        finally:
            type(self).RANGES = saved

    @classmethod
    def read(cls: type[H], hparams: "H | dict[str, Any] | str | Path") -> H:
        """``hparams`` as an instance: itself, built from a dict, or loaded from a JSON file."""
        if isinstance(hparams, cls):
            return hparams
        if isinstance(hparams, dict):
            return cls.from_dict(hparams)
        if isinstance(hparams, (str, Path)):
            return cls.from_json(hparams)
        raise BiasLensError(f"hparams must be a {cls.__name__}, a dict or the path of a JSON file, "
                            f"not {type(hparams).__name__}")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def resolve_hparams(cls: type[H], hparams: Any, func: Callable, given: dict[str, Any]) -> H:
    """The hyperparameters of one call of ``func``: ``given`` holds the call's keyword arguments
    named like ``cls``'s fields. Without ``hparams`` they build the dataclass (so a bad value is
    refused before any work); with it, a keyword that differs from ``func``'s default and from
    ``hparams`` is refused (the call would be ambiguous)."""
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    if hparams is None:
        return cls.from_dict({n: given[n] for n in names})
    hp = cls.read(hparams)
    defaults = inspect.signature(func).parameters
    for n in names:
        if not _same(given[n], defaults[n].default) and not _same(given[n], getattr(hp, n)):
            raise BiasLensError(f"{n} is given both as a keyword ({given[n]!r}) and in hparams "
                                f"({getattr(hp, n)!r}); pass it in one place")
    return hp


_POSITIVE_INT: Range = (1, None, False)
_NON_NEGATIVE: Range = (0, None, False)
_POSITIVE: Range = (0, None, True)
_PPL_BOUND: Range = (1, None, False)


#: PCGU's update directions (:func:`biaslens.unlearn.partitioned.step_units`)
PCGU_VARIANTS = ("advantaged", "disadvantaged", "both")


@dataclass
class PCGUHparams(UnlearnHparams):
    """PCGU (Yu et al. 2023; Dige et al. 2024; :func:`biaslens.unlearn.pcgu`): ``k`` units,
    learning rate ``lr`` and update ``variant`` for one run, or the grid ``variants`` × ``ks`` ×
    ``lrs`` chosen on validation."""

    k: int | None = None
    lr: float | None = None
    ks: list[int] | None = None
    lrs: list[float] | None = None
    batch_size: int = 16
    epochs: int = 3
    max_steps: int | None = None
    partition: str = "rows"
    variant: str | None = None
    variants: list[str] | None = None
    form: str = "auto"
    params: Any = "blocks"
    optimizer: str = "sgd"
    seed: int = 0
    n_sites: int = 5
    eval_every: int = 20
    ppl_bound: float = 1.1
    keep_weight: float = 30.0
    patience: int = 2

    OPTIONAL: ClassVar[dict[str, str]] = {"k": "int", "lr": "float", "max_steps": "int"}
    SEQUENCES: ClassVar[dict[str, str]] = {"ks": "int", "lrs": "float"}
    NAMES: ClassVar[tuple[str, ...]] = ("params",)
    RANGES: ClassVar[dict[str, Range]] = {
        "k": _POSITIVE_INT, "ks": _POSITIVE_INT, "lr": _POSITIVE, "lrs": _POSITIVE,
        "batch_size": _POSITIVE_INT, "epochs": _POSITIVE_INT, "max_steps": _POSITIVE_INT,
        "seed": SEED_RANGE, "n_sites": _POSITIVE_INT, "eval_every": _POSITIVE_INT,
        "ppl_bound": _PPL_BOUND, "keep_weight": _NON_NEGATIVE, "patience": _POSITIVE_INT,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        allowed = ", ".join(map(repr, PCGU_VARIANTS))
        if self.variant is not None and self.variant not in PCGU_VARIANTS:
            raise DataFormatError(f"PCGUHparams.variant must be one of {allowed} (or null), not {self.variant!r}")
        if self.variants is not None:
            v = self.variants
            got = None if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__") else list(v)
            if not got or any(x not in PCGU_VARIANTS for x in got):
                raise DataFormatError(f"PCGUHparams.variants must be a non-empty list of {allowed} (or null), "
                                      f"not {v!r}")
            object.__setattr__(self, "variants", got)


@dataclass
class TaskVectorHparams(UnlearnHparams):
    """Task-vector negation (Ilharco et al. 2023; Dige et al. 2024;
    :func:`biaslens.unlearn.task_vector.task_vector_negation`). ``lora_rank``: fine-tune a rank-r
    factorised update instead of the full weights (the full gradient is still computed; see that
    module's docstring). ``lr`` None: 2e-4 for the full fine-tune, 1e-3 for the factorised one."""

    lora_rank: int | None = None
    lora_alpha: float | None = None
    lambdas: list[float] = field(default_factory=lambda: list(DEFAULT_LAMBDAS))
    ppl_bound: float = 1.1
    steps: int = 150
    lr: float | None = None
    batch_size: int = 16
    params: Any = None
    keep_weight: float = 30.0
    refine: int = 2
    seed: int = 0

    OPTIONAL: ClassVar[dict[str, str]] = {"lora_rank": "int", "lora_alpha": "float", "lr": "float"}
    SEQUENCES: ClassVar[dict[str, str]] = {"lambdas": "float"}
    NAMES: ClassVar[tuple[str, ...]] = ("params",)
    RANGES: ClassVar[dict[str, Range]] = {
        "lora_rank": _POSITIVE_INT, "lora_alpha": _POSITIVE, "lambdas": _POSITIVE,
        "ppl_bound": _PPL_BOUND, "steps": _POSITIVE_INT, "lr": _POSITIVE, "batch_size": _POSITIVE_INT,
        "keep_weight": _NON_NEGATIVE, "refine": _NON_NEGATIVE, "seed": SEED_RANGE,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lambdas is None:
            raise DataFormatError("TaskVectorHparams.lambdas must name at least one strength")


@dataclass
class MaskedAscentHparams(UnlearnHparams):
    """Masked-span gradient ascent (Lu et al. 2024;
    :func:`biaslens.unlearn.masked_ascent.masked_span_ascent`): one ``lr`` or the grid ``lrs``,
    one ``keep_weight`` or the grid ``keep_weights`` (both grids chosen from on validation)."""

    lr: float | None = None
    lrs: list[float] | None = None
    max_steps: int = 200
    ppl_bound: float = 1.1
    batch_size: int = 16
    eval_every: int = 10
    keep_weight: float | None = None
    keep_weights: list[float] | None = None
    params: Any = None
    patience: int = 2
    seed: int = 0

    OPTIONAL: ClassVar[dict[str, str]] = {"lr": "float", "keep_weight": "float"}
    SEQUENCES: ClassVar[dict[str, str]] = {"lrs": "float", "keep_weights": "float"}
    NAMES: ClassVar[tuple[str, ...]] = ("params",)
    RANGES: ClassVar[dict[str, Range]] = {
        "lr": _POSITIVE, "lrs": _POSITIVE, "max_steps": _POSITIVE_INT, "ppl_bound": _PPL_BOUND,
        "batch_size": _POSITIVE_INT, "eval_every": _POSITIVE_INT, "keep_weight": _NON_NEGATIVE,
        "keep_weights": _NON_NEGATIVE, "patience": _POSITIVE_INT, "seed": SEED_RANGE,
    }


@dataclass
class OffsetHparams(UnlearnHparams):
    """δ-offset unlearning (Huang et al. 2024; :func:`biaslens.unlearn.offset.offset_unlearn`):
    the offset pair's training (``loss``, ``max_steps``; one ``lr`` or the grid ``lrs``, one
    ``keep_weight`` or the grid ``keep_weights``: one training run per pair, chosen from on
    validation) and the strengths ``alphas`` tried on the chosen checkpoint (None: keep
    ``alpha``)."""

    alpha: float = 1.0
    alphas: list[float] | None = field(default_factory=lambda: list(DEFAULT_ALPHAS))
    loss: str = "kl"
    lr: float | None = None
    lrs: list[float] | None = None
    max_steps: int = 200
    batch_size: int = 16
    spans_only: bool = False
    ppl_bound: float = 1.1
    eval_every: int = 10
    keep_weight: float | None = None
    keep_weights: list[float] | None = None
    patience: int = 2
    seed: int = 0

    OPTIONAL: ClassVar[dict[str, str]] = {"lr": "float", "keep_weight": "float"}
    SEQUENCES: ClassVar[dict[str, str]] = {"alphas": "float", "lrs": "float", "keep_weights": "float"}
    FLAGS: ClassVar[tuple[str, ...]] = ("spans_only",)
    RANGES: ClassVar[dict[str, Range]] = {
        "lr": _POSITIVE, "lrs": _POSITIVE, "max_steps": _POSITIVE_INT, "batch_size": _POSITIVE_INT,
        "ppl_bound": _PPL_BOUND, "eval_every": _POSITIVE_INT, "keep_weight": _NON_NEGATIVE,
        "keep_weights": _NON_NEGATIVE, "patience": _POSITIVE_INT, "seed": SEED_RANGE,
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in LOSSES:
            raise DataFormatError(f"OffsetHparams.loss must be one of {', '.join(map(repr, LOSSES))}, "
                                  f"not {self.loss!r}")
        if self.alphas is not None and any(not (abs(a) > 0) for a in self.alphas):
            raise DataFormatError("OffsetHparams.alphas must be non-zero strengths (or null to keep alpha)")
        _number("OffsetHparams.alpha", self.alpha, False)
