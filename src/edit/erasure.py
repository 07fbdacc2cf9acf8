"""LEACE at the located MLP output, folded into the layer's weights.

Belrose et al., "LEACE: Perfect linear concept erasure in closed form" (NeurIPS 2023), with
EleutherAI's ``concept-erasure`` package (its :class:`~concept_erasure.LeaceFitter`). LEACE is the
affine map ``x' = x − M (x − μ)``, ``M = proj_left @ proj_right`` (rank ≤ the concept's
dimension), of least mean squared change after which no linear classifier predicts the concept
from ``x'`` better than a constant: the class-conditional means of ``x'`` coincide on the data it
was fitted on. Here:

1. Site: layers and token role from :func:`biaslens.edit.site.resolve_site`.
2. ``x``: the MLP output (``hook_mlp_out``) at the site token of the edit prompts; the concept:
   the stereotype direction of the prompt's occupation (1 female rate > 0.5, 0 below; rate 0.5
   is skipped).
3. ``keep="definitional"`` (default): the definitional prompts' outputs enter the fit too, with
   the mean label (stereotype-neutral): they add variance, not covariance, so the concept erased
   is the same (the occupations' cross-covariance) while LEACE's least-squares change is now
   measured over them as well and spares their gender where it can. ``keep="none"`` fits the
   occupation prompts alone.
4. Folding: the layer's output ``y = W k + b`` becomes ``(I − M) y + M μ``, i.e.
   ``W' = (I − M) W`` and ``b' = (I − M) b + M μ`` — for every input, so the edit is a plain
   weight change that exports as a Hugging Face model. Where the MLP output has no bias (LLaMA's
   ``down_proj``) the constant ``M μ`` cannot be written into existing weights and is dropped: the
   output becomes ``(I − M) y``, its unconditional mean moves by ``−M μ`` (reported per layer as
   ``shift_dropped_norm`` and relative to the mean output, ``shift_dropped_relative``), while the
   erasure guarantee is kept (a constant shift moves both class means alike). Measured on
   ``organism-llama`` (layer 0, ``subject_last``): the constant is 3% of the mean output's norm,
   and the folded edit scores as the exact affine eraser applied in a hook does (validation
   perplexity 3.833 vs 3.832, definitional accuracy 0.965 vs 0.967, contrast 0.032 vs 0.034).
5. Several layers are erased in order, each fitted on the model erased at the layers before it.

The layers (each located layer alone, or all of them) are chosen on the validation templates
under the retention bounds, as for DAMA (:class:`biaslens.edit.projection.Validator`); the sweep is in
``delta.info["validation"]``. ``diagnostics`` report, per layer, how much of the cross-covariance
the eraser leaves (0 = the exact guarantee; the package's covariance-trace constraint, when it
activates, trades some of it for stability).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

from biaslens.edit.projection import (PeerHparams, Validator, validation_data, candidate_subsets,
                                fold_output_map, mlp_out_names, site_outputs, stereotype_labels,
                                sweep)
from biaslens.edit.hparams import Range
from biaslens.errors import BiasLensError

if TYPE_CHECKING:
    from biaslens.locate.effects import EffectMap
    import torch

    from biaslens.delta import WeightDelta
    from biaslens.model import BiasModel

__all__ = ["leace", "LEACEHparams", "fit_eraser", "eraser_map", "fold_eraser"]


@dataclass
class LEACEHparams(PeerHparams):
    """LEACE at the MLP output (see :mod:`biaslens.edit.erasure`): ``keep`` = ``"definitional"``
    (definitional prompts in the fit, stereotype-neutral) or ``"none"``; ``method`` =
    ``"leace"`` (the package's LEACE) or ``"orth"`` (its orthogonal-projection variant)."""

    keep: str = "definitional"
    method: str = "leace"

    RANGES: ClassVar[dict[str, Range]] = dict(PeerHparams.RANGES)
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"keep": ("definitional", "none"),
                                                     "method": ("leace", "orth")}


def fit_eraser(model: "BiasModel", site, layer: int, labels: Sequence[float], keep_site=None,
               method: str = "leace", batch_size: int = 256):
    """``(eraser, diagnostics)``: a :class:`concept_erasure.LeaceEraser` (float64) fitted on the
    MLP output of ``layer`` at ``site``'s tokens with the binary concept ``labels`` (1/0 or ±1),
    plus ``keep_site``'s outputs labelled with the mean label."""
    import torch
    from concept_erasure import LeaceFitter

    X = site_outputs(model, site, layer, batch_size)
    z = (torch.as_tensor(list(labels), dtype=torch.float64, device=X.device) > 0).to(torch.float64)
    Xf, zf = X, z
    if keep_site is not None and len(keep_site):
        Xk = site_outputs(model, keep_site, layer, batch_size)
        Xf = torch.cat([X, Xk])
        zf = torch.cat([z, torch.full((len(Xk),), float(z.mean()), dtype=torch.float64, device=X.device)])
    fitter = LeaceFitter(X.shape[1], 1, method=method, dtype=torch.float64, device=X.device)
    fitter.update(Xf, zf[:, None])
    eraser = fitter.eraser
    M, _ = eraser_map(eraser)
    if not torch.isfinite(M).all():
        raise BiasLensError(f"the LEACE eraser at layer {layer} is not finite (degenerate "
                            "statistics of the site's outputs); nothing was changed")
    sxz = fitter.sigma_xz[:, 0]
    gap = X[z == 1].mean(0) - X[z == 0].mean(0)
    I = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    diag = {
        "layer": layer,
        "n_fit": len(Xf),
        "n_keep": len(Xf) - len(X),
        "eraser_rank": int(torch.linalg.matrix_rank(M)),
        "residual_cross_covariance": float(((I - M) @ sxz).norm() / sxz.norm().clamp(min=1e-300)),
        "class_mean_gap_before": float(gap.norm()),
        "class_mean_gap_after": float(((I - M) @ gap).norm()),
    }
    return eraser, diag


def eraser_map(eraser) -> tuple["torch.Tensor", "torch.Tensor | None"]:
    """``(M, shift)`` with ``eraser(x) == x − M (x − μ) == (I − M) x + shift`` (column vectors):
    ``M = proj_left @ proj_right`` and ``shift = M μ`` (None for an eraser without a bias)."""
    M = eraser.proj_left @ eraser.proj_right
    shift = None if eraser.bias is None else M @ eraser.bias
    return M, shift


def fold_eraser(model: "BiasModel", layer: int, eraser) -> dict[str, Any]:
    """Fold ``eraser`` into ``layer``'s MLP output weights and bias (:func:`eraser_map`,
    :func:`biaslens.edit.projection.fold_output_map`); without a bias the constant is dropped and its
    size reported, also relative to the norm of the mean output the eraser was fitted on."""
    M, shift = eraser_map(eraser)
    M = M.to(model.device)
    shift = None if shift is None else shift.to(model.device)
    info = fold_output_map(model, layer, M, shift)
    if "shift_dropped_norm" in info and eraser.bias is not None:
        info["shift_dropped_relative"] = float(shift.norm() / eraser.bias.norm().clamp(min=1e-300))
    return info


def _apply(model, site, labels, keep_site, layers, hp) -> dict[str, Any]:
    per_layer = []
    for layer in layers:
        eraser, diag = fit_eraser(model, site, layer, labels, keep_site, hp.method, hp.batch_size)
        if diag["eraser_rank"] == 0:
            raise BiasLensError(f"LEACE found nothing to erase at layer {layer}: the stereotype's "
                                "cross-covariance with the outputs there is below concept-erasure's "
                                "svd_tol (0.01); try other layers")
        diag.update(fold_eraser(model, layer, eraser))
        per_layer.append(diag)
    return {"layers": per_layer}


def leace(
    model: "BiasModel",
    prompts: Sequence[Any] | None = None,
    layers: str | list[int] = "auto",
    role: str = "auto",
    effect_map: "EffectMap | str | os.PathLike | None" = None,
    hparams: LEACEHparams | dict | str | os.PathLike | None = None,
    keep_prompts: Sequence[Any] | None = None,
    progress: bool = True,
) -> "WeightDelta":
    """Erase the stereotype linearly from the MLP output at the located site (LEACE, see
    :mod:`biaslens.edit.erasure`), folded into the weights; the model is left edited.

    ``prompts``: occupation prompts (default: the model's edit occupations × edit templates);
    ``keep_prompts``: definitional prompts fitted as stereotype-neutral (default with
    ``keep="definitional"``: definitional words × edit templates; ``[]`` for none);
    ``layers``/``role``: ``"auto"`` (from ``effect_map``, or tracing) or explicit; with automatic
    layers each located layer and all of them are tried on the validation templates under the
    retention bounds (``info["validation"]``). ``hparams``: :class:`LEACEHparams`, a dict or a
    JSON path. Returns a reversible :class:`~biaslens.delta.WeightDelta`; a non-finite or no-op
    edit is refused and the weights restored.
    """
    from biaslens.edit.keys import check_role, site_batch
    from biaslens.edit.common import as_hparams, default_keep_prompts, default_prompts, guarded_edit
    from biaslens.edit.site import resolve_site

    hp = as_hparams(hparams, LEACEHparams)
    prompts = default_prompts(model) if prompts is None else list(prompts)
    if keep_prompts is None:
        keep = default_keep_prompts(model) if hp.keep == "definitional" else []
    else:
        keep = list(keep_prompts) if hp.keep == "definitional" else []
    t0 = time.perf_counter()
    explicit = layers != "auto"
    site_info = resolve_site(model, prompts, layers, role, effect_map)
    located, role = site_info["layers"], check_role(site_info["role"])
    fit, labels = stereotype_labels(prompts)
    site = site_batch(model, fit, role, "none")
    keep_site = site_batch(model, keep, role, "none") if keep else None
    subsets = candidate_subsets(located, explicit)
    validation = None
    if len(subsets) > 1:
        validator = Validator(model, *validation_data(model), hp=hp)
        best, rows = sweep(model, validator, [{"layers": s} for s in subsets],
                           lambda c: _apply(model, site, labels, keep_site, c["layers"], hp),
                           [n for l in located for n in mlp_out_names(model, l)], progress=progress)
        chosen = best["layers"]
        validation = {"base": validator.base, "bounds": validator.bounds(), "sweep": rows,
                      "chosen": {"layers": chosen},
                      "objective": "smallest validation mean |contrast| within bounds"}
    else:
        chosen = subsets[0]
    names = [n for l in chosen for n in mlp_out_names(model, l)]
    snap, diag = guarded_edit(model, names, lambda: _apply(model, site, labels, keep_site, chosen, hp))
    info = {
        "site": {"layers": chosen, "role": role, "source": site_info["source"],
                 "located_layers": located},
        "effect_map": site_info["effect_map"],
        "validation": validation,
        "diagnostics": {**diag, "n_prompts": len(fit), "n_keep_prompts": len(keep),
                        "concept": "stereotype direction: female rate > 0.5 (1) vs < 0.5 (0)"},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return model.delta_since(snap, method="leace", hparams=hp.to_dict(), info=info)
