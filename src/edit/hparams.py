"""Hyperparameters of the edit methods: dataclasses loadable from one JSON file each.

As in ROME/MEMIT (``hparams/<METHOD>/<model>.json``), a result names exactly what produced it:
every :class:`~biaslens.delta.WeightDelta` stores ``asdict(hparams)`` in its manifest.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from biaslens.errors import DataFormatError

__all__ = ["Range", "SEED_RANGE", "read_object", "Loadable", "LSDMHparams", "ROMEHparams",
           "CDAHparams", "check_file"]

T = TypeVar("T", bound="Loadable")


def read_object(path: str | Path) -> dict[str, Any]:
    """The JSON object in ``path``; a missing, non-UTF-8 or malformed file is one clear error."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, IsADirectoryError):
        raise DataFormatError(f"hyperparameter file '{path}' does not exist") from None
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"hyperparameter file '{path}' is not UTF-8 text ({exc.reason} at "
                              f"byte {exc.start}); save it as UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"hyperparameter file '{path}' is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DataFormatError(f"hyperparameter file '{path}' must hold a JSON object")
    return data


#: a field's allowed range: (low, high, low excluded); None is unbounded
Range = tuple[float | None, float | None, bool]
SEED_RANGE: Range = (0, 2**32 - 1, False)


def _span(r: Range) -> str:
    lo, hi, open_lo = r
    if hi is None:
        return f"{'>' if open_lo else '>='} {lo:g}" if lo is not None else "any value"
    return f"in {'(' if open_lo else '['}{lo:g}, {hi:g}]"


class Loadable:
    """``from_json`` / ``from_dict`` / ``to_dict`` for a dataclass. Every value is checked on
    construction against its field's annotation (``int``, ``float``, ``str``) and ``RANGES``;
    unknown keys, wrong types, non-finite numbers and out-of-range values raise
    :class:`DataFormatError` naming the field, the value and what is allowed."""

    RANGES: ClassVar[dict[str, Range]] = {}
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __post_init__(self) -> None:
        name = type(self).__name__
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            where = f"{name}.{f.name}"
            if kind == "int":
                if isinstance(v, bool) or not isinstance(v, int):
                    raise DataFormatError(f"{where} must be a whole number, not {v!r}")
            elif kind == "float":
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise DataFormatError(f"{where} must be a number, not {v!r}")
                if not math.isfinite(v):
                    raise DataFormatError(f"{where} must be a finite number, not {v!r}")
                v = float(v)
                object.__setattr__(self, f.name, v)
            elif kind == "str":
                if not isinstance(v, str):
                    raise DataFormatError(f"{where} must be a string, not {v!r}")
                choices = self.CHOICES.get(f.name)
                if choices and v not in choices:
                    raise DataFormatError(f"{where} must be one of {', '.join(map(repr, choices))}, "
                                          f"not {v!r}")
            r = self.RANGES.get(f.name)
            if r is not None:
                lo, hi, open_lo = r
                if (lo is not None and (v < lo or (open_lo and v == lo))) or (hi is not None and v > hi):
                    raise DataFormatError(f"{where} must be {_span(r)}, not {v!r}")

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        if not isinstance(data, dict):
            raise DataFormatError(f"{cls.__name__} hyperparameters must be a JSON object / dict, "
                                  f"not {type(data).__name__}")
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise DataFormatError(
                f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}"
            )
        return cls(**data)

    @classmethod
    def from_json(cls: type[T], path: str | Path) -> T:
        data = read_object(path)
        try:
            return cls.from_dict(data)
        except DataFormatError as exc:
            raise DataFormatError(f"{path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


@dataclass
class LSDMHparams(Loadable):
    """LSDM (Cai et al. 2024; docs/methods/lsdm.md), in the MEMIT family (Meng et al. 2023).

    Target values (MEMIT ``compute_z``): a residual δ per key column, added to the residual
    stream after the last edited layer at the site's token, starts from ``v_newton_steps``
    minimum-norm Gauss-Newton steps on the gap (cheap: one backward pass each; they stop once the
    mean squared gap is ≤ ``v_tol``, an RMS gap of 0.03 nats by default), then is
    optimised with Adam for ``v_steps`` steps of ``v_lr`` on ``(log P(f) - log P(m))² + kl_weight·KL + v_weight_decay·
    ‖δ‖²/‖h‖²``, with ‖δ‖ clamped to ``clamp_norm_factor·‖h‖``. The KL term compares the
    original and edited next-token distributions with the gendered pair merged into one outcome,
    so it keeps the pair's total mass and everything else while letting he/she rebalance.

    Update (MEMIT eq. 14): ΔW = R Kᵀ (λ·C + K Kᵀ + w·K_keep K_keepᵀ)⁻¹, λ = ``mom2_weight``,
    C = E[k kᵀ] over ``cov_tokens`` tokens of general text (``cov_seq_len``-token windows),
    w = ``keep_weight`` (definitional prompts as keep constraints with zero residual; 100 by
    default: on the organism 10 cost 1.3 to 2.0 points of definitional accuracy, 100 none, see
    docs/results/edit.md), plus
    ``ridge``·mean(diag λC)·I so the system stays definite when C has fewer tokens than the MLP width.

    ``average_keys``: ``"auto"`` averages keys over templates per subject for subject roles
    (MEMIT) and keeps one column per prompt for the ``last`` role (the last word differs by
    template, so the edit must see many endings); ``"subject"`` or ``"none"`` force either.

    ``key_space`` (at the ``last`` role the key is mostly the template's last word; see
    docs/results/edit.md for what each choice does on held-out templates): ``"full"`` solves with
    the keys and residuals as they are; ``"centered"`` removes each template's mean key and mean
    residual (over its occupations) before the solve, so it sees only what varies with the
    occupation; ``"subspace"`` restricts the update to the subspace the within-template key
    variation spans (ΔW = M Qᵀ, Q its leading principal directions holding ``subspace_energy``
    of that variation), so a new template's own key component is not read at all.
    ``residuals``: ``"full"`` asks each column for the whole balancing change; ``"centered"``
    only for its deviation from the template's mean change (the occupation-dependent part: the
    stereotype contrast, not the template's overall pronoun lean).

    Every edit (``biaslens.edit.lsdm``) tunes ``mom2_weight``, ``keep_weight`` and the layers on
    validation templates unless they are given (``tune="auto"``; :mod:`biaslens.edit.tune`);
    the values here are what ``tune="off"`` uses.
    """

    v_newton_steps: int = 3
    v_tol: float = 1e-3
    v_steps: int = 3
    v_lr: float = 0.1
    kl_weight: float = 1.0
    v_weight_decay: float = 0.01
    clamp_norm_factor: float = 4.0
    mom2_weight: float = 10000.0
    keep_weight: float = 100.0
    ridge: float = 1e-6
    cov_tokens: int = 50_000
    cov_seq_len: int = 128
    cov_batch_size: int = 32
    average_keys: str = "auto"
    key_space: str = "full"
    subspace_energy: float = 0.95
    residuals: str = "full"
    batch_size: int = 256
    seed: int = 0

    RANGES: ClassVar[dict[str, Range]] = {
        "v_newton_steps": (0, None, False), "v_tol": (0, None, False), "v_steps": (0, None, False),
        "v_lr": (0, 100, True), "kl_weight": (0, None, False), "v_weight_decay": (0, None, False),
        "clamp_norm_factor": (0, None, True), "mom2_weight": (0, None, False),
        "keep_weight": (0, None, False), "ridge": (0, None, False), "cov_tokens": (1, None, False),
        "cov_seq_len": (1, None, False), "cov_batch_size": (1, None, False),
        "batch_size": (1, None, False), "seed": SEED_RANGE, "subspace_energy": (0, 1, True),
    }
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {
        "average_keys": ("auto", "subject", "none"), "key_space": ("full", "centered", "subspace"),
        "residuals": ("full", "centered")}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.v_steps == 0 and self.v_newton_steps == 0:
            raise DataFormatError(f"{type(self).__name__}: v_steps and v_newton_steps are both 0, so "
                                  "the targets never move; make one of them >= 1")


@dataclass
class ROMEHparams(LSDMHparams):
    """Single-layer rank-one edit (ROME, Meng et al. 2022, eq. 2): one key k* (the mean of the
    edit prompts' keys), one target v* (a single δ shared by every prompt), and
    ΔW = (v* − W k*) (C⁻¹k*)ᵀ / (k*ᵀ C⁻¹ k*)."""


@dataclass
class CDAHparams(Loadable):
    """Counterfactual-data fine-tune of the MLP output weights of the edited layers (Cai et al.'s
    baseline; Zmigrod et al. 2019 augmentation): every pronoun sentence and its gender-swapped
    copy, language-model loss, AdamW for ``epochs`` epochs."""

    epochs: int = 3
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 32
    max_grad_norm: float = 1.0
    seed: int = 0

    RANGES: ClassVar[dict[str, Range]] = {
        "epochs": (1, None, False), "lr": (0, 100, True), "weight_decay": (0, None, False),
        "batch_size": (1, None, False), "max_grad_norm": (0, None, True), "seed": SEED_RANGE,
    }


def check_file(path: str) -> str:
    """``argparse`` type of ``--hparams``: the file must be a UTF-8 JSON object whose every field
    is valid for the method class that has it (LSDM/ROME or CDA), so bad values are refused
    before a model is loaded. Returns ``path``; the edit reads it again for its method."""
    import argparse

    try:
        data = read_object(path)
        known: set[str] = set()
        for cls in (LSDMHparams, CDAHparams):
            names = {f.name for f in fields(cls)}
            known |= names
            cls.from_dict({k: v for k, v in data.items() if k in names})
        unknown = sorted(set(data) - known)
        if unknown:
            raise DataFormatError(f"unknown field(s) {unknown}; known fields: LSDMHparams "
                                  f"{[f.name for f in fields(LSDMHparams)]}, CDAHparams "
                                  f"{[f.name for f in fields(CDAHparams)]}")
    except DataFormatError as exc:
        msg = str(exc)
        raise argparse.ArgumentTypeError(msg if str(path) in msg else f"{path}: {msg}") from None
    return path
