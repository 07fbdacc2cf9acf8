"""DAMA: debiasing by an orthogonal projection of the MLP output at the located site.

Limisiewicz, Mareček & Musil, "Debiasing Algorithm through Model Adaptation" (ICLR 2024). DAMA
learns the directions of an MLP layer's *output* space along which stereotyped prompts carry
their gender signal, by partial least squares (PLS) between the layer's output at the prompts and
the gender signal of their targets, and removes them from the layer for every input:
``W' = (I − P) W`` (and ``b' = (I − P) b`` where the layer has a bias), with ``P = U Uᵀ`` the
orthogonal projection onto the top-``r`` PLS directions ``U``. Here, in this harness:

1. Site: layers and token role from :func:`biaslens.edit.site.resolve_site` (an effect
   map or noise tracing, as LSDM).
2. ``X``: the MLP output (``hook_mlp_out``) at the site token of the edit prompts whose occupation
   has a stereotype direction (female rate ≠ 0.5); ``Y``: their gender signal, the pronoun the
   stereotype favours (``signal="stereotype"``: ±1) or the model's own preference
   (``signal="logodds"``: log P(f) − log P(m), centred within each template so a template's lean
   is no signal).
3. ``U``: the PLS x-weights (NIPALS, :func:`pls_directions`), orthonormalised.
4. Definitional gender is kept (``keep_rank`` > 0): the directions along which the definitional
   prompts' outputs separate female from male words (:func:`gender_subspace`) are projected out of
   ``X`` before PLS, so ``P`` is orthogonal to them and a definitional prompt's gender component
   passes unchanged. The published DAMA has no such constraint (``keep_rank=0``). Measured on
   the organism (layer 0's MLP output at the last token): 99% of the occupations' stereotype gap
   lies along the definitional gender direction, so the published projection cuts the held-out
   contrast by 84% and definitional accuracy by 21 points, and the constrained one keeps
   definitional accuracy but no longer lowers the contrast; a projection cannot tell the two
   apart there (they differ in size, not direction).
5. Several layers are edited in order, each fitted on the model edited at the layers before it
   (DAMA's iterative update).

Rank ``r`` and the layers (each located layer alone, or all of them) are chosen on the validation
templates (:class:`Validator`): the smallest validation stereotype contrast among the settings
that reduce it while definitional retention (accuracy and mean probability of the right pronoun,
on the definitional prompts the model gets right before the edit) and perplexity stay within
bounds; none such is refused. The sweep is recorded in ``delta.info["validation"]``.

The shared machinery of the projection peers (site outputs, folding an affine map of the MLP
output into its weights, the validation sweep) lives here; :mod:`biaslens.edit.erasure` uses it.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

from biaslens.edit.hparams import Range, Loadable
from biaslens.errors import BiasLensError, DataFormatError
from biaslens.hooks import act_name
from biaslens.prompts import female_rate

if TYPE_CHECKING:
    from biaslens.locate.effects import EffectMap
    import torch

    from biaslens.delta import WeightDelta
    from biaslens.model import BiasModel

__all__ = ["dama", "DAMAHparams", "PeerHparams", "pls_directions", "gender_subspace",
           "stereotype_labels", "site_outputs", "fold_output_map", "mlp_out_names", "Validator",
           "candidate_subsets", "sweep", "validation_data"]


# ------------------------------------------------------------------------------ hyperparameters
@dataclass
class PeerHparams(Loadable):
    """Retention bounds of the validation sweep shared by DAMA and LEACE (the issue's bounds,
    checked by probability margin as well as argmax): on the validation definitional prompts the
    unedited model separates (P(right pronoun) / (P(right) + P(wrong)) ≥ ``separated_share``), at
    most ``max_definitional_drop`` of them may flip and their mean share of the right pronoun may
    fall by at most ``max_share_drop``; factual-probe accuracy may fall by at most
    ``max_facts_drop``; perplexity on the model's general text (first ``ppl_tokens`` tokens) may
    rise by at most ``max_ppl_rise`` (relative)."""

    separated_share: float = 0.9
    max_definitional_drop: float = 0.01
    max_share_drop: float = 0.02
    max_facts_drop: float = 0.01
    max_ppl_rise: float = 0.02
    ppl_tokens: int = 10_000
    batch_size: int = 256

    RANGES: ClassVar[dict[str, Range]] = {
        "separated_share": (0.5, 1, False), "max_definitional_drop": (0, 1, False),
        "max_share_drop": (0, 1, False), "max_facts_drop": (0, 1, False),
        "max_ppl_rise": (0, None, False), "ppl_tokens": (1, None, False),
        "batch_size": (1, None, False),
    }


@dataclass
class DAMAHparams(PeerHparams):
    """DAMA (Limisiewicz et al. 2024) as described in :mod:`biaslens.edit.projection`.

    ``rank``: the projection's rank r (0 = choose it on the validation templates from ``ranks``);
    ``signal``: ``"stereotype"`` (±1, the pronoun the occupation's rate favours) or
    ``"logodds"`` (the model's log P(f) − log P(m), centred per template); ``keep_rank``: the
    dimension of the definitional gender subspace the projection must stay orthogonal to
    (0 = none, the published projection).
    """

    rank: int = 0
    ranks: tuple = (1, 2, 4, 8)
    signal: str = "stereotype"
    keep_rank: int = 1

    RANGES: ClassVar[dict[str, Range]] = {**PeerHparams.RANGES, "rank": (0, None, False),
                                          "keep_rank": (0, None, False)}
    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {"signal": ("stereotype", "logodds")}

    def __post_init__(self) -> None:
        super().__post_init__()
        ranks = self.ranks
        if isinstance(ranks, (list, tuple)) and ranks and all(
                isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in ranks):
            object.__setattr__(self, "ranks", tuple(sorted(set(ranks))))
        else:
            raise DataFormatError(f"DAMAHparams.ranks must be a non-empty list of whole numbers "
                                  f">= 1, not {ranks!r}")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["ranks"] = list(self.ranks)
        return out


# ------------------------------------------------------------------------------ data at the site
def stereotype_labels(prompts: Sequence[Any]) -> tuple[list[Any], list[float]]:
    """``(prompts, labels)``: the prompts whose occupation has a stereotype direction and ±1 for
    female- (rate > 0.5) / male-stereotyped (rate < 0.5); rate 0.5 or none is skipped. Refused
    (:class:`BiasLensError`) unless both sides occur."""
    kept, labels = [], []
    for p in prompts:
        r = female_rate(p)
        if not math.isfinite(r) or r == 0.5:
            continue
        kept.append(p)
        labels.append(1.0 if r > 0.5 else -1.0)
    if not (1.0 in labels and -1.0 in labels):
        raise BiasLensError("the edit prompts need occupations on both sides of the stereotype "
                            "(female rate above and below 0.5); give occupations with their % female")
    return kept, labels


def site_outputs(model: "BiasModel", site, layer: int, batch_size: int = 256) -> "torch.Tensor":
    """The MLP output of ``layer`` at each prompt's site token, ``[n_prompts, d_model]`` float64."""
    import torch

    from biaslens.edit.keys import gather

    name = act_name("mlp_out", layer)
    return gather(model, site, [name], batch_size)[name].to(torch.float64)


def _template_groups(prompts: Sequence[Any]) -> "torch.Tensor":
    import torch

    from biaslens.evaluate.contrast import template_of

    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(template_of(p), len(index)) for p in prompts])


def _center_within(x: "torch.Tensor", groups: "torch.Tensor") -> "torch.Tensor":
    out = x.clone()
    for g in groups.unique():
        rows = groups == g
        out[rows] -= x[rows].mean(0)
    return out


def pls_directions(X: "torch.Tensor", Y: "torch.Tensor", rank: int,
                   tol: float = 1e-10) -> "torch.Tensor":
    """The first ``rank`` PLS x-weights ``[d, r']`` (r' ≤ ``rank``) of X ``[n, d]`` against Y
    ``[n, k]`` by NIPALS with deflation (Wold; sklearn's ``PLSRegression(scale=False)``
    ``x_weights_``, which DAMA uses): both centred; each weight is the dominant left singular
    vector of Xᵀ Y, then X and Y are deflated by the score t = X w. Stops early when the
    remaining cross-covariance is below ``tol`` times the first one (Y explained). Float64; the
    weights are orthonormal."""
    import torch

    X = (X - X.mean(0)).to(torch.float64)
    Y = Y.reshape(len(Y), -1).to(torch.float64)
    Y = Y - Y.mean(0)
    weights, first = [], None
    for _ in range(rank):
        C = X.T @ Y
        u, s, _ = torch.linalg.svd(C, full_matrices=False)
        if first is None:
            first = float(s[0])
        if not first or float(s[0]) <= tol * first:
            break
        w = u[:, 0]
        t = X @ w
        tt = t @ t
        if float(tt) <= 0:
            break
        X = X - torch.outer(t, X.T @ t / tt)
        Y = Y - torch.outer(t, Y.T @ t / tt)
        weights.append(w)
    if not weights:
        return torch.zeros((X.shape[1], 0), dtype=torch.float64)
    return torch.stack(weights, 1)


def gender_subspace(model: "BiasModel", keep_prompts: Sequence[Any], layer: int, role: str,
                    rank: int, batch_size: int = 256) -> "torch.Tensor | None":
    """``[d_model, rank']`` orthonormal directions of the definitional gender at ``layer``'s MLP
    output: the top singular directions of the per-template differences between the mean output
    of female and of male definitional words (at the site token). None without keep prompts or
    with ``rank`` 0, or when the definitional outputs do not differ by gender at this layer."""
    import torch

    from biaslens.edit.keys import site_batch

    if rank <= 0 or not keep_prompts:
        return None
    prompts = list(keep_prompts)
    site = site_batch(model, prompts, role, "none")
    X = site_outputs(model, site, layer, batch_size)
    female = torch.tensor([female_rate(p) >= 0.5 for p in prompts])
    groups = _template_groups(prompts)
    diffs = []
    for g in groups.unique():
        f, m = (groups == g) & female, (groups == g) & ~female
        if f.any() and m.any():
            diffs.append(X[f].mean(0) - X[m].mean(0))
    if not diffs:
        return None
    _, s, vh = torch.linalg.svd(torch.stack(diffs), full_matrices=False)
    keep = int(min(rank, int((s > s[0] * 1e-8).sum()))) if float(s[0]) > 0 else 0
    return vh[:keep].T.contiguous() if keep else None


# ------------------------------------------------------------------------------ folding
def mlp_out_names(model: "BiasModel", layer: int) -> list[str]:
    """The MLP output weight of ``layer`` and its bias where the family has one (GPT-2, NeoX,
    OPT; not LLaMA's ``down_proj``)."""
    names = [model.mlp_out_name(layer)]
    bias = model.arch.name("mlp_out", layer, suffix="bias")
    if bias in model.params:
        names.append(bias)
    return names


def fold_output_map(model: "BiasModel", layer: int, M: "torch.Tensor",
                    shift: "torch.Tensor | None" = None) -> dict[str, Any]:
    """Make ``layer``'s MLP output ``y`` become ``(I − M) y + shift`` for every input, by writing
    ``W' = (I − M) W`` and ``b' = (I − M) b + shift`` (float64, then the weights' dtype). Where the
    layer has no bias the constant ``shift`` cannot be written and is dropped (reported as
    ``shift_dropped_norm``). Returns what was folded."""
    import torch

    names = mlp_out_names(model, layer)
    W = model.mlp_out_matrix(layer)
    I = torch.eye(M.shape[0], dtype=torch.float64, device=M.device)
    A = (I - M.to(torch.float64)).to(W.device)
    if not torch.isfinite(A).all() or (shift is not None and not torch.isfinite(shift).all()):
        raise BiasLensError(f"the projection for layer {layer} is not finite; nothing was changed")
    W64 = W.to(torch.float64)
    new_W = A @ W64
    native = new_W.T if model.arch.mlp_out_layout == "conv1d" else new_W
    update = {names[0]: native.to(dtype=W.dtype).contiguous()}
    info: dict[str, Any] = {"layer": layer,
                            "relative_update": float((new_W - W64).norm() / W64.norm().clamp(min=1e-30))}
    if len(names) > 1:
        b = model.param(names[1]).detach()
        new_b = A @ b.to(device=A.device, dtype=torch.float64)
        if shift is not None:
            new_b = new_b + shift.to(device=A.device, dtype=torch.float64)
        update[names[1]] = new_b.to(dtype=b.dtype)
        info["bias"] = "folded"
    else:
        info["bias"] = "none"
        if shift is not None:
            info["bias"] = "absent: constant dropped"
            info["shift_dropped_norm"] = float(shift.norm())
    model.restore(update)
    return info


# ------------------------------------------------------------------------------ validation
class Validator:
    """Scores a (candidate) edit on the validation data against the unedited model.

    ``contrast``: mean |stereotype contrast| over validation templates
    (:func:`biaslens.evaluate.contrast.contrast_from_logprobs`); ``definitional_accuracy`` and
    ``definitional_share``: the fraction still right and the mean P(right)/(P(right)+P(wrong)) on
    the validation definitional prompts the unedited model separates (the issue: argmax survives
    on margins that collapse, so the margin is bounded too); ``facts``: factual-probe accuracy;
    ``perplexity`` on the general text.
    """

    def __init__(self, model: "BiasModel", prompts: Sequence[Any], definitional: Sequence[Any],
                 ppl_text, facts: Sequence[tuple[str, str]] = (), hp: PeerHparams | None = None):
        hp = hp or PeerHparams()
        self.model, self.hp, self.ppl_text = model, hp, ppl_text
        self.prompts, self.definitional, self.facts = list(prompts), list(definitional), list(facts)
        if not self.prompts:
            raise BiasLensError("no validation prompts: the model's defaults have no validation templates")
        margin = self._margins(self.definitional) if self.definitional else []
        cut = math.log(hp.separated_share / (1.0 - hp.separated_share)) if hp.separated_share < 1 else math.inf
        self.right = [p for p, m in zip(self.definitional, margin) if m >= cut]
        self.base = self.measure()

    def _lp(self, prompts):
        from biaslens.evaluate.probes import pronoun_logprobs

        return pronoun_logprobs(self.model, prompts, min(self.hp.batch_size, 64), desc="validation")

    def _margins(self, prompts):
        """log P(right pronoun) − log P(wrong pronoun) of definitional prompts."""
        import numpy as np

        lp = self._lp(prompts)
        female = np.array([female_rate(p) >= 0.5 for p in prompts])
        return np.where(female, lp[:, 1] - lp[:, 0], lp[:, 0] - lp[:, 1])

    def measure(self) -> dict[str, float]:
        import numpy as np

        from biaslens.evaluate import perplexity
        from biaslens.evaluate.contrast import contrast_from_logprobs

        con = contrast_from_logprobs(self._lp(self.prompts), self.prompts)
        out = {"contrast": float(con["mean_abs_contrast"])}
        if self.right:
            margin = self._margins(self.right)
            out["definitional_accuracy"] = float((margin > 0).mean())
            out["definitional_share"] = float((1.0 / (1.0 + np.exp(-margin))).mean())
        if self.facts:
            from biaslens.evaluate import fact_accuracy

            out["facts"] = float(fact_accuracy(self.model, self.facts)["accuracy"])
        out["perplexity"] = float(perplexity(self.model, self.ppl_text, max_tokens=self.hp.ppl_tokens,
                                             per_line=True)["perplexity"])
        return out

    def violations(self, m: dict[str, float]) -> list[str]:
        """The bounds ``m`` breaks (empty: within bounds)."""
        hp, b, out = self.hp, self.base, []
        if not all(math.isfinite(v) for v in m.values()):
            return ["non-finite"]
        if "definitional_accuracy" in m and 1.0 - m["definitional_accuracy"] > hp.max_definitional_drop + 1e-12:
            out.append("definitional accuracy")
        if "definitional_share" in m and b["definitional_share"] - m["definitional_share"] > hp.max_share_drop:
            out.append("definitional margin")
        if "facts" in m and b["facts"] - m["facts"] > hp.max_facts_drop + 1e-12:
            out.append("facts")
        if m["perplexity"] / b["perplexity"] - 1.0 > hp.max_ppl_rise:
            out.append("perplexity")
        return out

    def bounds(self) -> dict[str, Any]:
        return {"separated_share": self.hp.separated_share,
                "max_definitional_drop": self.hp.max_definitional_drop,
                "max_share_drop": self.hp.max_share_drop, "max_facts_drop": self.hp.max_facts_drop,
                "max_ppl_rise": self.hp.max_ppl_rise, "facts": len(self.facts),
                "definitional_prompts_checked": len(self.right),
                "definitional_prompts": len(self.definitional),
                "validation_prompts": len(self.prompts), "ppl_tokens": self.hp.ppl_tokens}


def candidate_subsets(layers: list[int], explicit: bool) -> list[list[int]]:
    """The layer sets a sweep tries: the given layers when they were given, else each located
    layer alone and (with several) all of them."""
    if explicit or len(layers) == 1:
        return [list(layers)]
    return [[l] for l in layers] + [list(layers)]


def sweep(model: "BiasModel", validator: Validator, candidates: list[dict[str, Any]],
          apply: Callable[[dict[str, Any]], Any], names: list[str],
          stop_after_failure: Callable[[dict, dict], bool] | None = None,
          progress: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Try each candidate setting (``apply`` edits the model in place), score it with
    ``validator``, restore the weights ``names``; return ``(best, rows)``: the setting with the
    smallest validation contrast among those within the bounds that reduce it, and every row.
    ``stop_after_failure(c, prev)`` skips a candidate when a weaker one of its family broke a
    bound; a candidate whose edit is refused is recorded as such. Refused
    (:class:`BiasLensError`) when no setting reduces the contrast within bounds."""
    snap = model.snapshot(names)
    rows: list[dict[str, Any]] = []
    failed: list[dict] = []
    try:
        for i, cand in enumerate(candidates):
            if stop_after_failure is not None and any(stop_after_failure(cand, f) for f in failed):
                rows.append({**cand, "skipped": "a weaker setting of this family broke a bound"})
                continue
            t = time.perf_counter()
            try:
                diag = apply(cand)
                m = validator.measure()
            except BiasLensError as exc:
                rows.append({**cand, "within_bounds": False, "violations": [f"refused: {exc}"]})
                failed.append(cand)
                continue
            finally:
                model.restore(snap)
            bad = validator.violations(m)
            row = {**cand, **{k: round(v, 6) for k, v in m.items()}, "within_bounds": not bad,
                   "violations": bad, "seconds": round(time.perf_counter() - t, 2)}
            if isinstance(diag, dict) and "rank_used" in diag:
                row["rank_used"] = diag["rank_used"]
            rows.append(row)
            if bad:
                failed.append(cand)
            if progress:
                print(f"biaslens: validation {i + 1}/{len(candidates)} {_label(cand)}: contrast "
                      f"{m['contrast']:.4f}{'' if not bad else ' (breaks ' + ', '.join(bad) + ')'}",
                      file=sys.stderr)
    finally:
        model.restore(snap)
    base = validator.base["contrast"]
    for r in rows:
        if r.get("within_bounds") and not r["contrast"] < base:
            r["within_bounds"], r["violations"] = False, ["no contrast reduction"]
    ok = [r for r in rows if r.get("within_bounds")]
    if not ok:
        tried = "; ".join(f"{_label(r)}: {', '.join(r['violations'])}" for r in rows if "violations" in r)
        raise BiasLensError(f"no setting reduced the validation contrast ({base:.4f}) within the "
                            f"retention bounds ({tried}); pass explicit layers (and rank) to force "
                            "one, or loosen max_definitional_drop / max_share_drop / max_ppl_rise")
    best = min(ok, key=lambda r: r["contrast"])
    return best, rows


def _label(c: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in c.items() if k in ("layers", "rank"))


def validation_data(model: "BiasModel"):
    from biaslens.defaults import defaults_for

    d = defaults_for(model)
    return (d.occupation_prompts("edit", "validation"), d.definitional_prompts("validation"),
            d.ppl_text, d.facts())


# ------------------------------------------------------------------------------ DAMA
def _signal(model: "BiasModel", prompts: list, labels: list[float], kind: str,
            batch_size: int) -> "torch.Tensor":
    import torch

    if kind == "stereotype":
        return torch.tensor(labels, dtype=torch.float64)[:, None]
    from biaslens.evaluate.probes import pronoun_logprobs

    lp = torch.as_tensor(pronoun_logprobs(model, prompts, min(batch_size, 64), desc="dama signal"),
                         dtype=torch.float64)
    return _center_within((lp[:, 1] - lp[:, 0])[:, None], _template_groups(prompts))


def _projection(model, site, layer, Y, keep_prompts, role, rank, hp) -> tuple["torch.Tensor", dict]:
    """``U`` [d, r'] at ``layer`` on the model as it is now, and diagnostics."""
    import torch

    X = site_outputs(model, site, layer, hp.batch_size)
    K = gender_subspace(model, keep_prompts, layer, role, hp.keep_rank, hp.batch_size)
    if K is not None:
        X = X - (X @ K) @ K.T
    B = pls_directions(X, Y, rank)
    if K is not None and B.shape[1]:
        B = B - K @ (K.T @ B)
    if B.shape[1]:  # QR keeps the order: U[:, :k] spans the first k PLS directions
        U, R = torch.linalg.qr(B)
        diag = R.diagonal().abs()
        U = U[:, diag > diag.max() * 1e-8]
    else:
        U = B
    info = {"layer": layer, "rank_used": int(U.shape[1]), "keep_rank_used": 0 if K is None else int(K.shape[1])}
    if K is not None and U.shape[1]:
        info["max_overlap_with_definitional"] = float((K.T @ U).abs().max())
    return U, info


def _apply_dama(model, site, Y, keep, role, layers, rank, hp, cache=None) -> dict[str, Any]:
    """Edit ``layers`` in order with rank-``rank`` projections; ``cache`` holds the unedited
    model's PLS directions of the first layer (they do not depend on the rank)."""
    per_layer = []
    for i, layer in enumerate(layers):
        if i == 0 and cache is not None:
            if layer not in cache:
                cache[layer] = _projection(model, site, layer, Y, keep, role, max(hp.ranks + (rank,)), hp)
            U_all, info = cache[layer]
            U, info = U_all[:, :rank], dict(info, rank_used=int(min(rank, U_all.shape[1])))
        else:
            U, info = _projection(model, site, layer, Y, keep, role, rank, hp)
        if U.shape[1] == 0:
            per_layer.append({**info, "skipped": "no PLS direction (no gender signal at this layer)"})
            continue
        U = U.to(model.device)
        info.update(fold_output_map(model, layer, U @ U.T))
        per_layer.append(info)
    if not per_layer or all("skipped" in p for p in per_layer):
        raise BiasLensError(f"DAMA found no gender direction at layers {layers}; try other layers")
    return {"layers": per_layer, "rank_used": max(p.get("rank_used", 0) for p in per_layer)}


def dama(
    model: "BiasModel",
    prompts: Sequence[Any] | None = None,
    layers: str | list[int] = "auto",
    role: str = "auto",
    effect_map: "EffectMap | str | os.PathLike | None" = None,
    hparams: DAMAHparams | dict | str | os.PathLike | None = None,
    keep_prompts: Sequence[Any] | None = None,
    progress: bool = True,
) -> "WeightDelta":
    """Debias ``model`` by DAMA at the located site (see :mod:`biaslens.edit.projection`); the model is
    left edited.

    ``prompts``: occupation prompts (default: the model's edit occupations × edit templates);
    ``keep_prompts``: definitional prompts whose gender direction the projection must spare
    (default: definitional words × edit templates; ``[]`` for none); ``layers``/``role``:
    ``"auto"`` (from ``effect_map``, or tracing) or explicit; ``hparams``: :class:`DAMAHparams`, a
    dict or a JSON path. With ``rank`` 0 or automatic layers, the rank and the layers are chosen
    on the validation templates under the retention bounds (``info["validation"]``). Returns a
    reversible :class:`~biaslens.delta.WeightDelta`; a non-finite or no-op edit is refused and
    the weights restored.
    """
    from biaslens.edit.keys import check_role, site_batch
    from biaslens.edit.common import as_hparams, default_keep_prompts, default_prompts, guarded_edit
    from biaslens.edit.site import resolve_site

    hp = as_hparams(hparams, DAMAHparams)
    prompts = default_prompts(model) if prompts is None else list(prompts)
    keep = default_keep_prompts(model) if keep_prompts is None else list(keep_prompts)
    t0 = time.perf_counter()
    explicit = layers != "auto"
    site_info = resolve_site(model, prompts, layers, role, effect_map)
    located, role = site_info["layers"], check_role(site_info["role"])
    fit, labels = stereotype_labels(prompts)
    site = site_batch(model, fit, role, "none")
    Y = _signal(model, fit, labels, hp.signal, hp.batch_size)
    subsets = candidate_subsets(located, explicit)
    ranks = [hp.rank] if hp.rank > 0 else list(hp.ranks)
    cache: dict = {}
    validation = None
    if len(subsets) * len(ranks) > 1:
        validator = Validator(model, *validation_data(model), hp=hp)
        cands = [{"layers": s, "rank": r} for s in subsets for r in ranks]
        all_names = [n for l in located for n in mlp_out_names(model, l)]
        best, rows = sweep(
            model, validator, cands,
            lambda c: _apply_dama(model, site, Y, keep, role, c["layers"], c["rank"], hp, cache),
            all_names, stop_after_failure=lambda c, f: c["layers"] == f["layers"] and c["rank"] > f["rank"],
            progress=progress)
        chosen = {"layers": best["layers"], "rank": best["rank"]}
        validation = {"base": validator.base, "bounds": validator.bounds(), "sweep": rows,
                      "chosen": chosen, "objective": "smallest validation mean |contrast| within bounds"}
    else:
        chosen = {"layers": subsets[0], "rank": ranks[0]}
    names = [n for l in chosen["layers"] for n in mlp_out_names(model, l)]
    snap, diag = guarded_edit(model, names, lambda: _apply_dama(
        model, site, Y, keep, role, chosen["layers"], chosen["rank"], hp, cache))
    info = {
        "site": {"layers": chosen["layers"], "role": role, "source": site_info["source"],
                 "located_layers": located},
        "effect_map": site_info["effect_map"],
        "rank": chosen["rank"],
        "validation": validation,
        "diagnostics": {**diag, "n_prompts": len(fit), "n_keep_prompts": len(keep),
                        "signal": hp.signal},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return model.delta_since(snap, method="dama", hparams=hp.to_dict(), info=info)
