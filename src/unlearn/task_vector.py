"""Negation via task vector (Dige et al. 2024, arXiv 2406.13551, after Ilharco et al. 2023).

1. Fine-tune a copy of the weights on stereotyped text (the "bias task"): θ_ft.
2. Task vector τ = θ_ft − θ_pre.
3. Negate: θ_new = θ_pre − λ·τ, with λ chosen on the validation split
   (:mod:`biaslens.unlearn.select`): the lowest validation stereotype contrast among the λ within
   the perplexity and definitional bounds (λ = 0, no change, if none lowers it). The grid
   (``lambdas``) is extended downwards when even its smallest λ breaks a bound (a large model's
   task vector can be far stronger than the organism's) and refined by bisection next to the
   best λ. The whole sweep is kept in ``delta.info["sweep"]`` and ``delta.info["selection"]``.

Keeping definitional gender. Negation extrapolates: a τ that makes the model more stereotyped
also sharpens gender after *every* gendered subject, so θ_pre − λτ blurs "The king said that he"
as much as the stereotype (on the organism the definitional margins collapsed well before the
contrast was halved). With ``keep_weight`` β > 0 the fine-tune adds β·K(θ_pre − τ), the
definitional keep term (:class:`~biaslens.unlearn.common.KeepTerm`) evaluated at the *negated*
weights: the gradient of K at θ_pre − τ reaches τ with the opposite sign, so the fine-tune learns
a τ whose negation leaves definitional predictions where they were. β = 0 is the paper's method.

With ``lora_rank = r`` the fine-tune is a *rank-r factorised fine-tune* (LoRA's parametrisation,
Hu et al. 2022, without LoRA's memory saving): W = W₀ + (α/r)·B A with B ∈ ℝ^{p×r} (zeros) and
A ∈ ℝ^{r×q} (Kaiming-uniform) for every targeted weight W ∈ ℝ^{p×q}, so τ has rank ≤ r and the
negated weight is W = W₀ − λ·(α/r)·B A. The gradients of A and B are exact but come from the
full-weight gradient G = ∂L/∂W by the chain rule (∂L/∂B = (α/r)·G Aᵀ, ∂L/∂A = (α/r)·Bᵀ G; the
keep term's gradient at the negated weights enters as −G), so no module is wrapped and every
architecture works the same. The price: the full gradient of every targeted weight is computed
and held, as in the full fine-tune; only the optimiser state shrinks (Adam keeps (p+q)·r numbers
per weight instead of p·q). It is not a way to fit a model that needs LoRA's memory (that is what
``peft`` does by wrapping the modules; it is not a dependency here). The fine-tune itself runs
in place and is undone before the sweep; the model ends with θ_pre − λ*·τ.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

from biaslens.errors import BiasLensError
from biaslens.unlearn.hparams import DEFAULT_LAMBDAS, TaskVectorHparams, resolve_hparams
from biaslens.unlearn.select import validation_for
from biaslens.unlearn.common import (Timer, encode_spans, keep_term, minibatches, model_forward,
                                     seed_all, span_nll, trainable, unique_params)

if TYPE_CHECKING:
    import torch

    from biaslens.delta import WeightDelta
    from biaslens.model import BiasModel

__all__ = ["task_vector_negation", "lora_targets", "sweep_lambdas", "DEFAULT_LAMBDAS"]

#: how many halvings below the smallest λ are tried when every λ of the grid breaks a bound
EXTEND_DOWN = 6


def lora_targets(model: "BiasModel") -> list[str]:
    """The 2-D weights LoRA adapts by default: attention q/k/v and output, MLP input and output."""
    a = model.arch
    out = []
    for layer in range(model.n_layers):
        out += a.names("attn_qkv", layer) + [a.name("attn_out", layer)]
        out += a.names("mlp_in", layer) + [a.name("mlp_out", layer)]
    return out


def _keep_at_negation(model, names, original, keep, forward, scale: float = 1.0):
    """Gradients of the keep term at the negated weights θ_pre − (θ − θ_pre), for ``names``
    (the model is put back exactly where it was)."""
    import torch

    current = {n: model.param(n).detach().clone() for n in names}
    with torch.no_grad():
        for n in names:
            model.param(n).copy_(original[n] - (current[n] - original[n]))
    for n in names:
        model.param(n).grad = None
    value = keep.loss(forward)
    value.backward()
    grads = {n: (model.param(n).grad if model.param(n).grad is not None else torch.zeros_like(current[n]))
             for n in names}
    with torch.no_grad():
        for n in names:
            model.param(n).copy_(current[n])
            model.param(n).grad = None
    return grads, float(value.detach())


def _fine_tune_full(model, names, texts, steps, lr, batch_size, rng, progress, keep=None, original=None):
    import torch
    from tqdm.auto import tqdm

    opt = torch.optim.Adam([model.param(n) for n in names], lr=lr)
    stream, losses, timer = minibatches(texts, batch_size, rng), [], Timer()
    forward = model_forward(model)
    bar = tqdm(range(steps), desc="task vector: fine-tune", disable=not progress)
    for step in bar:
        b = encode_spans(model, next(stream), spans_only=False)
        loss = span_nll(model, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if keep is not None:
            g_f = {n: model.param(n).grad for n in names}
            g_k, _ = _keep_at_negation(model, names, original, keep, forward)
            for n in names:  # d/dθ K(2θ_pre − θ) = −∇K
                model.param(n).grad = (g_f[n] if g_f[n] is not None else 0) - g_k[n]
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(nll=f"{losses[-1]:.3f}", eta=f"{timer.estimate(step + 1, steps) - timer.seconds():.0f}s")
    return losses


def _fine_tune_lora(model, names, texts, steps, lr, batch_size, rank, alpha, rng, progress, keep=None):
    """Rank-``rank`` factorised fine-tune (LoRA's parametrisation; A, B gradients from the full
    weight gradient, see the module docstring: no memory saved on gradients); returns
    (losses, {name: (B, A)}, the scale ``alpha / rank``)."""
    import torch
    from tqdm.auto import tqdm

    scale = alpha / rank
    w0 = {n: model.param(n).detach().clone() for n in names}
    factors = {}
    for n in names:
        p, q = w0[n].shape
        a = torch.empty(rank, q, dtype=torch.float32, device=w0[n].device)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        factors[n] = (torch.zeros(p, rank, dtype=torch.float32, device=a.device, requires_grad=True),
                      a.requires_grad_(True))
    opt = torch.optim.Adam([t for ba in factors.values() for t in ba], lr=lr)
    stream, losses, timer = minibatches(texts, batch_size, rng), [], Timer()
    forward = model_forward(model)
    bar = tqdm(range(steps), desc=f"task vector: rank-{rank} factorised", disable=not progress)
    for step in bar:
        with torch.no_grad():
            for n, (B, A) in factors.items():
                model.param(n).copy_((w0[n].float() + scale * B @ A).to(w0[n].dtype))
        b = encode_spans(model, next(stream), spans_only=False)
        loss = span_nll(model, b)
        for n in names:
            model.param(n).grad = None
        loss.backward()
        grads = {n: model.param(n).grad.float() for n in names}
        if keep is not None:  # the keep term at W0 − s·BA reaches B, A with the opposite sign
            g_k, _ = _keep_at_negation(model, names, w0, keep, forward)
            grads = {n: grads[n] - g_k[n].float() for n in names}
        with torch.no_grad():
            for n, (B, A) in factors.items():
                g = grads[n]
                B.grad, A.grad = scale * g @ A.T, scale * B.T @ g
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(nll=f"{losses[-1]:.3f}", eta=f"{timer.estimate(step + 1, steps) - timer.seconds():.0f}s")
    return losses, {n: (B.detach(), A.detach()) for n, (B, A) in factors.items()}, scale


def _set_negated(model, original, tau, lam) -> None:
    import torch

    with torch.no_grad():
        for n, t in tau.items():
            model.param(n).copy_((original[n].float() - lam * t).to(original[n].dtype))


def sweep_lambdas(model, original, tau, val, lambdas: Sequence[float], refine: int = 2,
                  progress: bool = True) -> list[Any]:
    """Measure θ_pre − λτ on ``val`` for every λ of ``lambdas`` (sorted); when none is within the
    bounds and below the base contrast, halve below the smallest up to :data:`EXTEND_DOWN` times;
    then bisect ``refine`` times between the best λ and the next larger one tried. Returns the
    points (``setting = {"lambda": λ}``); the model is left at θ_pre."""
    from tqdm.auto import tqdm

    def at(lam):
        _set_negated(model, original, tau, lam)
        return val.measure(model, **{"lambda": float(lam)})

    grid = sorted(float(x) for x in lambdas)
    points = [at(lam) for lam in tqdm(grid, desc="task vector: λ sweep", disable=not progress)]
    lam = grid[0]
    for _ in range(EXTEND_DOWN):
        if val.best(points) is not val.base:
            break
        lam /= 2
        points.append(at(lam))
    for _ in range(refine):
        best = val.best(points)
        if best is val.base:
            break
        b = best.setting["lambda"]
        above = sorted(p.setting["lambda"] for p in points if p.setting["lambda"] > b)
        if not above:
            break
        points.append(at((b + above[0]) / 2))
    model.restore(original)
    return points


def task_vector_negation(
    model: "BiasModel",
    texts: Sequence[Any],
    *,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    ppl_bound: float = 1.1,
    bounds: Any = None,
    val_prompts: Sequence[Any] | None = None,
    ppl_texts: Sequence[str] | None = None,
    validation: Any = "auto",
    steps: int = 150,
    lr: float | None = None,
    batch_size: int = 16,
    params: Sequence[str] | None = None,
    keep_prompts: Sequence[Any] | None = None,
    keep_weight: float = 30.0,
    refine: int = 2,
    seed: int = 0,
    progress: bool = True,
    hparams: "TaskVectorHparams | dict[str, Any] | str | None" = None,
) -> "WeightDelta":
    """Fine-tune on ``texts`` (stereotyped sentences), negate the task vector with the λ chosen
    on ``validation`` (``"auto"``: the model's validation split, :mod:`biaslens.defaults`, with
    ``val_prompts`` / ``ppl_texts`` replacing its prompts / perplexity text and ``bounds`` or
    perplexity up at most ``ppl_bound`` − 1; or a :class:`~biaslens.unlearn.select.Validation`).
    ``keep_weight`` / ``keep_prompts``: the definitional keep term at the negated weights (module
    docstring; 0 = the paper's fine-tune). ``lora_rank``: a rank-r factorised fine-tune (LoRA's
    parametrisation; it computes the full weight gradients, so it saves optimiser memory only: see
    the module docstring). ``hparams``: a
    :class:`~biaslens.unlearn.hparams.TaskVectorHparams` (or its dict, or a JSON file) holding the
    keyword hyperparameters. Returns the delta, the model left at θ_pre − λ*·τ."""
    hpar = resolve_hparams(TaskVectorHparams, hparams, task_vector_negation, locals())
    (lora_rank, lora_alpha, lambdas, ppl_bound, steps, lr, batch_size, params, keep_weight, refine, seed) = (
        hpar.lora_rank, hpar.lora_alpha, hpar.lambdas, hpar.ppl_bound, hpar.steps, hpar.lr, hpar.batch_size,
        hpar.params, hpar.keep_weight, hpar.refine, hpar.seed)
    if not texts:
        raise BiasLensError("no stereotyped texts to fine-tune on")
    if steps < 1 or not lambdas or any(not (l > 0) for l in lambdas) or ppl_bound < 1:
        raise BiasLensError("need steps >= 1, positive lambdas and ppl_bound >= 1")
    if lora_rank is not None and lora_rank < 1:
        raise BiasLensError(f"lora_rank must be a positive integer, not {lora_rank}")
    val = validation_for(model, validation, val_prompts, ppl_texts, bounds, ppl_bound)
    if val is None:
        raise BiasLensError("task-vector negation chooses λ on validation data; pass validation='auto' "
                            "or a Validation")
    keep = keep_term(model, keep_prompts, keep_weight, seed)
    rng = seed_all(seed)
    names = unique_params(model, params if params is not None else (lora_targets(model) if lora_rank else None))
    lr = lr if lr is not None else (1e-3 if lora_rank else 2e-4)
    lora_alpha = lora_alpha if lora_alpha is not None else float(lora_rank or 1)
    original = model.snapshot(names)
    timer = Timer()
    base = val.start(model, **{"lambda": 0.0}) if val.base is None else val.base
    restore_flags = trainable(model, names)
    try:
        if lora_rank:
            losses, factors, scale = _fine_tune_lora(model, names, list(texts), steps, lr, batch_size,
                                                     lora_rank, lora_alpha, rng, progress, keep)
            tau = {n: scale * B @ A for n, (B, A) in factors.items()}
        else:
            losses = _fine_tune_full(model, names, list(texts), steps, lr, batch_size, rng, progress, keep, original)
            tau = {n: model.param(n).detach().float() - original[n].float() for n in names}
    finally:
        restore_flags()
        model.restore(original)
    fine_tune_seconds = timer.seconds()
    if not all(bool(t.isfinite().all()) for t in tau.values()):
        raise BiasLensError("the task vector is not finite (fine-tune diverged; lower lr); the model was restored")
    tau_norm = float(sum(float(t.norm()) ** 2 for t in tau.values()) ** 0.5)
    if tau_norm == 0:
        raise BiasLensError("the fine-tune did not move the weights (zero task vector): check that the texts "
                            "tokenise to more than one token and that lr > 0")
    points = sweep_lambdas(model, original, tau, val, lambdas, refine, progress)
    chosen = val.best(points)
    lam = float(chosen.setting.get("lambda", 0.0)) if chosen is not base else 0.0
    _set_negated(model, original, tau, lam)
    hp = {**hpar.to_dict(), "lora_rank": lora_rank, "lora_alpha": lora_alpha if lora_rank else None, "lambdas": list(lambdas),
          "ppl_bound": ppl_bound, "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed,
          "optimizer": "Adam", "n_texts": len(texts), "n_params_tuned": len(names),
          "keep_weight": keep_weight if keep is not None else 0.0,
          "n_keep_prompts": len(keep.prompts) if keep is not None else 0, "refine": refine}
    sweep = [{"lambda": 0.0, **_row(base)}] + sorted(({"lambda": p.setting["lambda"], **_row(p)} for p in points),
                                                       key=lambda r: r["lambda"])
    info = {"paper": "Dige et al. 2024, Mitigating Social Biases in Language Models through Unlearning "
                     "(arXiv 2406.13551)",
            "lambda": lam, "sweep": sweep, "chosen": {"lambda": lam, **_row(chosen)}, "fine_tune_nll": losses,
            "tau_norm": tau_norm, "fine_tune_seconds": fine_tune_seconds, "seconds": timer.seconds(),
            "selection": val.info(chosen),
            "note": "" if lam else "no λ lowered the validation contrast within the bounds"}
    return model.delta_since(original, method="task-vector" + ("-lora" if lora_rank else ""), hparams=hp, info=info)


def _row(p) -> dict[str, Any]:
    return {"contrast": p.contrast, "definitional": p.definitional, "margin": p.margin, "ppl": p.ppl,
            "ok": p.ok, "why": p.why}
