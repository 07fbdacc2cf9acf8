"""Hyperparameters of the edit methods: dataclasses loadable from one JSON file each.

As in ROME/MEMIT (``hparams/<METHOD>/<model>.json``), a result names exactly what produced it:
every :class:`~biaslens.delta.WeightDelta` stores ``asdict(hparams)`` in its manifest.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from biaslens.errors import DataFormatError

T = TypeVar("T", bound="_Loadable")


class _Loadable:
    """``from_json`` / ``from_dict`` / ``to_dict`` for a dataclass, refusing unknown keys."""

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise DataFormatError(
                f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}"
            )
        return cls(**data)

    @classmethod
    def from_json(cls: type[T], path: str | Path) -> T:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise DataFormatError(f"hyperparameter file '{path}' does not exist") from None
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"hyperparameter file '{path}' is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise DataFormatError(f"hyperparameter file '{path}' must hold a JSON object")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


@dataclass
class LSDMHparams(_Loadable):
    """LSDM (Cai et al. 2024, METHODS.md §2), in the MEMIT family (Meng et al. 2023).

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
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.average_keys not in ("auto", "subject", "none"):
            raise DataFormatError(
                f"average_keys must be 'auto', 'subject' or 'none', not {self.average_keys!r}"
            )
        if self.v_steps < 0 or self.v_newton_steps < 0:
            raise DataFormatError("v_steps and v_newton_steps must be >= 0")
        for name in ("cov_tokens", "cov_seq_len", "cov_batch_size", "batch_size"):
            if getattr(self, name) <= 0:
                raise DataFormatError(f"LSDMHparams.{name} must be positive, not {getattr(self, name)}")
        if self.mom2_weight < 0 or self.keep_weight < 0:
            raise DataFormatError("mom2_weight and keep_weight must be >= 0")


@dataclass
class ROMEHparams(LSDMHparams):
    """Single-layer rank-one edit (ROME, Meng et al. 2022, eq. 2): one key k* (the mean of the
    edit prompts' keys), one target v* (a single δ shared by every prompt), and
    ΔW = (v* − W k*) (C⁻¹k*)ᵀ / (k*ᵀ C⁻¹ k*)."""


@dataclass
class CDAHparams(_Loadable):
    """Counterfactual-data fine-tune of the MLP output weights of the edited layers (Cai et al.'s
    baseline; Zmigrod et al. 2019 augmentation): every pronoun sentence and its gender-swapped
    copy, language-model loss, AdamW for ``epochs`` epochs."""

    epochs: int = 3
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 32
    max_grad_norm: float = 1.0
    seed: int = 0
