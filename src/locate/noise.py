"""Causal tracing by noise corruption and restoration (Meng et al. 2022, ROME §2.1; docs/methods/tracing.md).

1. Clean run: metric ``m`` (default ``log P(female) − log P(male)``) at each prompt's last token.
2. Corrupted runs: Gaussian noise ``ε ~ N(0, ν²)`` added to the token embeddings of every subject
   token (all subject roles), ``ν = noise_scale × std(embedding matrix)``, ``n_samples`` draws
   per prompt (seeded).
3. Restoration: in each corrupted run, put back the clean residual stream (``resid_pre``), MLP
   output or attention output of layer ``l`` at every position of one token role (optionally a
   window of ``window`` layers around ``l`` for MLP/attention, as ROME does), and measure ``m``.
4. ``IE = σ · (m(corrupted, restored) − m(corrupted))`` and ``TE = σ · (m(clean) − m(corrupted))``,
   each averaged over noise samples, where ``σ = sign(m(clean))`` is the prompt's clean direction
   (a "nurse" prompt leans she, an "engineer" prompt leans he), so opposite stereotypes add up
   instead of cancelling.

Normalisation (a choice the paper leaves open): per-prompt values are ``IE_p / mean_p(TE_p)`` so
the map's mean is the ratio of mean indirect to mean total effect (1.0 = the site restores the
whole bias); dividing each prompt by its own TE explodes when a prompt's TE is near 0.
``normalize=False`` keeps raw metric units.

Severing (ROME Fig. 1e/f): ``sever=("mlp",)`` adds a map ``resid_sever_mlp``: the residual
restored at (l, role) while the MLP outputs at that role in layers ≥ l stay frozen at their
corrupted values, which shows how much of the restored effect flows through the MLPs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from biaslens.errors import BiasLensError
from biaslens.hooks import act_name
from biaslens.locate.effects import EffectMap
from biaslens.locate.patching import (
    LAYER_HOOKS, Base, Patch, PatchEngine, clean_source, layer_variants, metric_rows, role_masks,
)
from biaslens.prompts import ROLES

if TYPE_CHECKING:
    from biaslens.model import BiasModel
    from biaslens.prompts import TokenBatch

__all__ = ["SUBJECT_ROLES", "prepare", "subject_mask", "embedding_std", "noise_base",
           "signed_effects", "trace_noise"]

SUBJECT_ROLES = ("subject_first", "subject_middle", "subject_last")


def prepare(model: "BiasModel", prompts: Sequence[Any], metric: Callable | None):
    """Encode prompts (every one needs a subject) and pick the default pronoun metric."""
    from biaslens.metrics import LogitMetric, pronoun_log_ratio
    from biaslens.model import require_single_model

    require_single_model(model, "tracing")
    prompts = list(prompts)
    if not prompts:
        raise BiasLensError("no prompts to trace; give at least one prompt with a subject")
    batch = model.encode(prompts)
    missing = [p.text for p, pos in zip(batch.prompts, batch.positions("subject_last")) if not pos]
    if missing:
        raise BiasLensError(
            f"{len(missing)} prompt(s) have no subject to corrupt, e.g. {missing[0]!r}; "
            "give each prompt a subject (the occupation word)")
    metric = metric or pronoun_log_ratio(model, batch.prompts)
    name = metric.name if isinstance(metric, LogitMetric) else getattr(metric, "__name__", "custom metric")
    return batch, metric, name


def subject_mask(batch: "TokenBatch") -> torch.Tensor:
    """``[batch, pos]`` True on every subject token."""
    return batch.role_mask("subject_first") | batch.role_mask("subject_middle") | batch.role_mask("subject_last")


def embedding_std(model: "BiasModel") -> float:
    """Empirical standard deviation of the token embedding matrix (ROME's noise unit)."""
    return float(model.param(model.arch.name("embed")).detach().float().std())


def noise_base(model: "BiasModel", batch: "TokenBatch", n_samples: int = 10, noise_scale: float = 3.0,
               seed: int = 0) -> tuple[Base, float]:
    """Base rows ``p * n_samples + s``: prompt ``p`` with noise draw ``s`` on its subject tokens."""
    nu = noise_scale * embedding_std(model)
    gen = torch.Generator().manual_seed(seed)
    B, T = batch.input_ids.shape
    eps = torch.randn((B, n_samples, T, model.d_model), generator=gen) * nu
    eps = eps * subject_mask(batch).cpu()[:, None, :, None]
    delta = eps.reshape(B * n_samples, T, model.d_model).to(model.device, model.dtype)
    return Base.from_batch(batch, n_samples, delta), nu


def signed_effects(values: torch.Tensor, clean: torch.Tensor, corrupted: torch.Tensor,
                   present: torch.Tensor, normalize: bool) -> tuple[np.ndarray, dict[str, Any]]:
    """``values [L, roles, B, S]`` → per-prompt ``[B, L, roles]`` signed (and normalised) IE.

    ``clean [B]``, ``corrupted [B, S]``, ``present [roles, B]`` (False → NaN).
    """
    sign = torch.where(clean >= 0, 1.0, -1.0)
    corr = corrupted.mean(-1)
    te = sign * (clean - corr)
    ie = sign * (values.mean(-1) - corr)  # [L, roles, B]
    ie = torch.where(present[None], ie, torch.full_like(ie, float("nan")))
    te_mean = float(te.mean())
    scale = te_mean if normalize else 1.0
    meta = {"te": te_mean, "te_per_prompt": te.tolist(), "clean_metric": clean.tolist(),
            "corrupted_metric": corr.tolist(), "sign": sign.tolist(), "normalized": normalize}
    if normalize and abs(te_mean) < 1e-6:
        raise BiasLensError(
            "the corruption does not change the metric (total effect ≈ 0), so effects cannot be "
            "normalised; raise noise_scale, check the prompts' subjects, or pass normalize=False")
    return (ie / scale).permute(2, 0, 1).cpu().numpy(), meta


def trace_noise(
    model: "BiasModel",
    prompts: Sequence[Any],
    components: Sequence[str] = ("resid", "mlp", "attn"),
    window: int = 1,
    n_samples: int = 10,
    noise_scale: float = 3.0,
    metric: Callable | None = None,
    seed: int = 0,
    roles: Sequence[str] = ROLES,
    sever: Sequence[str] = (),
    normalize: bool = True,
    n_boot: int = 1000,
    max_tokens: int = 8192,
    max_rows: int | None = 256,
    progress: bool = True,
) -> EffectMap:
    """ROME-style causal trace of the bias metric over components × layers × token roles.

    Returns an :class:`EffectMap` (method ``"noise"``) whose effect at (component, layer, role)
    is the signed indirect effect of restoring that site, normalised by the total effect.

    ``max_rows``: corrupted rows (prompts × ``n_samples``) traced at a time, so that working
    memory stays bounded whatever the number of prompts (the patch engine keeps every block's
    activations, keys and values of its base rows); the noise is drawn for all prompts first,
    so the map does not depend on it. None: every prompt in one run.
    """
    components = list(components)
    batch, metric, metric_name = prepare(model, prompts, metric)
    if max_rows is not None and max_rows < 1:
        raise BiasLensError(f"max_rows must be at least 1 (got {max_rows}); or None for one run")
    L, B, roles = model.n_layers, len(batch), list(roles)
    base, nu = noise_base(model, batch, n_samples, noise_scale, seed)
    hooks = [act_name(LAYER_HOOKS[c], l) for c in components for l in range(L)]
    hooks += [act_name("resid_pre", l) for l in range(L)]
    sever_hooks = [act_name(LAYER_HOOKS[s], l) for s in sever for l in range(L)]
    step = B if max_rows is None else max(1, max_rows // n_samples)
    parts = [list(range(a, min(B, a + step))) for a in range(0, B, step)]
    keys = list(components) + [f"resid_sever_{s}" for s in sever]
    clean, corrupted, values, early = [], [], {k: [] for k in keys}, []
    for idx in tqdm(parts, desc="noise trace", disable=not progress or len(parts) < 2, leave=False):
        sub = batch.select(idx)
        rows = slice(idx[0] * n_samples, (idx[-1] + 1) * n_samples)
        delta = base.embed_delta[rows, : sub.input_ids.shape[1]]
        sub_base = Base.from_batch(sub, n_samples, delta)
        sub_metric = metric.subset(torch.tensor(idx)) if hasattr(metric, "subset") else metric
        src, clean_last = clean_source(model, sub, hooks, sub_base.prompt_idx)
        engine = PatchEngine(model, sub_base, {"clean": src}, sub_metric, cache_hooks=sever_hooks,
                             max_tokens=max_tokens, progress=progress and len(parts) == 1)
        clean.append(metric_rows(sub_metric, clean_last, torch.arange(len(sub), device=clean_last.device)))
        corrupted.append(engine.base_metric.reshape(len(sub), n_samples))
        early.append(engine.early_start)
        masks = list(role_masks(sub, sub_base, roles).values())
        sweeps = {c: layer_variants(c, range(L), masks, L, window if c != "resid" else 1) for c in components}
        for s in sever:
            sweeps[f"resid_sever_{s}"] = _severed_variants(s, L, masks)
        for key, variants in sweeps.items():
            values[key].append(engine.run(variants, desc=f"noise trace {key}").reshape(L, len(roles), len(sub), n_samples))
        del engine, src
    clean_t, corrupted_t = torch.cat(clean), torch.cat(corrupted)
    present = torch.stack([batch.role_mask(r).any(1) for r in roles]).to(clean_t.device)
    per_prompt, meta = {}, {}
    for key in keys:
        per_prompt[key], meta = signed_effects(torch.cat(values[key], 2), clean_t, corrupted_t, present, normalize)
    meta.update({"noise_std": nu, "noise_scale": noise_scale, "n_samples": n_samples, "seed": seed,
                 "window": window, "sever": list(sever), "exact_engine_early_start": all(early),
                 "runs": len(parts)})
    return EffectMap.from_per_prompt(
        per_prompt, model=model.name, method="noise", metric=metric_name, layers=range(L),
        roles=roles, n_boot=n_boot, seed=seed, meta=meta)


def _severed_variants(severed: str, n_layers: int, masks: Sequence[torch.Tensor]):
    """Residual restored at (l, role) with ``severed`` outputs at that role frozen (source
    ``"base"``, the corrupted run) in layers ``l..L-1``."""
    out = []
    for l in range(n_layers):
        for m in masks:
            freeze = tuple(Patch(act_name(LAYER_HOOKS[severed], j), j, m, "base") for j in range(l, n_layers))
            out.append((Patch(act_name("resid_pre", l), l, m, "clean"),) + freeze)
    return out

