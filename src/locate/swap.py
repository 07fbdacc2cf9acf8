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
from tqdm.auto import tqdm

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
    """The two engines of a swap over one part of the prompts: base = original with swapped
    sources (NIE), and base = swapped with original sources (NDE); with the part's batches,
    metric, metrics of both prompts and stereotype signs."""

    def __init__(self, model, batch, cf_batch, metric, roles, hooks, max_tokens, progress):
        B = len(batch)
        rows = torch.arange(B, device=batch.input_ids.device)
        self.batch, self.cf_batch, self.metric = batch, cf_batch, metric
        self.valid_o = role_alignment(batch, cf_batch, roles)
        self.valid_s = role_alignment(cf_batch, batch, roles)
        src_o, last_o = clean_source(model, batch, hooks, rows)
        src_s, last_s = clean_source(model, cf_batch, hooks, rows)
        self.m_orig = metric_rows(metric, last_o, rows)
        self.m_swap = metric_rows(metric, last_s, rows)
        self.sign = stereotype_sign(batch, self.m_orig)
        self.nie = PatchEngine(model, Base.from_batch(batch), {"cf": aligned_source(src_s, self.valid_o)},
                               metric, max_tokens=max_tokens, progress=progress)
        self.nde = PatchEngine(model, Base.from_batch(cf_batch), {"cf": aligned_source(src_o, self.valid_s)},
                               metric, max_tokens=max_tokens, progress=progress)
        self.src_s_aligned = self.nie.sources["cf"]

    def effects(self, engine: PatchEngine, variants, desc: str) -> torch.Tensor:
        """``[V, B]`` ratio effects of ``variants`` on ``engine``, NaN where not patched."""
        vals = engine.run(variants, desc=desc)
        touched = torch.stack([torch.stack([p.positions.any(1) for p in v]).any(0) for v in variants])
        eff = _ratio_effect(vals, self.m_orig[None], self.sign[None])
        return torch.where(touched, eff, torch.full_like(eff, float("nan")))


class _Parts:
    """The prompts in parts of at most ``max_rows``, each traced by its own :class:`_SwapRuns`
    (built again for each pass over the parts; kept where there is one part)."""

    def __init__(self, model, batch, cf_batch, metric, roles, hooks, max_tokens, max_rows, progress):
        B = len(batch)
        step = B if max_rows is None else max(1, max_rows)
        self.parts = [list(range(a, min(B, a + step))) for a in range(0, B, step)]
        self._args = (model, batch, cf_batch, metric, roles, hooks, max_tokens, progress)
        self._kept: _SwapRuns | None = None

    def __iter__(self):
        model, batch, cf_batch, metric, roles, hooks, max_tokens, progress = self._args
        one = len(self.parts) == 1
        for idx in tqdm(self.parts, desc="swap trace", disable=not progress or one, leave=False):
            if one and self._kept is not None:
                yield self._kept
                continue
            sub, cf_sub = (batch, cf_batch) if one else (batch.select(idx), cf_batch.select(idx))
            sub_metric = metric if one or not hasattr(metric, "subset") else metric.subset(torch.tensor(idx))
            runs = _SwapRuns(model, sub, cf_sub, sub_metric, roles, hooks, max_tokens, progress and one)
            if one:
                self._kept = runs
            yield runs
            del runs


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
    max_rows: int | None = 256,
    progress: bool = True,
) -> EffectMap:
    """Vig-style mediation analysis of a subject swap: NIE/NDE maps per component × layer × role,
    per attention head, and the ``top_n`` MLP neurons by NIE (method ``"swap"``).

    ``max_rows``: prompts traced at a time (each of the two patch engines keeps every block's
    activations, keys and values of its rows), so that working memory stays bounded whatever the
    number of prompts. Every effect is per prompt, and the neuron screen sums its scores over all
    parts before it picks, so the map does not depend on it. None: every prompt in one run."""
    batch, metric, metric_name = prepare(model, prompts, metric)
    if max_rows is not None and max_rows < 1:
        raise BiasLensError(f"max_rows must be at least 1 (got {max_rows}); or None for one run")
    cf_batch = model.encode(swapped_prompts(batch.prompts, swaps))
    L, B, roles = model.n_layers, len(batch), list(roles)
    hooks = [act_name(LAYER_HOOKS[c], l) for c in components for l in range(L)]
    hooks += [act_name("z", l) for l in range(L)] if heads else []
    hooks += [act_name("mlp_key", l) for l in range(L)] if neurons else []
    parts = _Parts(model, batch, cf_batch, metric, roles, hooks, max_tokens, max_rows, progress)
    screened = neurons and L * model.d_mlp > max_exact_neurons

    per_prompt: dict[str, list] = {}
    head_parts: dict[str, list] = {"nie": [], "nde": []}
    got: dict[str, list] = {"m_orig": [], "m_swap": [], "sign": [], "nie": [], "score": []}
    for runs in parts:
        got["m_orig"].append(runs.m_orig)
        got["m_swap"].append(runs.m_swap)
        got["sign"].append(runs.sign)
        b = len(runs.batch)
        masks_o = [runs.batch.role_mask(r) & (runs.valid_o >= 0) for r in roles]
        masks_s = [runs.cf_batch.role_mask(r) & (runs.valid_s >= 0) for r in roles]
        for c in components:
            for key, engine, masks in ((c, runs.nie, masks_o), (f"{c}_nde", runs.nde, masks_s)):
                e = runs.effects(engine, layer_variants(c, range(L), masks, L, source="cf"), f"swap {key}")
                per_prompt.setdefault(key, []).append(e.reshape(L, len(roles), b).permute(2, 0, 1).cpu().numpy())
        if heads:
            for key, e in _heads(model, runs, head_role).items():
                head_parts[key].append(e)
        if neurons:
            if screened:
                got["score"].append(_neuron_scores(model, runs, neuron_role))
            else:
                got["nie"].append(_neuron_nie(model, runs, neuron_role, _all_neurons(model)))
    m_orig, m_swap, sign = (torch.cat(got[k]) for k in ("m_orig", "m_swap", "sign"))
    te = _ratio_effect(m_swap, m_orig, sign)
    per_prompt = {k: np.concatenate(v) for k, v in per_prompt.items()}
    head_info = None
    if heads:
        head_info = {"role": head_role}
        for key in ("nie", "nde"):
            mean, lo, hi = bootstrap_mean_ci(np.concatenate(head_parts[key]), n_boot=n_boot, seed=seed)
            prefix = "" if key == "nie" else "nde_"
            head_info.update({f"{prefix}effects": mean, f"{prefix}ci_low": lo, f"{prefix}ci_high": hi})
    neuron_info = None
    if neurons:
        candidates = _all_neurons(model)
        if screened:  # first-order log-y change, mean over every prompt
            s = torch.stack(got["score"]).sum(0) / B
            top = torch.topk(s, min(screen_pool, len(s))).indices.tolist()
            D = model.d_mlp
            candidates = [(i // D, i % D) for i in top]
            got["nie"] = [_neuron_nie(model, runs, neuron_role, candidates) for runs in parts]
        nie = np.concatenate(got["nie"], 1)  # [V, B]
        neuron_info = _top_neurons(model, parts, candidates, nie, neuron_role, top_n, screened, n_boot, seed)
    te_np = te.cpu().numpy()
    te_mean, te_lo, te_hi = bootstrap_mean_ci(te_np[:, None], n_boot=n_boot, seed=seed)
    meta = {"te": float(te_mean[0]), "te_ci": [float(te_lo[0]), float(te_hi[0])],
            "te_per_prompt": te_np.tolist(), "swapped": [p.text for p in cf_batch.prompts],
            "stereotype_sign": sign.tolist(), "metric_original": m_orig.tolist(),
            "metric_swapped": m_swap.tolist(), "seed": seed, "runs": len(parts.parts)}
    return EffectMap.from_per_prompt(
        per_prompt, model=model.name, method="swap", metric=metric_name, layers=range(L), roles=roles,
        n_boot=n_boot, seed=seed, heads=head_info, neurons=neuron_info, meta=meta)


def _unit_variants(hook: str, layer: int, units: Sequence[int], mask: torch.Tensor):
    return [(Patch(hook, layer, mask, "cf", int(u)),) for u in units]


def _heads(model, runs: _SwapRuns, role: str) -> dict[str, np.ndarray]:
    """Per-prompt NIE and NDE of every head at ``role``: ``{"nie", "nde"}`` → ``[B, L, H]``."""
    L, H = model.n_layers, model.n_heads
    out = {}
    for key, engine, b, valid in (("nie", runs.nie, runs.batch, runs.valid_o),
                                  ("nde", runs.nde, runs.cf_batch, runs.valid_s)):
        mask = b.role_mask(role) & (valid >= 0)
        variants = [v for l in range(L) for v in _unit_variants(act_name("z", l), l, range(H), mask)]
        out[key] = runs.effects(engine, variants, f"swap heads {key}").reshape(L, H, -1).permute(2, 0, 1).cpu().numpy()
    return out


def _all_neurons(model) -> list[tuple[int, int]]:
    return [(l, n) for l in range(model.n_layers) for n in range(model.d_mlp)]


def _neuron_scores(model, runs: _SwapRuns, role: str) -> torch.Tensor:
    """Attribution screen of every MLP neuron at ``role``: the first-order log-y change summed
    over the part's prompts, ``[L * d_mlp]`` (float64, so that parts add up as one run)."""
    from biaslens.locate.attribution import gradient_attribution

    L = model.n_layers
    mask_o = runs.batch.role_mask(role) & (runs.valid_o >= 0)
    hooks = [act_name("mlp_key", l) for l in range(L)]
    scores, _ = gradient_attribution(model, Base.from_batch(runs.batch), runs.src_s_aligned, runs.metric, hooks)
    s = torch.stack([(scores[h] * mask_o[..., None]).sum(1) for h in hooks])  # [L, B, D]
    return (-runs.sign[None, :, None] * s).double().sum(1).flatten()


def _neuron_nie(model, runs: _SwapRuns, role: str, candidates) -> np.ndarray:
    """Exact per-prompt NIE ``[V, B]`` of the ``candidates`` (layer, neuron) at ``role``."""
    mask_o = runs.batch.role_mask(role) & (runs.valid_o >= 0)
    variants = [(Patch(act_name("mlp_key", l), l, mask_o, "cf", n),) for l, n in candidates]
    return runs.effects(runs.nie, variants, "swap neurons").cpu().numpy()


def _top_neurons(model, parts: _Parts, candidates, nie: np.ndarray, role: str, top_n: int, screened: bool,
                 n_boot: int, seed: int) -> list[dict[str, Any]]:
    """The ``top_n`` candidates by mean NIE, with bootstrap CIs and their NDE."""
    mean, lo, hi = bootstrap_mean_ci(nie.T, n_boot=n_boot, seed=seed)
    order = np.argsort(-np.nan_to_num(mean, nan=-np.inf), kind="stable")[:top_n]
    best = [candidates[i] for i in order]
    nde = np.zeros((0, nie.shape[1]))
    if best:
        chunks = []
        for runs in parts:
            mask_s = runs.cf_batch.role_mask(role) & (runs.valid_s >= 0)
            nde_vars = [(Patch(act_name("mlp_key", l), l, mask_s, "cf", n),) for l, n in best]
            chunks.append(runs.effects(runs.nde, nde_vars, "swap neurons nde").cpu().numpy())
        nde = np.concatenate(chunks, 1)
    nde_mean, nde_lo, nde_hi = bootstrap_mean_ci(nde.T, n_boot=n_boot, seed=seed) if len(best) else ([], [], [])
    return [
        {"layer": int(l), "neuron": int(n), "role": role, "effect": float(mean[i]), "ci_low": float(lo[i]),
         "ci_high": float(hi[i]), "nde": float(nde_mean[j]), "nde_ci_low": float(nde_lo[j]),
         "nde_ci_high": float(nde_hi[j]), "screened": screened}
        for j, (i, (l, n)) in enumerate(zip(order, best))
    ]
