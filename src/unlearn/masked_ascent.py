"""Masked-span gradient ascent (Lu et al. 2024, *Towards Transfer Unlearning*, arXiv 2407.16951).

Gradient *ascent* on the negative log-likelihood of only the harmful tokens of each forget text,

    L(θ) = − (1/|S|) Σ_{(i,t) ∈ S} −log p_θ(x_{i,t} | x_{i,<t}),

where S are the tokens inside the marked spans; the other tokens of the sentence are context only
(their loss never enters, so their gradient is exactly zero). Training stops before perplexity on
general text rises past ``ppl_bound ×`` its starting value. Choices the paper leaves open: Adam on
every parameter; with ``val_prompts`` the state with the lowest validation pronoun gap within the
bound is kept (ascent overshoots into the opposite stereotype if run long), else the last state
within the bound.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from biaslens.errors import BiasLensError
from biaslens.unlearn.common import (Guard, Timer, encode_spans, guarded_steps, lm_forward, minibatches,
                                     seed_all, token_nll, trainable, unique_params)

if TYPE_CHECKING:
    from biaslens.delta import WeightDelta
    from biaslens.model import BiasModel
    from biaslens.unlearn.data import SpanText


def span_ascent_loss(model: "BiasModel", items: Sequence["SpanText"]):
    """The ascent objective of one mini-batch: minus the mean NLL of the span tokens."""
    b = encode_spans(model, items, spans_only=True)
    return -token_nll(lm_forward(model, b), b)


def masked_span_ascent(
    model: "BiasModel",
    texts_with_spans: Sequence["SpanText"],
    *,
    lr: float = 1e-5,
    max_steps: int = 100,
    ppl_bound: float = 1.1,
    batch_size: int = 16,
    eval_every: int = 5,
    val_prompts: Sequence[Any] | None = None,
    ppl_texts: Sequence[str] | None = None,
    params: Sequence[str] | None = None,
    seed: int = 0,
    progress: bool = True,
) -> "WeightDelta":
    """Unlearn the marked spans of ``texts_with_spans`` by gradient ascent; returns the delta
    (the model is left edited). ``ppl_texts`` default to the model's general text (:mod:`biaslens.defaults`)."""
    import torch

    items = [t for t in texts_with_spans if getattr(t, "spans", ())]
    if not items:
        raise BiasLensError("no forget text has a marked span; give spans in the data file or attribute words")
    if max_steps < 1 or lr <= 0 or ppl_bound < 1:
        raise BiasLensError("need max_steps >= 1, lr > 0 and ppl_bound >= 1")
    from biaslens.defaults import defaults_for

    ppl_texts = list(ppl_texts) if ppl_texts is not None else defaults_for(model).general_lines(100)
    rng = seed_all(seed)
    names = unique_params(model, params)
    original = model.snapshot(names)
    guard = Guard(model, names, val_prompts, ppl_texts, ppl_bound)
    start = guard.start()
    restore_flags = trainable(model, names)
    opt = torch.optim.Adam([model.param(n) for n in names], lr=lr)
    timer, stream = Timer(), minibatches(items, batch_size, rng)
    try:
        objective = guarded_steps(opt, lambda: span_ascent_loss(model, next(stream)), guard, max_steps,
                                  eval_every, "masked-span ascent", progress)
    finally:
        restore_flags()
    guard.finish(original)
    hp = {"lr": lr, "max_steps": max_steps, "ppl_bound": ppl_bound, "batch_size": batch_size,
          "eval_every": eval_every, "seed": seed, "optimizer": "Adam", "n_forget": len(items)}
    info = {"paper": "Lu et al. 2024, Towards Transfer Unlearning (arXiv 2407.16951)",
            "span_nll": [-v for v in objective], "start": start.as_dict(), "seconds": timer.seconds(), **guard.info()}
    return model.delta_since(original, method="masked-span-ascent", hparams=hp, info=info)
