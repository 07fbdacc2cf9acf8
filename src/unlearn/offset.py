"""δ-offset unlearning (Huang et al. 2024, *Offset Unlearning for Large Language Models*,
arXiv 2404.11045).

The large model M is used only through its logits. A small model M_o with the same tokenizer is
frozen, and a trainable copy M'_o starts equal to it, so the offset starts at zero:

    l̃(x) = l_M(x) + α · (l_{M'_o}(x) − l_{M_o}(x))                                   (Eq. 1)

M'_o is trained on softmax(l̃) with one of the paper's losses on the forget set F (stereotyped
text) and the retain set R:

* ``"grad_ascent"``: L = −NLL_F(l̃)
* ``"grad_diff"``:   L = −NLL_F(l̃) + NLL_R(l̃)
* ``"kl"``:          L = −NLL_F(l̃) + KL(softmax(l_M) ‖ softmax(l̃)) on R (the original combined
  distribution is l_M, since the offset starts at zero)

Strength, chosen on the validation split like every unlearning method here
(:mod:`biaslens.unlearn.select`: stereotype contrast on ``occupation_prompts("edit",
"validation")`` under the perplexity and definitional bounds): the checkpoint (every
``eval_every`` steps, training at ``alpha``) and then the offset's strength α (``alphas``, the
combined logits need no retraining) with the lowest validation contrast within the bounds, over
one training run per learning rate (``lrs``) and keep weight (``keep_weights``). The
definitional keep term (:class:`~biaslens.unlearn.common.KeepTerm`, weight ``keep_weight``; 0 =
the paper's losses) is added to the loss on the combined logits: the forget loss alone lowers
every pronoun after a gendered subject. :class:`OffsetModel` holds the three models (it is none of
them): it scores (``last_logits``, ``target_logprobs``, ``sequence_logprobs``) and generates with
l̃, so every evaluation function runs on it unchanged, and refuses what only one model has; :func:`export_offset`
writes the pair with α and a manifest, :func:`load_offset` reads it back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from biaslens.errors import BiasLensError, ExportError
from biaslens.model import BiasModel
from biaslens.prompts import TokenBatch
from biaslens.unlearn.hparams import (DEFAULT_ALPHAS, DEFAULT_KEEP_WEIGHTS, DEFAULT_OFFSET_LRS, LOSSES, OffsetHparams,
                                     resolve_hparams)
from biaslens.unlearn.common import (Best, Guard, Timer, adam_run, encode_spans, for_run, keep_term,
                                     keep_weight_grid, minibatches, plain_logits, seed_all, span_nll,
                                     unique_params, value_grid)
from biaslens.unlearn.select import validation_for

if TYPE_CHECKING:
    import torch
    from jaxtyping import Float

    from biaslens.delta import WeightDelta

__all__ = ["OffsetModel", "NotOnOffsetModel", "offset_unlearn", "offset_loss", "export_offset", "load_offset",
           "train_small_organism", "LOSSES", "DEFAULT_ALPHAS"]


class NotOnOffsetModel(BiasLensError, AttributeError):
    """What one model has and an offset pair does not (weights, hooks, a residual stream).

    Also an :class:`AttributeError`, so ``getattr(om, name, default)`` and ``hasattr`` still work.
    """


class OffsetModel:
    """The large model corrected by an offset pair: logits l_M + α (l_{M'_o} − l_{M_o}) (Eq. 1).

    It holds three models and is none of them: ``large`` (M, used only through its logits),
    ``base`` (M_o, frozen) and ``offset`` (M'_o, the trained copy), with ``alpha``, ``delta`` (the
    offset model's change from the base, a :class:`~biaslens.delta.WeightDelta`; undo it on
    ``offset`` to switch the correction off) and ``info_``.

    It exposes only what is true of the combination: the shared tokenizer (``tokenize``,
    ``encode``, ``continuation_ids``, ``word_ids``, ``single_token``, ``check_words``, the same
    code as :class:`~biaslens.model.BiasModel`'s), the combined logits (``forward``,
    ``last_logits``, ``target_logprobs``, ``sequence_logprobs``, ``generate``), so every evaluation
    function runs on it unchanged, and ``device``, ``max_positions``, ``prepend_bos``, ``spec``
    and ``path`` (the large model's folder: the combination's default data are the large model's,
    :func:`biaslens.defaults.defaults_for`). It has no single set of weights, hooks or residual
    stream: ``bridge``, ``params``, ``weight_hash``, ``snapshot`` and the rest raise
    :class:`NotOnOffsetModel` naming the model to use instead, and ``locate``, ``lsdm`` and
    ``pcgu`` refuse it (:func:`biaslens.model.require_single_model`).
    """

    #: refused by :func:`biaslens.model.require_single_model` (locate, lsdm, pcgu)
    COMBINES_MODELS = True

    def __init__(self, large: BiasModel, base: BiasModel, offset: BiasModel, alpha: float = 1.0,
                 delta: "WeightDelta | None" = None, info: dict | None = None):
        _check_same_tokenizer(large, base)
        self.large, self.base, self.offset, self.alpha = large, base, offset, float(alpha)
        self.delta, self.info_ = delta, dict(info or {})
        self.spec = f"offset({large.spec}; base={base.spec}; alpha={self.alpha:g})"

    # the shared tokenizer: the same code as one model's (it reads only the attributes below)
    tokenize = BiasModel.tokenize
    encode = BiasModel.encode
    continuation_ids = BiasModel.continuation_ids
    word_ids = BiasModel.word_ids
    single_token = BiasModel.single_token
    check_words = BiasModel.check_words
    _unknown_message = BiasModel._unknown_message
    # scoring on the combined logits (they call self.forward)
    last_logits = BiasModel.last_logits
    target_logprobs = BiasModel.target_logprobs
    sequence_logprobs = BiasModel.sequence_logprobs

    @property
    def tokenizer(self):
        return self.large.tokenizer

    @property
    def prepend_bos(self) -> bool:
        return self.large.prepend_bos

    @property
    def device(self):
        """Where inputs go: the large model's device (the pair's logits are moved there)."""
        return self.large.device

    @property
    def path(self):
        """The large model's folder (its default data are the combination's)."""
        return self.large.path

    @property
    def max_positions(self) -> int | None:
        """The longest sequence every one of the three models can read."""
        limits = [m.max_positions for m in (self.large, self.base, self.offset) if m.max_positions]
        return min(limits) if limits else None

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise NotOnOffsetModel(
            f"an offset model has no '{name}': it combines the logits of three models (large, base and "
            f"offset); use om.large, om.base or om.offset for one model's {name}")

    def __repr__(self) -> str:
        return f"OffsetModel({self.spec})"

    def forward(self, batch, fwd_hooks: Iterable = (), attention_mask=None) -> "Float[torch.Tensor, 'batch pos vocab']":
        """Combined logits (Eq. 1); only the offset model carries gradients."""
        import torch

        if list(fwd_hooks):
            raise BiasLensError("an offset model has no hooks of its own; hook the large model instead")
        if isinstance(batch, TokenBatch):
            batch, attention_mask = batch.input_ids, batch.attention_mask
        with torch.no_grad():
            l_m = self.large.forward(batch, attention_mask=attention_mask).float()
            l_b = self.base.forward(batch, attention_mask=attention_mask).float()
        l_o = plain_logits(self.offset, batch, attention_mask).float()  # gradients reach every weight
        return l_m + self.alpha * (l_o - l_b)

    __call__ = forward

    def logits_at(self, ids, keep, fwd_hooks: Iterable = (), attention_mask=None) -> "Float[torch.Tensor, 'n_keep vocab']":
        """Combined logits (Eq. 1) where the boolean ``keep`` ``[batch, pos]`` is True (row-major),
        each model unembedding only those positions."""
        import torch

        if list(fwd_hooks):
            raise BiasLensError("an offset model has no hooks of its own; hook the large model instead")
        with torch.no_grad():
            l_m = self.large.logits_at(ids, keep, attention_mask=attention_mask).float()
            l_b = self.base.logits_at(ids, keep, attention_mask=attention_mask).float()
        l_o = plain_logits(self.offset, ids, attention_mask, keep=keep).float()
        return l_m + self.alpha * (l_o - l_b)

    def run_with_cache(self, *args, **kwargs):
        raise BiasLensError("an offset model has no activation cache; run_with_cache on the large model instead")

    def generate(self, prompt: str, max_new_tokens: int = 20, temperature: float = 0.0, seed: int = 0) -> str:
        """Continue ``prompt`` with the combined logits (greedy when ``temperature`` is 0)."""
        import torch

        gen = torch.Generator().manual_seed(seed)
        ids = self.encode(prompt).input_ids[:1]
        eos = self.tokenizer.eos_token_id
        start = ids.shape[1]
        with torch.no_grad():
            for _ in range(max_new_tokens):
                logits = self.forward(ids)[0, -1]
                if temperature > 0:
                    nxt = torch.multinomial(torch.softmax(logits / temperature, -1).cpu(), 1, generator=gen)
                else:
                    nxt = logits.argmax(-1, keepdim=True).cpu()
                ids = torch.cat([ids, nxt.to(ids.device)[None]], dim=1)
                if int(nxt) == eos:
                    break
        return self.tokenizer.decode(ids[0, start:].tolist())

    def manifest(self) -> dict[str, Any]:
        return {"method": "offset", "alpha": self.alpha, "large_model": self.large.spec,
                "large_weight_sha256": self.large.weight_hash(), "base_model": self.base.spec,
                **({"hyperparameters": self.delta.hparams} if self.delta is not None else {}),
                **self.info_}


def _check_same_tokenizer(a: BiasModel, b: BiasModel) -> None:
    if a.tokenizer.get_vocab() != b.tokenizer.get_vocab() or a.prepend_bos != b.prepend_bos:
        raise BiasLensError(f"the small model {b.spec} does not share the tokenizer of {a.spec}; δ-offset "
                            "unlearning needs a small model with the same tokenizer")
    if a.hf.get_output_embeddings().weight.shape[0] != b.hf.get_output_embeddings().weight.shape[0]:
        raise BiasLensError(f"{a.spec} and {b.spec} have different output vocabularies; pick a small model "
                            "of the same family")


def offset_loss(om: OffsetModel, forget, retain, loss: str) -> "torch.Tensor":
    """The training objective of one step (see the module docstring)."""
    import torch

    def at(ids, mask, keep):
        return om.logits_at(ids, keep, attention_mask=mask)

    total = -span_nll(om, forget, at)
    if loss == "grad_ascent" or retain is None:
        return total
    if loss == "grad_diff":
        return total + span_nll(om, retain, at)
    lr_ = om.forward(retain.input_ids, attention_mask=retain.attention_mask)
    with torch.no_grad():
        p_ref = torch.log_softmax(om.large.forward(retain.input_ids, attention_mask=retain.attention_mask).float(), -1)
    lq = torch.log_softmax(lr_, -1)
    kl = (p_ref.exp() * (p_ref - lq)).sum(-1)
    m = retain.attention_mask.float()
    return total + (kl * m).sum() / m.sum()


def offset_unlearn(
    model: BiasModel,
    small: BiasModel | str,
    forget: Sequence[Any],
    retain: Sequence[str] | None = None,
    *,
    alpha: float = 1.0,
    alphas: Sequence[float] | None = DEFAULT_ALPHAS,
    loss: str = "kl",
    lr: float | None = None,
    lrs: Sequence[float] | None = None,
    max_steps: int = 200,
    batch_size: int = 16,
    spans_only: bool = False,
    ppl_bound: float = 1.1,
    bounds: Any = None,
    eval_every: int = 10,
    val_prompts: Sequence[Any] | None = None,
    ppl_texts: Sequence[str] | None = None,
    validation: Any = "auto",
    keep_prompts: Sequence[Any] | None = None,
    keep_weight: float | None = None,
    keep_weights: Sequence[float] | None = None,
    patience: int = 2,
    seed: int = 0,
    progress: bool = True,
    hparams: "OffsetHparams | dict[str, Any] | str | None" = None,
) -> OffsetModel:
    """Train an offset pair for ``model`` (used only through its logits) on the forget texts.

    ``small`` is the frozen M_o (a model or a spec; the trainable copy M'_o is loaded from the
    same spec). ``spans_only`` restricts the forget loss to the marked spans (a variant; the paper
    uses whole sequences). ``validation``: ``"auto"`` (the model's validation split, with
    ``val_prompts`` / ``ppl_texts`` replacing its prompts / perplexity text and ``bounds`` or
    perplexity up at most ``ppl_bound`` − 1), a :class:`~biaslens.unlearn.select.Validation`, or
    None (no selection: ``max_steps`` at ``alpha``). ``lr``: one Adam learning rate; ``lrs``: a grid
    (default :data:`~biaslens.unlearn.hparams.DEFAULT_OFFSET_LRS`). ``keep_weight``: one weight of
    the definitional keep term; ``keep_weights``: a grid (default
    :data:`~biaslens.unlearn.hparams.DEFAULT_KEEP_WEIGHTS`). Every pair of rate and weight is one
    training run from the same start, the validation split choosing the run and its checkpoint
    (without validation the first of each default grid). ``alphas``: the strengths tried on the chosen
    checkpoint (None: keep ``alpha``). Returns the :class:`OffsetModel`; ``om.delta`` is
    M'_o − M_o and ``om.delta.info["selection"]`` the checkpoints and α tried. ``hparams``: an
    :class:`~biaslens.unlearn.hparams.OffsetHparams` (or its dict, or a JSON file) holding the
    keyword hyperparameters.
    """
    import biaslens

    hpar = resolve_hparams(OffsetHparams, hparams, offset_unlearn, locals())
    (alpha, alphas, loss, lr, lrs, max_steps, batch_size, spans_only, ppl_bound, eval_every, keep_weight,
     keep_weights, patience, seed) = (hpar.alpha, hpar.alphas, hpar.loss, hpar.lr, hpar.lrs, hpar.max_steps,
                                      hpar.batch_size, hpar.spans_only, hpar.ppl_bound, hpar.eval_every,
                                      hpar.keep_weight, hpar.keep_weights, hpar.patience, hpar.seed)

    if loss not in LOSSES:
        raise BiasLensError(f"unknown offset loss '{loss}' (use one of: {', '.join(LOSSES)})")
    if loss != "grad_ascent" and not retain:
        raise BiasLensError(f"the '{loss}' loss needs retain texts")
    if not forget or max_steps < 1 or (lr is not None and lr <= 0) or ppl_bound < 1 or eval_every < 1:
        raise BiasLensError("need forget texts, max_steps >= 1, eval_every >= 1, lr > 0 and ppl_bound >= 1")
    if alphas is not None and (not alphas or any(not (abs(a) > 0) for a in alphas)):
        raise BiasLensError("alphas must be non-zero strengths (or None to keep alpha)")
    base = small if isinstance(small, BiasModel) else biaslens.load(small, device=str(model.device))
    offset = biaslens.load(base.path or base.spec, device=str(base.device), dtype=base.dtype)
    om = OffsetModel(model, base, offset, alpha)
    val = validation_for(om, validation, val_prompts, ppl_texts, bounds, ppl_bound, scorer=model)
    weights = keep_weight_grid(keep_weight, keep_weights, val is not None, DEFAULT_KEEP_WEIGHTS)
    rates = value_grid(lr, lrs, val is not None, DEFAULT_OFFSET_LRS, "learning-rate", "lr")
    if keep_prompts is None and max(weights) > 0:
        from biaslens.defaults import defaults_for

        keep_prompts = defaults_for(model).definitional_prompts("edit")
    # one keep term (its base probabilities measured once); each run sets its weight
    keep = keep_term(om, keep_prompts, max(weights), seed)  # None when every weight is 0
    names = unique_params(offset)
    original = offset.snapshot(names)
    best, runs, guards, start = Best(), [], [], None
    timer = Timer()

    def forward(ids, attention_mask=None, keep=None):
        if keep is None:
            return om.forward(ids, attention_mask=attention_mask)
        return om.logits_at(ids, keep, attention_mask=attention_mask)

    for weight, rate in [(w, r) for w in weights for r in rates]:  # one run per pair, from the same start
        offset.restore(original)
        use_keep = for_run(keep, weight, seed)
        rng = seed_all(seed)
        setting = {"alpha": float(alpha), **({"lr": rate} if len(rates) > 1 else {}),
                   **({"keep_weight": float(weight)} if len(weights) > 1 else {})}
        guard = (Guard(om, names, val, owner=offset, setting=setting, patience=patience, best=best)
                 if val is not None else None)
        if guard is not None:
            start = guard.start()
            guards.append(guard)
        f_stream = minibatches(list(forget), batch_size, rng)
        r_stream = minibatches(list(retain), batch_size, rng) if retain else None

        def objective(use_keep=use_keep, f_stream=f_stream, r_stream=r_stream):
            fb = encode_spans(om, next(f_stream), spans_only=spans_only)
            rb = encode_spans(om, next(r_stream), spans_only=False) if r_stream else None
            value = offset_loss(om, fb, rb, loss)
            return value + use_keep.loss(forward) if use_keep is not None else value

        losses = adam_run(offset, names, objective, rate, guard, max_steps, eval_every,
                          f"offset unlearning ({loss}, lr {rate:g}, keep weight {weight:g})", progress)
        runs.append({"lr": rate, "keep_weight": float(weight), "steps_run": len(losses), "losses": losses,
                     "stopped": (guard.stopped or "max_steps") if guard is not None
                     else ("max_steps" if len(losses) == max_steps else "objective")})
    chosen_weight = float(best.run.get("keep_weight", weights[0])) if val is not None else float(weights[0])
    chosen_lr = float(best.run.get("lr", rates[0])) if val is not None else float(rates[0])
    chosen_run = next(r for r in runs if r["keep_weight"] == chosen_weight and r["lr"] == chosen_lr)
    losses = chosen_run["losses"]
    alpha_points: list[Any] = []
    if val is not None:
        guards[-1].finish(original)  # the best state of every run (one shared Best)
        chosen = best.point
        if alphas is not None and best.state is not None:
            for a in sorted({float(x) for x in alphas} - {float(alpha)}):
                om.alpha = a
                alpha_points.append(val.measure(om, **{**best.run, "alpha": a}, step=chosen.setting.get("step")))
            pick = val.best([chosen, *alpha_points])
            chosen = pick if pick is not val.base else chosen
        om.alpha = float(chosen.setting.get("alpha", alpha)) if best.state is not None else float(alpha)
    bad = offset.check_finite(names)
    if bad:
        offset.restore(original)
        raise BiasLensError(f"offset unlearning made {bad[0]} non-finite (lr={chosen_lr:g} too large?); the offset "
                            "was reset")
    hp = {**hpar.to_dict(), "alpha": om.alpha, "alpha_trained": alpha, "alphas": list(alphas) if alphas is not None else None,
          "loss": loss, "lr": chosen_lr, "lrs": rates, "max_steps": max_steps, "batch_size": batch_size, "spans_only": spans_only,
          "ppl_bound": ppl_bound, "eval_every": eval_every, "seed": seed, "optimizer": "Adam",
          "n_forget": len(forget), "n_retain": len(retain or []),
          "keep_weight": chosen_weight if keep is not None else 0.0, "keep_weights": weights,
          "n_keep_prompts": len(keep.prompts) if keep is not None else 0, "patience": patience}
    info = {"paper": "Huang et al. 2024, Offset Unlearning for Large Language Models (arXiv 2404.11045)",
            "losses": losses, "seconds": timer.seconds(), "alpha": om.alpha, "keep_weight": chosen_weight,
            "runs": [{k: v for k, v in r.items() if k != "losses"} for r in runs],
            **({"start": start.as_dict(), "history": [p.as_dict() for g in guards for p in g.history],
                "stopped": chosen_run["stopped"], "chosen": chosen.as_dict(),
                "alpha_sweep": [p.as_dict() for p in alpha_points], "selection": val.info(chosen)}
               if val is not None else {"stopped": chosen_run["stopped"]})}
    om.delta = offset.delta_since(original, method="offset", hparams=hp, info=info)
    om.info_ = {"small_model": base.spec, "training": info}
    return om


# ------------------------------------------------------------------------------ export


def export_offset(om: OffsetModel, out: str | Path, manifest: dict | None = None, force: bool = False,
                  files: dict[str, Any] | None = None) -> Path:
    """Write ``out/base`` (M_o), ``out/offset`` (M'_o, with its delta) and ``out/offset.json``
    (α, the large model's spec and weight hash, the training record), plus ``files`` (extra JSON
    files, name -> data). Staged and replaced like ``export`` (:mod:`biaslens.io`)."""
    from biaslens import jsonio
    from biaslens.export import export
    from biaslens.io import staging

    stage = staging(out, force, command="unlearn")
    with stage as tmp:
        export(om.base, tmp / "base")
        export(om.offset, tmp / "offset", delta=om.delta, manifest={"role": "offset model M'_o"})
        man = {**om.manifest(), "formula": "logits = l_M + alpha * (l_offset - l_base)",
               "base_dir": "base", "offset_dir": "offset", **(manifest or {})}
        if isinstance(man.get("training"), dict):  # the loss curve stays in the delta's record
            man["training"] = {k: v for k, v in man["training"].items() if k != "losses"}
        jsonio.write(tmp / "offset.json", man)
        for name, obj in (files or {}).items():
            jsonio.write(tmp / name, obj)
    return stage.out


def load_offset(folder: str | Path, large: BiasModel | str, device: str = "cpu") -> OffsetModel:
    """Read an offset pair written by :func:`export_offset` and attach it to ``large``."""
    import biaslens

    folder = Path(folder)
    meta = folder / "offset.json"
    if not meta.is_file():
        raise ExportError(f"'{folder}' is not an offset pair (no offset.json); give a folder written by "
                          "`biaslens unlearn --method offset`")
    man = json.loads(meta.read_text())
    large = large if isinstance(large, BiasModel) else biaslens.load(large, device=device)
    base = biaslens.load(folder / man.get("base_dir", "base"), device=device)
    offset = biaslens.load(folder / man.get("offset_dir", "offset"), device=device)
    return OffsetModel(large, base, offset, man["alpha"], info={"loaded_from": str(folder)})


# ------------------------------------------------------------------- a small organism


def train_small_organism(out: str | Path, n_layer: int = 2, n_embd: int = 64, n_head: int = 2,
                         steps: int = 800, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
                         n_docs: int = 8000, progress: bool = True) -> Path:
    """Train a smaller GPT-2 on the organism's corpus with the organism's own tokenizer (the
    same-tokenizer small model δ-offset unlearning needs); saves a Hugging Face folder at ``out``.

    Reuses the organism trainer's data pipeline (:mod:`biaslens.organism.train`); AdamW with
    linear warm-up and cosine decay, like the organism.
    """
    import math
    import random

    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from biaslens import organism
    from biaslens.organism import train as T

    tok = AutoTokenizer.from_pretrained(organism.CHECKPOINT_DIR)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    corpus = organism.generate_corpus(seed, n_docs)
    bos = tok.convert_tokens_to_ids(T.BOS)
    encoded = T.encode_docs(tok, corpus)
    model = T.make_model(len(tok), bos, n_layer, n_embd, n_head, 128)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    rows: list = []
    model.train()
    for step in tqdm(range(steps), desc="small organism", disable=not progress):
        if len(rows) < batch_size:
            rows.extend(T.build_rows(encoded, 128, bos, rng, 0.25))
        batch, rows = rows[:batch_size], rows[batch_size:]
        ids, labels = T.rows_to_batch(batch, pad_id=bos)
        f = (step + 1) / warm if step < warm else 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr * f
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "small_organism.json").write_text(json.dumps(
        {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "steps": steps, "batch_size": batch_size,
         "lr": lr, "seed": seed, "n_docs": n_docs, "final_loss": float(loss)}, indent=1) + "\n")
    return out
