"""Masked-span gradient ascent (Lu et al. 2024, *Towards Transfer Unlearning*, arXiv 2407.16951).

Gradient *ascent* on the negative log-likelihood of only the harmful tokens of each forget text,

    L(θ) = − (1/|S|) Σ_{(i,t) ∈ S} −log p_θ(x_{i,t} | x_{i,<t})  +  β · K(θ),

where S are the tokens inside the marked spans; the other tokens of the sentence are context only
(their loss never enters, so their gradient is exactly zero). K is the definitional keep term
(:class:`~biaslens.unlearn.common.KeepTerm`, weight β = ``keep_weight``; 0 gives the paper's
objective): ascent on the stereotyped pronoun alone lowers *every* pronoun after a gendered
subject, so on the organism definitional margins collapsed before the stereotype was a third gone.

The strength — the number of steps, the learning rate (``lrs``, a grid) and the keep weight
(``keep_weights``, a grid) — is chosen on the validation split (:mod:`biaslens.unlearn.select`:
the stereotype contrast on ``occupation_prompts("edit", "validation")``, under the perplexity and definitional bounds):
the checkpoint (every ``eval_every`` steps) with the lowest validation contrast within the bounds;
a run stops once ``patience`` checks in a row break a bound. Adam on every parameter (the paper
leaves the optimiser open).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from biaslens.errors import BiasLensError
from biaslens.unlearn.hparams import DEFAULT_KEEP_WEIGHTS, MaskedAscentHparams, resolve_hparams
from biaslens.unlearn.common import (Best, Guard, Timer, adam_run, encode_spans, for_run, keep_term,
                                     keep_weight_grid, minibatches, model_forward, seed_all, span_nll,
                                     unique_params, value_grid)
from biaslens.unlearn.select import validation_for

if TYPE_CHECKING:
    from biaslens.delta import WeightDelta
    from biaslens.model import BiasModel
    from biaslens.unlearn.data import SpanText

__all__ = ["masked_span_ascent", "span_ascent_loss", "DEFAULT_LRS"]

#: the learning rates tried by default (Adam); the validation split picks one
DEFAULT_LRS = (1e-4, 3e-4)


def span_ascent_loss(model: "BiasModel", items: Sequence["SpanText"]):
    """The ascent objective of one mini-batch: minus the mean NLL of the span tokens."""
    b = encode_spans(model, items, spans_only=True)
    return -span_nll(model, b)


def masked_span_ascent(
    model: "BiasModel",
    texts_with_spans: Sequence["SpanText"],
    *,
    lr: float | None = None,
    lrs: Sequence[float] | None = None,
    max_steps: int = 200,
    ppl_bound: float = 1.1,
    bounds: Any = None,
    batch_size: int = 16,
    eval_every: int = 10,
    val_prompts: Sequence[Any] | None = None,
    ppl_texts: Sequence[str] | None = None,
    validation: Any = "auto",
    keep_prompts: Sequence[Any] | None = None,
    keep_weight: float | None = None,
    keep_weights: Sequence[float] | None = None,
    params: Sequence[str] | None = None,
    patience: int = 2,
    seed: int = 0,
    progress: bool = True,
    hparams: "MaskedAscentHparams | dict[str, Any] | str | None" = None,
) -> "WeightDelta":
    """Unlearn the marked spans of ``texts_with_spans`` by gradient ascent; returns the delta
    (the model is left at the chosen checkpoint).

    ``lr`` runs one learning rate, ``lrs`` a grid (default :data:`DEFAULT_LRS`; without
    validation its first value); ``keep_weight`` one keep-term weight, ``keep_weights`` a grid
    (default :data:`DEFAULT_KEEP_WEIGHTS`, every pair of weight and rate a run; without
    validation its first value); each run is
    checked every ``eval_every`` steps on ``validation`` (``"auto"``: the model's validation split,
    ``val_prompts`` / ``ppl_texts`` replacing its prompts / perplexity text, ``bounds`` or
    perplexity up at most ``ppl_bound`` − 1; a :class:`~biaslens.unlearn.select.Validation`; or
    None: no selection, one run of ``max_steps`` kept as it ends). ``delta.info["selection"]``
    records every checkpoint of every run and the choice. ``hparams``: a
    :class:`~biaslens.unlearn.hparams.MaskedAscentHparams` (or its dict, or a JSON file) holding
    the keyword hyperparameters."""
    hpar = resolve_hparams(MaskedAscentHparams, hparams, masked_span_ascent, locals())
    (lr, lrs, max_steps, ppl_bound, batch_size, eval_every, keep_weight, keep_weights, params, patience, seed) = (
        hpar.lr, hpar.lrs, hpar.max_steps, hpar.ppl_bound, hpar.batch_size, hpar.eval_every, hpar.keep_weight,
        hpar.keep_weights, hpar.params, hpar.patience, hpar.seed)

    items = [t for t in texts_with_spans if getattr(t, "spans", ())]
    if not items:
        raise BiasLensError("no forget text has a marked span; give spans in the data file or attribute words")
    if ppl_bound < 1:
        raise BiasLensError("need ppl_bound >= 1")
    val = validation_for(model, validation, val_prompts, ppl_texts, bounds, ppl_bound)
    grid = value_grid(lr, lrs, val is not None, DEFAULT_LRS, "learning-rate", "lr")
    if max_steps < 1 or not grid or any(not (x > 0) for x in grid) or eval_every < 1:
        raise BiasLensError("need max_steps >= 1, eval_every >= 1 and learning rates > 0")
    weights = keep_weight_grid(keep_weight, keep_weights, val is not None, DEFAULT_KEEP_WEIGHTS)
    # one keep term (its base probabilities measured once); each run sets its weight
    keep = keep_term(model, keep_prompts, max(weights), seed)  # None when every weight is 0
    forward = model_forward(model)
    names = unique_params(model, params)
    original = model.snapshot(names)
    best, runs, timer = Best(), [], Timer()
    for weight, rate in [(w, r) for w in weights for r in grid]:
        model.restore(original)
        rng = seed_all(seed)
        setting = {"lr": rate, "keep_weight": weight} if len(weights) > 1 else {"lr": rate}
        guard = Guard(model, names, val, setting=setting, patience=patience, best=best) if val else None
        if guard is not None:
            guard.start()
        use_keep = for_run(keep, weight, seed)
        stream = minibatches(items, batch_size, rng)

        def objective(use_keep=use_keep, stream=stream):
            obj = span_ascent_loss(model, next(stream))
            return obj + use_keep.loss(forward) if use_keep is not None else obj

        values = adam_run(model, names, objective, rate, guard, max_steps, eval_every,
                          f"masked-span ascent (lr {rate:g}, keep weight {weight:g})", progress)
        runs.append({"lr": rate, "keep_weight": weight, "steps_run": len(values), "objective": values,
                     **(guard.info() if guard is not None else {})})
    if val is not None:
        model.restore(original if best.state is None else best.state)
    chosen_weight = float(best.run.get("keep_weight", weights[0])) if val is not None else float(weights[0])
    bad = model.check_finite(names)
    if bad:
        model.restore(original)
        raise BiasLensError(f"masked-span ascent made {bad[0]} non-finite (learning rate too large?); "
                            "the model was restored")
    hp = {**hpar.to_dict(), "lrs": grid, "max_steps": max_steps, "ppl_bound": ppl_bound, "batch_size": batch_size,
          "eval_every": eval_every, "seed": seed, "optimizer": "Adam", "n_forget": len(items),
          "keep_weight": chosen_weight if keep is not None else 0.0, "keep_weights": weights,
          "n_keep_prompts": len(keep.prompts) if keep is not None else 0, "patience": patience}
    chosen = best.point.as_dict() if val is not None else None
    info = {"paper": "Lu et al. 2024, Towards Transfer Unlearning (arXiv 2407.16951)",
            "runs": runs, "seconds": timer.seconds(), "chosen": chosen,
            "chosen_run": ({"keep_weight": chosen_weight, **best.run} if val is not None
                           else {"lr": grid[0], "keep_weight": chosen_weight}),
            "stopped": next((r.get("stopped") for r in runs if r["lr"] == best.run.get("lr")
                             and r["keep_weight"] == chosen_weight), "max_steps"),
            **({"selection": val.info(best.point)} if val is not None else {})}
    return model.delta_since(original, method="masked-span-ascent", hparams=hp, info=info)
