"""LSDM: least-squares debiasing of the MLP output weights at the located site (Cai et al. 2024).

The method of docs/methods/lsdm.md, in the MEMIT family (Meng et al. 2023):

1. Site: layers and a token role, from an :class:`~biaslens.locate.EffectMap` (``"auto"`` runs
   noise tracing when no map is given) or given explicitly.
2. Keys k (the MLP key: the input to the output projection) at the site token, one column per
   occupation (averaged over templates) or, at the ``last`` role, one per prompt.
3. Targets z = h + δ at the last edited layer (:mod:`biaslens.edit.targets`).
4. For each edited layer l in order (MEMIT Alg. 1): recompute keys and the current hidden state,
   R = (z − h_cur) / (number of layers left), and
   ΔW_l = R Kᵀ (λ·C_l + K Kᵀ + w·K_keep K_keepᵀ)⁻¹     (MEMIT eq. 14, plus keep constraints)
   solved in float64 with a linear solver, never an explicit inverse.
5. By default (``tune="auto"``) λ, the keep weight and the layer window are not fixed numbers:
   :mod:`biaslens.edit.tune` chooses them on validation templates under retention bounds, each
   candidate a solve on cached statistics and targets (:class:`EditCache`).

Default data (:mod:`biaslens.defaults`): edit occupations × edit templates, keep constraints =
definitional words × the same templates; for the embedded organisms, their template bank
(src/data/organism_bank.json). docs/results/edit.md has the numbers on held-out templates.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from biaslens.edit.common import (as_hparams, default_keep_prompts, default_prompts, explicit_fields,
                                  guarded_edit, resolve_corpus)
from biaslens.edit.hparams import LSDMHparams
from biaslens.edit.keys import check_role, gather, group_mean, site_batch
from biaslens.edit.site import best_edit_role, check_layers, parse_layers, resolve_site, site_map, summary
from biaslens.edit.solve import least_squares_update
from biaslens.errors import BiasLensError
from biaslens.prompts import SINGLE_ROLES
from biaslens.hooks import act_name

if TYPE_CHECKING:
    from biaslens.locate.effects import EffectMap
    import torch
    from jaxtyping import Float

    from biaslens.delta import WeightDelta
    from biaslens.model import BiasModel

__all__ = ["EditCache", "template_mean", "occupation_basis", "solve_layer", "apply_lsdm",
           "output_change_ratio", "lsdm"]


# ------------------------------------------------------------------------------------ defaults
# ------------------------------------------------------------------------------------ the site
# ------------------------------------------------------------------------------------ the edit
class EditCache:
    """What the candidates of one edit share: the site batches of the edit and keep prompts,
    their activations in the *unedited* model and the targets per top layer, each computed once
    on first use (:mod:`biaslens.edit.tune` runs many solves on one cache). Use it only while the
    model holds the weights it was made on (the tuner restores them between candidates)."""

    def __init__(self, model: "BiasModel", prompts: Sequence[Any], keep_prompts: Sequence[Any],
                 role: str, hp: LSDMHparams):
        self.model, self.role, self.hp = model, role, hp
        self.site = site_batch(model, prompts, role, hp.average_keys)
        self.keep = site_batch(model, keep_prompts, role, "none") if keep_prompts else None
        self.n_keep_prompts = len(keep_prompts) if keep_prompts else 0
        self.acts: dict[str, "torch.Tensor"] = {}
        self.keep_acts: dict[str, "torch.Tensor"] = {}
        self.targets: dict[int, tuple["torch.Tensor", dict]] = {}
        self.seconds = {"targets": 0.0, "activations": 0.0}

    def target(self, layer: int, progress: bool = True) -> tuple["torch.Tensor", dict]:
        """``(z, diagnostics)`` at ``resid_post`` of ``layer`` (:func:`compute_targets`)."""
        from biaslens.edit.targets import compute_targets

        if layer not in self.targets:
            t = time.perf_counter()
            want = {act_name("mlp_key", layer): None, act_name("resid_post", layer): None}
            self.targets[layer] = compute_targets(self.model, self.site, layer, self.hp,
                                                  progress=progress, acts_out=want)
            self.acts.update({k: v for k, v in want.items() if k not in self.acts})
            self.seconds["targets"] += time.perf_counter() - t
        return self.targets[layer]

    def site_acts(self, names: Sequence[str]) -> dict[str, "torch.Tensor"]:
        """The unedited model's activations of ``names`` at the site tokens (one pass for the
        missing ones)."""
        missing = [n for n in names if n not in self.acts]
        if missing:
            t = time.perf_counter()
            self.acts.update(gather(self.model, self.site, missing, self.hp.batch_size))
            self.seconds["activations"] += time.perf_counter() - t
        return {n: self.acts[n] for n in names}

    def keep_keys(self, layer: int) -> "torch.Tensor | None":
        """The unedited model's keys of the keep prompts at ``layer``."""
        if self.keep is None:
            return None
        name = act_name("mlp_key", layer)
        if name not in self.keep_acts:
            t = time.perf_counter()
            self.keep_acts[name] = gather(self.model, self.keep, [name], self.hp.batch_size)[name]
            self.seconds["activations"] += time.perf_counter() - t
        return self.keep_acts[name]


def template_mean(x: "torch.Tensor", site) -> "torch.Tensor":
    """Each column's template mean of ``x`` (rows = columns), broadcast back to the columns."""
    if site.column_template is None:
        raise BiasLensError("key_space/residuals 'centered' or 'subspace' need one column per "
                            "prompt (average_keys 'none', the default at the last role)")
    g = site.column_template
    return group_mean(x, g, len(site.template_labels))[g]


def occupation_basis(K: "torch.Tensor", site, energy: float) -> "torch.Tensor":
    """Orthonormal ``[d_mlp, r]`` basis of the within-template variation of the keys ``K``
    (columns minus their template's mean): its leading right singular vectors holding
    ``energy`` of that variation's squared norm."""
    import torch

    Kc = (K - template_mean(K, site)).double()
    _, S, Vh = torch.linalg.svd(Kc, full_matrices=False)
    share = (S**2).cumsum(0) / (S**2).sum().clamp(min=1e-300)
    r = int((share < energy).sum()) + 1
    return Vh[: min(r, len(S))].T.contiguous()


def solve_layer(K: "torch.Tensor", R: "torch.Tensor", Kk: "torch.Tensor | None", site,
                cov: "torch.Tensor", hp: LSDMHparams, factor: "torch.Tensor | None" = None,
                ) -> tuple["torch.Tensor", dict]:
    """ΔW ``[d_model, d_mlp]`` for one layer with ``hp.key_space`` / ``hp.residuals`` (see
    :class:`LSDMHparams`), and what the solve saw (``rank`` of a subspace)."""
    extra: dict[str, Any] = {}
    if hp.residuals == "centered":
        R = R - template_mean(R, site)
    if hp.key_space == "centered":
        K = K - template_mean(K, site)
    if hp.key_space == "subspace":
        Q = occupation_basis(K, site, hp.subspace_energy)
        extra["rank"] = int(Q.shape[1])
        C = Q.T @ cov.to(Q) @ Q
        Kk_q = Kk.double() @ Q if Kk is not None else None
        M = least_squares_update(K.double() @ Q, R, C, hp.mom2_weight, Kk_q, hp.keep_weight, hp.ridge)
        return M @ Q.T, extra
    return least_squares_update(K, R, cov, hp.mom2_weight, Kk, hp.keep_weight, hp.ridge, factor), extra


def apply_lsdm(model: "BiasModel", prompts: Sequence[Any], keep_prompts: Sequence[Any],
               layers: list[int], role: str, covs: dict[int, "torch.Tensor"], hp: LSDMHparams,
               progress: bool = True, factors: dict[int, "torch.Tensor"] | None = None,
               cache: EditCache | None = None, residual_left: bool = True) -> dict[str, Any]:
    """Edit ``model`` in place (MEMIT Alg. 1 with LSDM targets); return diagnostics. ``cache``:
    an :class:`EditCache` of these prompts made on the current (unedited) weights, whose
    targets and first-layer activations are reused (its own hyperparameters set the targets;
    ``hp`` the solve). ``residual_left=False`` skips the pass that measures how much of the
    targets' change the edit left undone (the tuner's candidates)."""
    import torch

    clock = {"solve": 0.0, "activations": 0.0}
    if cache is None:
        cache = EditCache(model, prompts, keep_prompts, role, hp)
    before = dict(cache.seconds)
    site, keep = cache.site, cache.keep
    top = layers[-1]
    z_name = act_name("resid_post", top)
    z, tinfo = cache.target(top, progress)
    per_layer = []
    for i, layer in enumerate(layers):
        t = time.perf_counter()
        k_name = act_name("mlp_key", layer)
        if i == 0:  # the unedited model's, reused
            acts = cache.site_acts([k_name, z_name])
            Kk = cache.keep_keys(layer)
        else:
            acts = gather(model, site, [k_name, z_name], hp.batch_size)
            Kk = gather(model, keep, [k_name], hp.batch_size)[k_name] if keep is not None else None
        K = group_mean(acts[k_name].float(), site.group, site.n_groups)
        cur = group_mean(acts[z_name].float(), site.group, site.n_groups)
        if i == 0:
            init = (z - cur).norm(dim=-1).mean()
        R = (z - cur) / (len(layers) - i)
        clock["activations"] += time.perf_counter() - t
        t = time.perf_counter()
        dW, extra = solve_layer(K, R, Kk, site, covs[layer], hp, factors.get(layer) if factors else None)
        if not torch.isfinite(dW).all():
            raise BiasLensError(f"the LSDM update at layer {layer} is not finite; raise mom2_weight "
                                "or check the key statistics")
        W = model.mlp_out_matrix(layer)
        w_norm = float(W.double().norm())
        with torch.no_grad():
            W.add_(dW.to(device=W.device, dtype=W.dtype))
        clock["solve"] += time.perf_counter() - t
        fit = (dW @ K.double().T).T.float()
        per_layer.append({
            "layer": layer,
            "residual_norm": float(R.norm(dim=-1).mean()),
            "fit_error": float((fit - R).norm(dim=-1).mean() / R.norm(dim=-1).mean().clamp(min=1e-12)),
            "keep_shift": float((dW @ Kk.double().T).norm(dim=0).mean()) if Kk is not None else None,
            "update_norm": float(dW.norm()),
            "relative_update": float(dW.norm()) / max(w_norm, 1e-12),
            **extra,
        })
    left = None
    if residual_left:
        t = time.perf_counter()
        after = gather(model, site, [z_name], hp.batch_size)[z_name].float()
        left = (z - group_mean(after, site.group, site.n_groups)).norm(dim=-1)
        clock["activations"] += time.perf_counter() - t
    for k, v in cache.seconds.items():  # what this call added to the cache
        clock[k] = clock.get(k, 0.0) + v - before.get(k, 0.0)
    return {
        "targets": tinfo,
        "layers": per_layer,
        "n_columns": site.n_groups,
        "n_prompts": len(site),
        "n_keep_prompts": cache.n_keep_prompts,
        "target_residual_left": float(left.mean() / init.clamp(min=1e-12)) if left is not None else None,
        "seconds": {k: round(v, 3) for k, v in clock.items()},
    }


def output_change_ratio(dW, W, second_moment) -> float | None:
    """sqrt(tr(ΔW C ΔWᵀ) / tr(W C Wᵀ)) with C = E[k kᵀ] over general text: how much the edit moves
    the layer's output on general text, relative to the output itself (a weight-norm ratio can be
    large while this is small, when ΔW lies along key directions general text rarely excites).
    A diagnostic, so float32."""
    import torch

    if second_moment is None:
        return None
    C = second_moment.to(device=W.device, dtype=torch.float32)
    dW, W = dW.to(device=W.device, dtype=torch.float32), W.detach().float()
    num, den = ((dW @ C) * dW).sum(), ((W @ C) * W).sum()
    return float((num / den.clamp(min=1e-30)).clamp(min=0).sqrt())


def _same_tokens(a: EditCache, b: EditCache) -> bool:
    """Two roles that pick the same token of every edit and keep prompt (with the same key
    columns) give the same keys, targets and solves: one tuning serves both."""
    import torch

    def one(x, y) -> bool:
        if x is None or y is None:
            return x is y
        return (torch.equal(x.pos, y.pos) and torch.equal(x.group, y.group)
                and x.labels == y.labels)

    return one(a.site, b.site) and one(a.keep, b.keep)


def lsdm(
    model: "BiasModel",
    prompts: Sequence[Any] | None = None,
    layers: str | list[int] = "auto",
    role: str = "auto",
    effect_map: "EffectMap | str | os.PathLike | None" = None,
    corpus: str | os.PathLike | None = None,
    hparams: LSDMHparams | dict | str | os.PathLike | None = None,
    keep_prompts: Sequence[Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    tune: str = "auto",
    validation: Any = None,
    bounds: Any = None,
    grid: Any = None,
) -> "WeightDelta":
    """Debias ``model`` by LSDM at the located site; the model is left edited.

    ``prompts``: occupation prompts with subjects (default: :func:`default_prompts`, edit
    occupations × edit templates); ``keep_prompts``: definitional prompts whose keys must not
    move (default: :func:`default_keep_prompts`, definitional words × the same edit templates;
    ``[]`` for none); ``layers``/``role``: ``"auto"`` (from ``effect_map``, or tracing) or
    explicit; ``corpus``: general text for the key statistics (default: the model's,
    :attr:`biaslens.defaults.Defaults.corpus`); ``hparams``: :class:`LSDMHparams`, a dict or a
    JSON path.

    ``tune="auto"`` (default): λ (``mom2_weight``), ``keep_weight`` and the layer window are
    chosen on validation templates under retention bounds (:mod:`biaslens.edit.tune`; ``grid``,
    ``bounds`` and ``validation`` override its :class:`~biaslens.edit.tune.TuneGrid`,
    :class:`~biaslens.edit.tune.TuneBounds` and data) — except what is given: explicit
    ``layers`` fix the window, and ``mom2_weight`` / ``keep_weight`` fix themselves when they
    are keys of a dict or JSON ``hparams`` or come in an :class:`LSDMHparams` object (which
    names every value). ``tune="off"`` uses the hyperparameters as they are and, for
    ``layers="auto"``, the map's two best layers.

    Returns a :class:`~biaslens.delta.WeightDelta` whose ``info`` holds the site, the effect-map
    summary that chose it and per-layer diagnostics, with the tuning sweep and choice in
    ``info["diagnostics"]["tuning"]``. A non-finite edit is refused (:class:`BiasLensError`) and
    the weights restored.
    """
    from dataclasses import replace

    from biaslens.edit.covariance import cached_factors, key_covariances
    from biaslens.model import require_single_model

    require_single_model(model, "LSDM")
    if tune not in ("auto", "off"):
        raise BiasLensError(f"tune must be 'auto' or 'off', not {tune!r}")
    hp = as_hparams(hparams, LSDMHparams)
    fixed = explicit_fields(hparams)
    if isinstance(layers, str) and layers != "auto":
        layers = parse_layers(layers)
    prompts = default_prompts(model) if prompts is None else list(prompts)
    keep = default_keep_prompts(model) if keep_prompts is None else list(keep_prompts)
    t0 = time.perf_counter()
    tune_layers = tune == "auto" and layers == "auto"
    tune_lam = tune == "auto" and "mom2_weight" not in fixed
    tune_keep = tune == "auto" and "keep_weight" not in fixed and bool(keep)
    tuning = tune_layers or tune_lam or tune_keep
    t_map = 0.0
    if tuning:
        t_map = time.perf_counter()
        emap, map_source = (site_map(model, prompts, effect_map) if (tune_layers or role == "auto"
                            or effect_map is not None) else (None, "explicit"))
        from biaslens.edit.site import candidate_roles, candidate_windows
        from biaslens.edit.tune import TuneGrid

        grid = grid or TuneGrid()
        # role "auto" while tuning the layers: every one-token role whose MLP effect is a place
        # the bias lives (candidate_roles) is tuned, and validation chooses among them
        roles = (candidate_roles(emap, model.n_layers, grid.min_effect_ratio) if role == "auto"
                 and tune_layers else [best_edit_role(emap) if role == "auto" else role])
        for r in roles:
            check_role(r)
        role_windows = {r: [check_layers(model, w, r) for w in (
            candidate_windows(emap, r, model.n_layers, grid.top_layers, grid.min_effect_ratio)
            if tune_layers else [check_layers(model, layers, r)])] for r in roles}
        t_map = time.perf_counter() - t_map
        role = roles[0]
        site = {"layers": None, "role": role, "source": "tuned" if tune_layers else
                ("explicit" if not isinstance(layers, str) else map_source), "map": emap}
        need = sorted({l for ws in role_windows.values() for w in ws for l in w})
    else:
        site = resolve_site(model, prompts, layers, role, effect_map)
        need = site["layers"]
    role = site["role"]
    corpus_path = resolve_corpus(model, corpus)
    t_cov = time.perf_counter()
    paths: dict = {}
    covs = key_covariances(model, need, corpus_path, hp.cov_tokens, hp.cov_seq_len,
                           hp.cov_batch_size, cache_dir, progress=progress, paths_out=paths)
    t_cov = time.perf_counter() - t_cov
    record = None
    t_tune = time.perf_counter()
    if tuning:
        from biaslens.edit.tune import Candidate, default_validation, tune_lsdm

        val = validation if validation is not None else default_validation(
            model, prompts, keep, corpus_path, hp.cov_tokens)
        results, caches, same = {}, {}, {}
        for r in list(roles):
            caches[r] = EditCache(model, prompts, keep, r, hp)
            twin = next((r0 for r0 in caches if r0 != r and role_windows[r0] == role_windows[r]
                         and _same_tokens(caches[r0], caches[r])), None)
            if twin is not None:  # e.g. subject_first = subject_last when every subject is one token
                same[r] = twin
                roles.remove(r)
                del caches[r]
                continue
            results[r] = tune_lsdm(model, caches[r], role_windows[r], covs, hp, val,
                                   mom2_weights=None if tune_lam else [hp.mom2_weight],
                                   keep_weights=None if tune_keep else [hp.keep_weight],
                                   bounds=bounds, grid=grid, progress=progress,
                                   warn=False, apply_edit=apply_lsdm)
        role = min(roles, key=lambda r: Candidate.rank(results[r].chosen))
        result, cache = results[role], caches[role]
        if not result.feasible:  # once, for the role chosen
            result.warn()
        site["role"] = role
        hp = replace(hp, mom2_weight=result.mom2_weight, keep_weight=result.keep_weight)
        layers = result.layers
        record = result.to_dict()
        record["tuned"] = [n for n, on in (("layers", tune_layers), ("role", len(roles) > 1),
                                           ("mom2_weight", tune_lam), ("keep_weight", tune_keep)) if on]
        if same:
            record["roles_on_the_same_tokens"] = same  # tuned once, under the first name
        if len(roles) > 1:
            record["roles"] = {r: {"chosen": results[r].to_dict()["chosen"], "windows": results[r].windows,
                                   "sweep": results[r].to_dict()["sweep"]} for r in roles}
            record["sweep"] = [dict(c, role=r) for r in roles for c in results[r].to_dict()["sweep"]]
    else:
        cache = EditCache(model, prompts, keep, role, hp)
        layers = site["layers"]
    t_tune = time.perf_counter() - t_tune
    factors = (cached_factors({l: covs[l] for l in layers}, {l: paths[l] for l in layers if l in paths},
                              hp.mom2_weight, hp.ridge) if hp.mom2_weight > 0 else None)
    names = [model.mlp_out_name(l) for l in layers]
    snap, diag = guarded_edit(model, names, lambda: apply_lsdm(
        model, prompts, keep, layers, role, covs, hp, progress, factors, cache))
    if record is not None:
        diag["tuning"] = record
    summary_ = summary(site["map"], role, layers) if site.get("map") is not None else site.get("effect_map")
    info = {
        "site": {"layers": layers, "role": role, "source": site["source"]},
        "effect_map": summary_,
        "corpus": corpus_path.name,
        "diagnostics": diag,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    diag["seconds"]["key_statistics"] = round(t_cov, 3)
    if tuning:  # the effect map (tracing, unless one was given) and the whole sweep
        diag["seconds"]["site_map"] = round(t_map, 3)
        diag["seconds"]["tuning"] = round(t_tune, 3)
    return model.delta_since(snap, method="lsdm", hparams=hp.to_dict(), info=info)


