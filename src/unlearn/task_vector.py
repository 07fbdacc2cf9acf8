"""Negation via task vector (Dige et al. 2024, arXiv 2406.13551, after Ilharco et al. 2023).

1. Fine-tune a copy of the weights on stereotyped text (the "bias task"): θ_ft.
2. Task vector τ = θ_ft − θ_pre.
3. Negate: θ_new = θ_pre − λ·τ, with λ chosen on a validation split: the lowest validation
   pronoun gap among the λ whose perplexity on general text stays within ``ppl_bound × ppl₀``
   (λ = 0, no change, if none lowers the gap). The whole sweep is kept in ``delta.info["sweep"]``.

With ``lora_rank = r`` the fine-tune is LoRA, implemented here: W = W₀ + (α/r)·B A with B ∈ ℝ^{p×r}
(zeros) and A ∈ ℝ^{r×q} (Kaiming-uniform) for every targeted weight W ∈ ℝ^{p×q}, so the negated
weight is W = W₀ − λ·(α/r)·B A. The gradients of A and B come from the full-weight gradient
G = ∂L/∂W by the chain rule (∂L/∂B = (α/r)·G Aᵀ, ∂L/∂A = (α/r)·Bᵀ G), so no module is wrapped and
every architecture works the same. The fine-tune itself runs in place and is undone before the
sweep; the model ends with θ_pre − λ*·τ.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

from biaslens.errors import BiasLensError
from biaslens.unlearn.common import (Guard, Timer, encode_spans, lm_forward, minibatches, seed_all,
                                     token_nll, trainable, unique_params)

if TYPE_CHECKING:
    import torch

    from biaslens.delta import WeightDelta
    from biaslens.model import BiasModel

DEFAULT_LAMBDAS = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def lora_targets(model: "BiasModel") -> list[str]:
    """The 2-D weights LoRA adapts by default: attention q/k/v and output, MLP input and output."""
    a = model.arch
    out = []
    for layer in range(model.n_layers):
        out += a.names("attn_qkv", layer) + [a.name("attn_out", layer)]
        out += a.names("mlp_in", layer) + [a.name("mlp_out", layer)]
    return out


def _fine_tune_full(model, names, texts, steps, lr, batch_size, rng, progress) -> list[float]:
    import torch
    from tqdm.auto import tqdm

    opt = torch.optim.Adam([model.param(n) for n in names], lr=lr)
    stream, losses, timer = minibatches(texts, batch_size, rng), [], Timer()
    bar = tqdm(range(steps), desc="task vector: fine-tune", disable=not progress)
    for step in bar:
        b = encode_spans(model, next(stream), spans_only=False)
        loss = token_nll(lm_forward(model, b), b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(nll=f"{losses[-1]:.3f}", eta=f"{timer.estimate(step + 1, steps) - timer.seconds():.0f}s")
    return losses


def _fine_tune_lora(model, names, texts, steps, lr, batch_size, rank, alpha, rng, progress):
    """LoRA fine-tune; returns (losses, {name: (B, A)}) with the scale ``alpha / rank``."""
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
    bar = tqdm(range(steps), desc=f"task vector: LoRA r={rank}", disable=not progress)
    for step in bar:
        with torch.no_grad():
            for n, (B, A) in factors.items():
                model.param(n).copy_((w0[n].float() + scale * B @ A).to(w0[n].dtype))
        b = encode_spans(model, next(stream), spans_only=False)
        loss = token_nll(lm_forward(model, b), b)
        for n in names:
            model.param(n).grad = None
        loss.backward()
        with torch.no_grad():
            for n, (B, A) in factors.items():
                g = model.param(n).grad.float()
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


def choose_lambda(sweep: list[dict[str, Any]], ppl_bound: float, keep_drop: float = 0.02) -> dict[str, Any]:
    """The sweep row with the lowest gap whose perplexity is within ``ppl_bound`` × that of λ = 0,
    whose keep accuracy (if measured) fell by at most ``keep_drop``, and whose gap is below
    λ = 0's; the λ = 0 row when none qualifies."""
    base = sweep[0]

    def kept(r):
        return r.get("keep") is None or r["keep"] >= base["keep"] - keep_drop

    ok = [r for r in sweep[1:] if r["ppl"] <= ppl_bound * base["ppl"] and r["gap"] < base["gap"] and kept(r)]
    return min(ok, key=lambda r: r["gap"]) if ok else base


def keep_accuracy(model: "BiasModel", prompts: Sequence[Any]) -> float:
    """Share of definitional prompts ("The king said that") whose pronoun pair argmax matches
    the word's gender (``female_rate`` 1.0 or 0.0)."""
    import torch

    from biaslens.metrics import female_share

    with torch.no_grad():
        share = female_share(model, list(prompts))
    want = torch.tensor([float(getattr(p, "female_rate", 0.0)) >= 0.5 for p in prompts])
    return float(((share > 0.5).cpu() == want).float().mean())


def task_vector_negation(
    model: "BiasModel",
    texts: Sequence[Any],
    *,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    ppl_bound: float = 1.1,
    val_prompts: Sequence[Any] | None = None,
    ppl_texts: Sequence[str] | None = None,
    steps: int = 100,
    lr: float | None = None,
    batch_size: int = 16,
    params: Sequence[str] | None = None,
    keep_prompts: Sequence[Any] | None = None,
    keep_drop: float = 0.02,
    seed: int = 0,
    progress: bool = True,
) -> "WeightDelta":
    """Fine-tune on ``texts`` (stereotyped sentences), negate the task vector with the λ chosen
    on ``val_prompts`` (default: the model's validation prompts, :mod:`biaslens.defaults`)
    under ``ppl_bound``; with ``keep_prompts`` (definitional prompts) a λ must also keep their
    pronoun accuracy within ``keep_drop`` of the start (perplexity on general text cannot see a
    pronoun). Returns the delta, the model left at θ_pre − λ*·τ."""
    if not texts:
        raise BiasLensError("no stereotyped texts to fine-tune on")
    if steps < 1 or not lambdas or any(l <= 0 for l in lambdas) or ppl_bound < 1:
        raise BiasLensError("need steps >= 1, positive lambdas and ppl_bound >= 1")
    if lora_rank is not None and lora_rank < 1:
        raise BiasLensError(f"lora_rank must be a positive integer, not {lora_rank}")
    from biaslens.defaults import defaults_for

    d = defaults_for(model)
    val_prompts = list(val_prompts) if val_prompts is not None else d.validation_prompts()
    ppl_texts = list(ppl_texts) if ppl_texts is not None else d.general_lines(100)
    rng = seed_all(seed)
    names = unique_params(model, params if params is not None else (lora_targets(model) if lora_rank else None))
    lr = lr if lr is not None else (1e-3 if lora_rank else 1e-4)
    lora_alpha = lora_alpha if lora_alpha is not None else float(lora_rank or 1)
    original = model.snapshot(names)
    timer = Timer()
    restore_flags = trainable(model, names)
    try:
        if lora_rank:
            losses, factors, scale = _fine_tune_lora(model, names, list(texts), steps, lr, batch_size,
                                                     lora_rank, lora_alpha, rng, progress)
            tau = {n: scale * B @ A for n, (B, A) in factors.items()}
        else:
            losses = _fine_tune_full(model, names, list(texts), steps, lr, batch_size, rng, progress)
            tau = {n: model.param(n).detach().float() - original[n].float() for n in names}
    finally:
        restore_flags()
        model.restore(original)
    fine_tune_seconds = timer.seconds()
    sweep = _sweep(model, original, tau, lambdas, val_prompts, ppl_texts, keep_prompts, progress)
    chosen = choose_lambda(sweep, ppl_bound, keep_drop)
    _set_negated(model, original, tau, chosen["lambda"])
    hp = {"lora_rank": lora_rank, "lora_alpha": lora_alpha if lora_rank else None, "lambdas": list(lambdas),
          "ppl_bound": ppl_bound, "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed,
          "optimizer": "Adam", "n_texts": len(texts), "n_params_tuned": len(names),
          "n_keep_prompts": len(keep_prompts or []), "keep_drop": keep_drop if keep_prompts else None}
    info = {"paper": "Dige et al. 2024, Mitigating Social Biases in Language Models through Unlearning "
                     "(arXiv 2406.13551)",
            "lambda": chosen["lambda"], "sweep": sweep, "fine_tune_nll": losses,
            "tau_norm": float(sum(float(t.norm()) ** 2 for t in tau.values()) ** 0.5),
            "fine_tune_seconds": fine_tune_seconds, "seconds": timer.seconds(),
            "note": "" if chosen["lambda"] else "no λ lowered the validation gap within the perplexity bound"}
    return model.delta_since(original, method="task-vector" + ("-lora" if lora_rank else ""), hparams=hp, info=info)


def _sweep(model, original, tau, lambdas, val_prompts, ppl_texts, keep_prompts, progress) -> list[dict[str, Any]]:
    """Validation gap, perplexity (and keep accuracy) at λ = 0 and every λ of ``lambdas``."""
    from tqdm.auto import tqdm

    guard = Guard(model, [], val_prompts, ppl_texts, ppl_bound=math.inf)
    rows = []
    for lam in tqdm([0.0, *sorted(lambdas)], desc="task vector: λ sweep", disable=not progress):
        _set_negated(model, original, tau, lam)
        c = guard.measure(len(rows))
        keep = keep_accuracy(model, keep_prompts) if keep_prompts else None
        rows.append({"lambda": lam, "gap": c.gap, "ppl": c.ppl, "keep": keep})
    model.restore(original)
    return rows
