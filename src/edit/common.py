"""What every editor shares: its default data, the general-text corpus, hyperparameters given as
a dataclass, dict or JSON path, and the guard that refuses a non-finite or no-op edit."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from biaslens.errors import BiasLensError

if TYPE_CHECKING:
    from biaslens.model import BiasModel

__all__ = ["default_prompts", "default_keep_prompts", "resolve_corpus", "explicit_fields", "guarded_edit",
           "as_hparams"]


def default_prompts(model: "BiasModel") -> list:
    """The model's edit prompts: edit occupations × edit templates (:mod:`biaslens.defaults`)."""
    from biaslens.defaults import defaults_for

    return defaults_for(model).occupation_prompts("edit", "edit")


def default_keep_prompts(model: "BiasModel") -> list:
    """The model's definitional keep prompts (definitional words × edit templates)."""
    from biaslens.defaults import defaults_for

    return defaults_for(model).definitional_prompts("edit")


def resolve_corpus(model: "BiasModel", corpus: str | os.PathLike | None) -> Path:
    """``corpus``, or the model's default general text for key statistics."""
    if corpus is not None:
        return Path(corpus)
    from biaslens.defaults import defaults_for

    return defaults_for(model).corpus


def explicit_fields(hparams: Any) -> set[str]:
    """The hyperparameters a caller gave: the keys of a dict or JSON file; every field of an
    :class:`LSDMHparams` object (it names every value); none for ``None``."""
    from dataclasses import fields

    if hparams is None:
        return set()
    if isinstance(hparams, dict):
        return set(hparams)
    if isinstance(hparams, (str, os.PathLike)):
        from biaslens.edit.hparams import read_object

        return set(read_object(hparams))
    return {f.name for f in fields(hparams)} if hasattr(hparams, "__dataclass_fields__") else set()


def guarded_edit(model: "BiasModel", names: list[str], fn) -> tuple[dict, Any]:
    """``(snapshot, fn())``; on any error, or NaN/inf in the weights ``names`` afterwards, the
    weights are restored and the error raised (a non-finite edit is a :class:`BiasLensError`)."""
    snap = model.snapshot(names)
    try:
        out = fn()
        bad = model.check_finite(names)
        if bad:
            raise BiasLensError(f"the edit produced NaN/inf in {bad[0]}; the weights were restored: "
                                "use stronger regularisation (mom2_weight) or a smaller step (v_lr, lr)")
        import torch

        if all(torch.equal(model.param(n), t) for n, t in snap.items()):
            raise BiasLensError(f"the edit left {', '.join(names)} unchanged (its targets did not "
                                "move): nothing to export; try other layers or a larger step (v_lr, lr)")
    except BaseException:
        model.restore(snap)
        raise
    return snap, out


def as_hparams(hparams: Any, cls: type):
    if hparams is None:
        return cls()
    if isinstance(hparams, cls):
        return hparams
    if isinstance(hparams, dict):
        return cls.from_dict(hparams)
    if isinstance(hparams, (str, os.PathLike)):
        return cls.from_json(hparams)
    raise BiasLensError(f"hparams must be a {cls.__name__}, a dict or a JSON path, not {type(hparams).__name__}")
