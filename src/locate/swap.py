"""Counterfactual swaps (Vig et al. 2020, causal mediation analysis of gender bias; docs/methods/tracing.md).

The subject is replaced ("The nurse said that" → "The man said that"). Token positions are aligned
by role (subject_last ↔ subject_last, last ↔ last, …), so the swap may change the number of
subject tokens; a multi-position role is aligned only where both prompts have the same number of
its tokens (otherwise that role is NaN for that prompt). With
``y(u) = P(anti-stereotypical pronoun | u) / P(stereotypical pronoun | u)``:

- total effect ``TE = y(swapped) / y(original) − 1``
- natural indirect effect ``NIE(z) = y(original, z ← z(swapped)) / y(original) − 1``
- natural direct effect ``NDE(z) = y(swapped, z ← z(original)) / y(original) − 1``

for z = a layer's residual / MLP / attention output at a role (maps ``resid``, ``mlp``, ``attn`` hold
NIE; ``*_nde`` hold NDE), an attention head (``hook_z`` per head, at ``head_role``), or one MLP
neuron (``mlp.hook_post``, the MLP key, at ``neuron_role``). The stereotypical pronoun is the one
the occupation's statistic favours when a prompt carries ``female_rate`` (organism prompts), else
the one the model prefers on the original prompt.

Neurons: every neuron is patched exactly when ``n_layers × d_mlp ≤ max_exact_neurons``; otherwise
attribution patching screens them and the best ``screen_pool`` are patched exactly. The ``top_n``
by mean NIE are kept (with NDE and bootstrap CIs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch

from biaslens.errors import BiasLensError
from biaslens.hooks import act_name
from biaslens.locate.effects import EffectMap
from biaslens.stats import bootstrap_mean_ci
from biaslens.locate.noise import prepare
from biaslens.locate.patching import (
    LAYER_HOOKS, ActSource, Base, Patch, PatchEngine, clean_source, layer_variants, metric_rows,
)
from biaslens.prompts import ROLES, Prompt, as_prompt, female_rate, subject_span

if TYPE_CHECKING:
    from biaslens.model import BiasModel
    from biaslens.prompts import TokenBatch

__all__ = ["Swaps", "swapped_prompts", "role_alignment", "aligned_source", "stereotype_sign",
           "trace_swap"]

Swaps = str | Sequence[str] | Mapping[str, str] | Callable[[Any], str]


def swapped_prompts(prompts: Sequence[Any], swaps: Swaps) -> list[Prompt]:
    """Each prompt with its subject replaced: ``swaps`` is one word for all, one per prompt, a
    ``{subject: replacement}`` mapping, or a function of the prompt."""
    ps = [as_prompt(p) for p in prompts]
    out = []
    for i, (orig, p) in enumerate(zip(prompts, ps)):
        if isinstance(swaps, str):
            new = swaps
        elif isinstance(swaps, Mapping):
            if p.subject not in swaps:
                raise BiasLensError(f"no swap given for subject {p.subject!r} (prompt {p.text!r})")
            new = swaps[p.subject]
        elif callable(swaps):
            new = swaps(orig)
        else:
            if len(swaps) != len(ps):
                raise BiasLensError(f"{len(swaps)} swaps for {len(ps)} prompts; give one per prompt")
            new = swaps[i]
        span = subject_span(p.text, p.subject)
        if span is None:
            raise BiasLensError(f"prompt {p.text!r} has no subject to swap")
        text = p.text[: span[0]] + new + p.text[span[1]:]
        out.append(Prompt(text, new, dict(p.meta)))
    return out


def role_alignment(a: "TokenBatch", b: "TokenBatch", roles: Sequence[str]) -> torch.Tensor:
    """``[batch, pos_a]``: the position in ``b`` aligned with each position of ``a`` (−1: none)."""
    align = torch.full(a.input_ids.shape, -1, dtype=torch.long, device=a.input_ids.device)
    for r in roles:
        for i, (pa, pb) in enumerate(zip(a.positions(r), b.positions(r))):
            if len(pa) == len(pb):
                for x, y in zip(pa, pb):
                    align[i, x] = y
    return align


def aligned_source(src: ActSource, align: torch.Tensor) -> ActSource:
    """Re-index a source run's activations onto the base positions given by ``align``."""
    acts = {}
    for h, a in src.acts.items():
        idx = align.clamp(min=0)
        idx = idx.reshape(idx.shape + (1,) * (a.ndim - 2)).expand(idx.shape + a.shape[2:])
        acts[h] = torch.gather(a, 1, idx)
    return ActSource(acts, src.rows)


def stereotype_sign(batch: "TokenBatch", clean: torch.Tensor) -> torch.Tensor:
    """+1 where the stereotypical pronoun is the female one, −1 where it is the male one."""
    rates = [female_rate(p) for p in batch.prompts]
    sign = torch.where(clean >= 0, 1.0, -1.0)
    for i, r in enumerate(rates):
        if r == r:  # not NaN: the prompt has a rate
            sign[i] = 1.0 if float(r) > 0.5 else -1.0
    return sign


def _ratio_effect(m: torch.Tensor, m_orig: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """``y(m)/y(m_orig) − 1`` with ``y = exp(−σ m)`` (m = log P(female) − log P(male))."""
    return torch.exp(-sign * (m - m_orig)) - 1.0


class _SwapRuns:
    """The two engines of a swap: base = original with swapped sources (NIE), and base = swapped
    with original sources (NDE)."""

    def __init__(self, model, batch, cf_batch, metric, roles, hooks, max_tokens, progress):
        B = len(batch)
        rows = torch.arange(B, device=batch.input_ids.device)
        self.valid_o = role_alignment(batch, cf_batch, roles)
        self.valid_s = role_alignment(cf_batch, batch, roles)
        src_o, last_o = clean_source(model, batch, hooks, rows)
        src_s, last_s = clean_source(model, cf_batch, hooks, rows)
        self.m_orig = metric_rows(metric, last_o, rows)
        self.m_swap = metric_rows(metric, last_s, rows)
        self.nie = PatchEngine(model, Base.from_batch(batch), {"cf": aligned_source(src_s, self.valid_o)},
                               metric, max_tokens=max_tokens, progress=progress)
        self.nde = PatchEngine(model, Base.from_batch(cf_batch), {"cf": aligned_source(src_o, self.valid_s)},
                               metric, max_tokens=max_tokens, progress=progress)
        self.src_s_aligned = self.nie.sources["cf"]


def trace_swap(
    model: "BiasModel",
    prompts: Sequence[Any],
    swaps: Swaps,
    components: Sequence[str] = ("resid", "mlp", "attn"),
    roles: Sequence[str] = ROLES,
    heads: bool = True,
    head_role: str = "last",
    neurons: bool = True,
    neuron_role: str = "subject_last",
    top_n: int = 20,
    metric: Callable | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    max_exact_neurons: int = 16384,
    screen_pool: int = 512,
    max_tokens: int = 8192,
    progress: bool = True,
) -> EffectMap:
    """Vig-style mediation analysis of a subject swap: NIE/NDE maps per component × layer × role,
    per attention head, and the ``top_n`` MLP neurons by NIE (method ``"swap"``)."""
    batch, metric, metric_name = prepare(model, prompts, metric)
    cf_batch = model.encode(swapped_prompts(batch.prompts, swaps))
    L, B, roles = model.n_layers, len(batch), list(roles)
    hooks = [act_name(LAYER_HOOKS[c], l) for c in components for l in range(L)]
    hooks += [act_name("z", l) for l in range(L)] if heads else []
    hooks += [act_name("mlp_key", l) for l in range(L)] if neurons else []
    runs = _SwapRuns(model, batch, cf_batch, metric, roles, hooks, max_tokens, progress)
    sign = stereotype_sign(batch, runs.m_orig)
    te = _ratio_effect(runs.m_swap, runs.m_orig, sign)

    def effects(engine, variants, desc):  # [V, B] ratio effects, NaN where not patched
        vals = engine.run(variants, desc=desc)
        touched = torch.stack([torch.stack([p.positions.any(1) for p in v]).any(0) for v in variants])
        eff = _ratio_effect(vals, runs.m_orig[None], sign[None])
        return torch.where(touched, eff, torch.full_like(eff, float("nan")))

    masks_o = [batch.role_mask(r) & (runs.valid_o >= 0) for r in roles]
    masks_s = [cf_batch.role_mask(r) & (runs.valid_s >= 0) for r in roles]
    per_prompt = {}
    for c in components:
        for key, engine, masks in ((c, runs.nie, masks_o), (f"{c}_nde", runs.nde, masks_s)):
            e = effects(engine, layer_variants(c, range(L), masks, L, source="cf"), f"swap {key}")
            per_prompt[key] = e.reshape(L, len(roles), B).permute(2, 0, 1).cpu().numpy()
    head_info = _heads(model, batch, cf_batch, runs, effects, head_role, n_boot, seed) if heads else None
    neuron_info = (_neurons(model, batch, cf_batch, runs, effects, metric, sign, neuron_role, top_n,
                            max_exact_neurons, screen_pool, n_boot, seed) if neurons else None)
    te_np = te.cpu().numpy()
    te_mean, te_lo, te_hi = bootstrap_mean_ci(te_np[:, None], n_boot=n_boot, seed=seed)
    meta = {"te": float(te_mean[0]), "te_ci": [float(te_lo[0]), float(te_hi[0])],
            "te_per_prompt": te_np.tolist(), "swapped": [p.text for p in cf_batch.prompts],
            "stereotype_sign": sign.tolist(), "metric_original": runs.m_orig.tolist(),
            "metric_swapped": runs.m_swap.tolist(), "seed": seed}
    return EffectMap.from_per_prompt(
        per_prompt, model=model.name, method="swap", metric=metric_name, layers=range(L), roles=roles,
        n_boot=n_boot, seed=seed, heads=head_info, neurons=neuron_info, meta=meta)


def _unit_variants(hook: str, layer: int, units: Sequence[int], mask: torch.Tensor):
    return [(Patch(hook, layer, mask, "cf", int(u)),) for u in units]


def _heads(model, batch, cf_batch, runs, effects, role, n_boot, seed) -> dict[str, Any]:
    L, H = model.n_layers, model.n_heads
    out: dict[str, Any] = {"role": role}
    for key, engine, b, valid in (("nie", runs.nie, batch, runs.valid_o), ("nde", runs.nde, cf_batch, runs.valid_s)):
        mask = b.role_mask(role) & (valid >= 0)
        variants = [v for l in range(L) for v in _unit_variants(act_name("z", l), l, range(H), mask)]
        e = effects(engine, variants, f"swap heads {key}").reshape(L, H, -1).permute(2, 0, 1).cpu().numpy()
        mean, lo, hi = bootstrap_mean_ci(e, n_boot=n_boot, seed=seed)
        prefix = "" if key == "nie" else "nde_"
        out.update({f"{prefix}effects": mean, f"{prefix}ci_low": lo, f"{prefix}ci_high": hi})
    return out


def _neurons(model, batch, cf_batch, runs, effects, metric, sign, role, top_n, max_exact, pool,
             n_boot, seed) -> list[dict[str, Any]]:
    from biaslens.locate.attribution import gradient_attribution

    L, D = model.n_layers, model.d_mlp
    mask_o = batch.role_mask(role) & (runs.valid_o >= 0)
    candidates = [(l, n) for l in range(L) for n in range(D)]
    screened = L * D > max_exact
    if screened:
        hooks = [act_name("mlp_key", l) for l in range(L)]
        scores, _ = gradient_attribution(model, Base.from_batch(batch), runs.src_s_aligned, metric, hooks)
        s = torch.stack([(scores[h] * mask_o[..., None]).sum(1) for h in hooks])  # [L, B, D]
        s = (-sign[None, :, None] * s).mean(1).flatten()  # first-order log-y change, mean over prompts
        top = torch.topk(s, min(pool, len(s))).indices.tolist()
        candidates = [(i // D, i % D) for i in top]
    variants = [(Patch(act_name("mlp_key", l), l, mask_o, "cf", n),) for l, n in candidates]
    nie = effects(runs.nie, variants, "swap neurons").cpu().numpy()  # [V, B]
    mean, lo, hi = bootstrap_mean_ci(nie.T, n_boot=n_boot, seed=seed)
    order = np.argsort(-np.nan_to_num(mean, nan=-np.inf), kind="stable")[:top_n]
    best = [candidates[i] for i in order]
    mask_s = cf_batch.role_mask(role) & (runs.valid_s >= 0)
    nde_vars = [(Patch(act_name("mlp_key", l), l, mask_s, "cf", n),) for l, n in best]
    nde = effects(runs.nde, nde_vars, "swap neurons nde").cpu().numpy() if nde_vars else np.zeros((0, len(batch)))
    nde_mean, nde_lo, nde_hi = bootstrap_mean_ci(nde.T, n_boot=n_boot, seed=seed) if len(best) else ([], [], [])
    return [
        {"layer": int(l), "neuron": int(n), "role": role, "effect": float(mean[i]), "ci_low": float(lo[i]),
         "ci_high": float(hi[i]), "nde": float(nde_mean[j]), "nde_ci_low": float(nde_lo[j]),
         "nde_ci_high": float(nde_hi[j]), "screened": screened}
        for j, (i, (l, n)) in enumerate(zip(order, best))
    ]
