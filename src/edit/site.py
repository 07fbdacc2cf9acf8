"""Where an edit goes: an :class:`~biaslens.locate.EffectMap` (given, loaded from
``effects.json``, or traced) → the layers and the token role (docs/methods/lsdm.md, "The site").

Every editor (LSDM, ROME, CDA, DAMA, LEACE) resolves its site here; LSDM's tuner takes its
candidate roles and layer windows from here too. The per-role arithmetic lives on the map
(:meth:`EffectMap.role_maxima`, :meth:`EffectMap.effect_at`, :meth:`EffectMap.best_layers`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Sequence

from biaslens.edit.keys import check_role
from biaslens.errors import BiasLensError
from biaslens.prompts import SINGLE_ROLES

if TYPE_CHECKING:
    from biaslens.locate.effects import EffectMap
    from biaslens.model import BiasModel

__all__ = ["summary", "trace", "best_edit_role", "site_map", "resolve_site", "check_layers", "parse_layers",
           "candidate_roles", "candidate_windows", "reach"]


def summary(effect_map, role: str, layers: list[int]) -> dict[str, Any]:
    """What the manifest records of the map that chose the site: its method, metric and size, the
    best MLP effect per role, the effect at each edited layer and the top MLP sites."""
    return {
        "method": getattr(effect_map, "method", None),
        "metric": getattr(effect_map, "metric", None),
        "n_prompts": getattr(effect_map, "n_prompts", None),
        "mlp_best_effect_by_role": effect_map.role_maxima("mlp"),
        "mlp_effect_at_site": {int(l): effect_map.effect_at("mlp", l, role)
                               for l in layers if l in effect_map.layers and role in effect_map.roles},
        "top_mlp_sites": [
            {"layer": int(s.layer), "role": s.role, "effect": float(s.effect)}
            for s in effect_map.top_sites(k=5, component="mlp")
        ],
    }


def trace(model: "BiasModel", prompts: Sequence[Any], max_prompts: int = 256, seed: int = 0):
    """Noise tracing of the MLPs (:func:`biaslens.locate.locate`) on at most ``max_prompts`` of
    the prompts (a seeded sample), to choose the site."""
    import random

    from biaslens.locate import locate

    prompts = list(prompts)
    if len(prompts) > max_prompts:
        prompts = random.Random(seed).sample(prompts, max_prompts)
    return locate(model, prompts, method="noise", components=("mlp",), seed=seed)


def best_edit_role(effect_map) -> str:
    """The map's best MLP role among those with one token per prompt (``subject_first``,
    ``subject_last``, ``last``): keys need one position per prompt."""
    scores = effect_map.role_maxima("mlp", roles=SINGLE_ROLES)
    if not scores:
        raise BiasLensError("the effect map has no subject_first/subject_last/last role to edit at")
    return max(scores, key=scores.get)


def site_map(model: "BiasModel", prompts: Sequence[Any], effect_map: "EffectMap | str | os.PathLike | None" = None) -> tuple[Any, str]:
    """``(effect map, source)``: ``effect_map`` (an EffectMap or a path to ``effects.json``,
    checked against the model) with source ``"effect_map"``, else fresh noise tracing of
    ``prompts`` (:func:`trace`) with source ``"traced"``."""
    if effect_map is None:
        return trace(model, prompts), "traced"
    import sys

    where = f"effect map '{effect_map}'" if isinstance(effect_map, (str, os.PathLike)) else "the effect map"
    if isinstance(effect_map, (str, os.PathLike)):
        from biaslens.locate import EffectMap

        effect_map = EffectMap.load(effect_map)
    if hasattr(effect_map, "check_model"):  # another layer count is refused
        note = effect_map.check_model(model, where)
        if note:
            print(f"biaslens: warning: {note}", file=sys.stderr)
    return effect_map, "effect_map"


def resolve_site(model: "BiasModel", prompts: Sequence[Any], layers: Any = "auto",
                 role: str = "auto", effect_map: "EffectMap | str | os.PathLike | None" = None, k: int = 2) -> dict[str, Any]:
    """``{"layers", "role", "source", "effect_map"}``: explicit values win; ``"auto"`` ones come
    from ``effect_map`` (an EffectMap or a path to ``effects.json``), else from fresh tracing.
    ``"map"`` holds the map itself (or None)."""
    if isinstance(layers, str) and layers != "auto":
        layers = parse_layers(layers)
    summary_ = None
    source = "explicit"
    if effect_map is not None:
        effect_map, _ = site_map(model, prompts, effect_map)
    if layers == "auto" or role == "auto":
        if effect_map is None:
            effect_map, source = site_map(model, prompts)
        else:
            source = "effect_map"
        if role == "auto":
            role = best_edit_role(effect_map)
        if layers == "auto":
            # off the last token, the last layer's MLP output never reaches the prediction
            allowed = range(reach(role, model.n_layers))
            if not allowed:
                raise BiasLensError(f"{model.spec} has one layer: only role 'last' can be edited")
            layers = effect_map.best_layers("mlp", role, k, candidates=allowed)
    layers = check_layers(model, layers, role)
    if effect_map is not None:
        summary_ = summary(effect_map, role, layers)
    return {"layers": layers, "role": role, "source": source, "effect_map": summary_, "map": effect_map}


def check_layers(model: "BiasModel", layers: Sequence[int], role: str) -> list[int]:
    """Sorted, distinct, in range, and able to reach the prediction at ``role``; else a clear error."""
    layers = sorted(int(l) for l in layers)
    if not layers or len(set(layers)) != len(layers):
        raise BiasLensError(f"edit layers must be distinct and non-empty, not {layers}")
    bad = [l for l in layers if not 0 <= l < model.n_layers]
    if bad:
        raise BiasLensError(f"layer(s) {bad} out of range: {model.spec} has layers 0..{model.n_layers - 1}")
    check_role(role)
    if role != "last" and layers[-1] == model.n_layers - 1:
        raise BiasLensError(
            f"layer {layers[-1]} is the last layer: its MLP output at role '{role}' cannot reach the "
            "next-token prediction (no attention comes after it); use role 'last' or earlier layers")
    return layers


def parse_layers(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise BiasLensError(f"layers must be 'auto' or comma-separated integers like 3,4, not {text!r}") from None


def candidate_roles(effect_map, n_layers: int, min_ratio: float = 0.25) -> list[str]:
    """The one-token roles (``subject_first``, ``subject_last``, ``last``) to tune at, best first:
    those whose best MLP effect (over the layers that can reach the prediction from there) is at
    least ``min_ratio`` of the best role's. On organism-llama the bias is read at the
    occupation's last token (layer 0) and again at the last token (layer 1, 40% of it); the
    validation templates choose between them."""
    best = {r: v for r in SINGLE_ROLES
            for v in [effect_map.role_maxima("mlp", roles=[r], below=reach(r, n_layers)).get(r)]
            if v is not None}
    if not best:
        raise BiasLensError("the effect map has no subject_first/subject_last/last role to edit at")
    lead = max(best.values())
    ranked = sorted(best, key=lambda r: -best[r])
    return [r for r in ranked if lead <= 0 or best[r] >= min_ratio * lead] or ranked[:1]


def reach(role: str, n_layers: int) -> int:
    """Layers below this can be edited at ``role``: off the last token the last layer's MLP
    output never reaches the prediction (no attention comes after it)."""
    return n_layers if role == "last" else n_layers - 1


def candidate_windows(effect_map, role: str, n_layers: int, top: int = 2,
                      min_ratio: float = 0.0) -> list[list[int]]:
    """Layer windows to try: the ``top`` best layers at ``role`` (MLP effects; off the last
    token the last layer cannot reach the prediction) whose effect is at least ``min_ratio`` of
    the best one's, alone, best first, then adjacent pairs among them."""
    import numpy as np

    below = reach(role, n_layers)
    col = np.asarray(effect_map.effects["mlp"], dtype=float)[:, list(effect_map.roles).index(role)]
    layers = [int(l) for l in effect_map.layers]
    ranked = sorted((l for l, e in zip(layers, col) if np.isfinite(e) and l < below),
                    key=lambda l: -col[layers.index(l)])
    best = ranked[: max(1, top)]
    if best and col[layers.index(best[0])] > 0:
        lead = col[layers.index(best[0])]
        best = [l for l in best if col[layers.index(l)] >= min_ratio * lead]
    if not best:
        raise BiasLensError(f"the effect map has no finite MLP effect at role '{role}' to choose layers from")
    return [[l] for l in best] + [[a, a + 1] for a in sorted(best) if a + 1 in best]
