"""Pieces the unlearning methods share: token-masked language-model losses, quick perplexity
and gap checks, the best-state guard that chooses a checkpoint on the validation split
(:mod:`biaslens.unlearn.select`), and the definitional keep term (:class:`KeepTerm`).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

__all__ = ["SpanBatch", "encode_spans", "token_nll", "span_nll", "plain_logits", "minibatches",
           "quick_gap", "quick_ppl", "Best", "Guard", "KeepTerm", "keep_term",
           "model_forward", "guarded_steps", "adam_run", "value_grid", "keep_weight_grid", "for_run", "Timer",
           "seed_all", "trainable", "unique_params"]

if TYPE_CHECKING:
    import torch
    from jaxtyping import Bool, Float, Int

    from biaslens.model import BiasModel
    from biaslens.unlearn.data import SpanText


@dataclass
class SpanBatch:
    """Token ids of some texts with ``target[i, t]`` = token ``t`` of text ``i`` is in the loss
    (it lies in a harmful span, or every real token but the first when the text has no spans)."""

    input_ids: "Int[torch.Tensor, 'batch pos']"
    attention_mask: "Int[torch.Tensor, 'batch pos']"
    target: "Bool[torch.Tensor, 'batch pos']"


def encode_spans(model: "BiasModel", items: Sequence["SpanText | str"], spans_only: bool = True) -> SpanBatch:
    """Tokenise ``items`` (right-padded, bos as the model wants, cut to the model's context) and
    mark the loss tokens.

    With ``spans_only``, a token is a target when its characters overlap a span; a text without
    spans then contributes no target. Without it every real token after the first is a target.
    """
    import torch

    texts = [getattr(x, "text", x) for x in items]
    all_ids, all_offs = model.tokenize(texts, offsets=True, length="truncate")  # within the context
    rows, marks = [], []
    for x, ids, offs in zip(items, all_ids, all_offs):
        spans = getattr(x, "spans", ())
        if spans_only:
            mark = [any(b > a and a < e and b > s for s, e in spans) for a, b in offs]
        else:
            mark = [True] * len(ids)
        mark[0] = False  # nothing predicts the first token
        rows.append(ids)
        marks.append(mark)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), model.tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, marks)):
        ids[i, : len(r)] = torch.tensor(r)
        attn[i, : len(r)] = 1
        target[i, : len(r)] = torch.tensor(m)
    dev = model.device
    return SpanBatch(ids.to(dev), attn.to(dev), target.to(dev))


def token_nll(logits: "Float[torch.Tensor, 'batch pos vocab']", batch: SpanBatch) -> "torch.Tensor":
    """Mean negative log-likelihood over the target tokens of ``batch`` (a scalar).

    Position ``t`` of ``logits`` predicts token ``t + 1``; only targets enter the loss, so the
    gradient reaches the logits only at positions that predict a target token.
    """
    import torch

    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tok = torch.gather(lp, 2, batch.input_ids[:, 1:, None])[..., 0]
    mask = batch.target[:, 1:].float()
    return -(tok * mask).sum() / mask.sum().clamp(min=1.0)


def span_nll(model: Any, batch: SpanBatch, forward: Callable | None = None) -> "torch.Tensor":
    """:func:`token_nll` of ``batch`` unembedding only the positions that predict a target token.

    ``forward(input_ids, attention_mask, keep)`` returns logits ``[n_keep, vocab]`` at the
    boolean ``keep`` (default: :func:`plain_logits` of ``model``, with gradients into its
    Parameters). The loss and its gradients are those of the full-vocabulary logits at every
    position; the positions no target reads are never computed."""
    import torch

    keep = torch.zeros_like(batch.target)
    keep[:, :-1] = batch.target[:, 1:]
    target = batch.input_ids[:, 1:][batch.target[:, 1:]]
    if forward is None:
        logits = plain_logits(model, batch.input_ids, batch.attention_mask, keep=keep)
    else:
        logits = forward(batch.input_ids, batch.attention_mask, keep)
    if len(target) == 0:
        return logits.float().sum() * 0.0
    return torch.nn.functional.cross_entropy(logits.float(), target)


def plain_logits(model: "BiasModel", input_ids, attention_mask=None, keep=None) -> "torch.Tensor":
    """Logits from a plain Hugging Face module holding the very Parameters of ``model.params``:
    ``[batch, pos, vocab]``, or ``[n_keep, vocab]`` at the positions where the boolean ``keep``
    ``[batch, pos]`` is True (only those are unembedded, :func:`biaslens.model.logits_where`).

    Training takes gradients through it, not through the bridge: the bridge runs GPT-2's fused
    ``c_attn`` through q/k/v views, so its gradients would miss ``model.params``; in-place updates
    of the Parameters reach both (see :meth:`biaslens.model.BiasModel.plain_module`).
    """
    from biaslens.model import logits_where

    module = model.plain_module()
    if keep is None:
        return module(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits_where(lambda **kw: module(input_ids=input_ids, attention_mask=attention_mask, **kw).logits, keep)


def minibatches(items: Sequence[Any], batch_size: int, rng: random.Random) -> Iterator[list[Any]]:
    """An endless stream of shuffled mini-batches (reshuffled every epoch)."""
    if not items:
        raise ValueError("no training examples")
    order = list(range(len(items)))
    while True:
        rng.shuffle(order)
        for s in range(0, len(order), batch_size):
            yield [items[i] for i in order[s : s + batch_size]]


# ------------------------------------------------------------------- quick model checks


def quick_gap(model: Any, prompts: Sequence[Any], batch_size: int = 64) -> float:
    """Mean over prompts of |P(f) − P(m)| / (P(f) + P(m)) (the occupational pronoun gap)."""
    import torch

    from biaslens.metrics import female_share

    with torch.no_grad():
        share = female_share(model, list(prompts), batch_size=batch_size)
    return float((2 * share - 1).abs().mean())


def quick_ppl(model: Any, texts: Sequence[str], batch_size: int = 32) -> float:
    """Per-token perplexity of ``texts`` (each scored on its own)."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            b = encode_spans(model, list(texts[s : s + batch_size]), spans_only=False)
            nll = span_nll(model, b, lambda ids, m, keep: model.logits_at(ids, keep, attention_mask=m))
            n = int(b.target[:, 1:].sum())
            total += float(nll) * n
            count += n
    mean = total / max(count, 1)
    return math.exp(mean) if mean < 700 else float("inf")  # inf: the guard stops there


@dataclass
class Best:
    """The best validation point seen so far (over one run or several) and its weights."""

    point: Any = None
    state: dict[str, Any] | None = None  # None = the original weights
    run: dict[str, Any] = field(default_factory=dict)  # the run's setting (e.g. its learning rate)


@dataclass
class Guard:
    """Early stopping and checkpoint choice on the validation split (:mod:`biaslens.unlearn.select`).

    ``check(step)`` measures the model on ``validation`` (stereotype contrast, definitional accuracy
    and margin, perplexity) with ``setting`` and ``step`` recorded. A point within the bounds
    with a lower contrast than ``best`` becomes the new best (its weights ``names`` of ``owner``
    are saved). Training stops (``check`` returns False) once ``patience`` checks in a row break a
    bound while moving further out: a check that breaks a bound by less than the check before it
    (:attr:`Point.shortfall`) is on its way back and does not count. Ascent-style training mostly
    moves further out; a run that trains toward a target (δ-offset) can dip past a bound for a
    few checks and come back (docs/methods/unlearning.md). ``finish`` puts the best state back.
    One :class:`Best` may be shared by several runs (a learning-rate grid).
    """

    model: Any
    names: list[str]
    validation: Any
    owner: Any = None  # the model whose ``names`` are saved (default: ``model``)
    setting: dict[str, Any] = field(default_factory=dict)
    patience: int = 2
    best: Best = field(default_factory=Best)
    history: list[Any] = field(default_factory=list)
    stopped: str = ""
    _bad: int = 0
    _last: float = 0.0  # the previous check's shortfall (0: within the bounds)

    def start(self) -> Any:
        """Measure the unchanged model once (shared by every run of one selection)."""
        v = self.validation
        if v.base is None:
            v.start(self.model, step=0)
        if self.best.point is None:
            self.best.point, self.best.state, self.best.run = v.base, None, {}
        return v.base

    def check(self, step: int) -> bool:
        p = self.validation.measure(self.model, **self.setting, step=step)
        self.history.append(p)
        if p.ok and p.contrast < self.best.point.contrast:
            self.best.point = p
            self.best.state = (self.owner or self.model).snapshot(self.names)
            self.best.run = dict(self.setting)
        if p.ok:
            self._bad = 0
        elif not (self._bad and p.shortfall < self._last):  # a bad check on its way back is not counted
            self._bad += 1
        self._last = 0.0 if p.ok else p.shortfall
        if self._bad >= self.patience:
            self.stopped = f"step {step}: {p.why}"
            return False
        return True

    def finish(self, original: dict[str, Any]) -> None:
        (self.owner or self.model).restore(original if self.best.state is None else self.best.state)

    def info(self) -> dict[str, Any]:
        return {"history": [p.as_dict() for p in self.history],
                "chosen": self.best.point.as_dict() if self.best.point is not None else None,
                "stopped": self.stopped or "max_steps"}


# ------------------------------------------------------------------------ keeping definitional


class KeepTerm:
    """``weight`` × mean KL between the unchanged model and the current one over {matching
    pronoun, other pronoun, every other token} at the next token of definitional prompts ("The
    king said that"): a term that holds definitional gender (and the pronoun mass there) where it
    was while a method removes the stereotype. Without it every gradient method here removes
    gender itself on the organism (definitional margins collapse long before the stereotype is
    gone; ``docs/results/unlearn.md``). The prompts default to the definitional prompts of the
    *edit* templates (:meth:`biaslens.defaults.Defaults.definitional_prompts`), so neither the
    validation nor the test templates are trained on — the same keep set as LSDM's.

    Each pronoun is read at its first token (exact for the one-token pronouns of every shipped
    family). The base probabilities are measured once, at construction, on ``model`` as it is.
    """

    #: KL below this (nats, per prompt) counts as zero: float noise between batchings, not change
    TOLERANCE = 1e-5

    def __init__(self, model: Any, prompts: Sequence[Any] | None = None, weight: float = 30.0,
                 batch_size: int = 16, seed: int = 0):
        import torch

        from biaslens.errors import BiasLensError
        from biaslens.metrics import pronoun_pair

        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise BiasLensError(f"keep_weight must be a non-negative number, not {weight!r}")
        if prompts is None:
            from biaslens.defaults import defaults_for

            prompts = defaults_for(model).definitional_prompts("edit")
        self.model, self.weight, self.batch_size = model, float(weight), int(batch_size)
        self.prompts = list(prompts)
        if not self.prompts:
            raise BiasLensError("no definitional keep prompts; pass keep_prompts or keep_weight=0")
        ids = []
        for p in self.prompts:
            male, female = pronoun_pair(p)
            ids.append([model.continuation_ids(p.text, male)[0], model.continuation_ids(p.text, female)[0]])
        self.ids = torch.tensor(ids, dtype=torch.long)
        # the plain module is faster than the bridge; an offset model's logits are its own forward
        base_forward = ((lambda ids, attention_mask=None, keep=None: model.logits_at(ids, keep, attention_mask=attention_mask))
                        if getattr(model, "large", None) is not None else model_forward(model))
        with torch.no_grad():
            self.base = torch.cat([self._pair_logprobs(base_forward, self._rows(s)).cpu()
                                   for s in range(0, len(self.prompts), 64)])
        self.stream = minibatches(list(range(len(self.prompts))), self.batch_size, random.Random(seed))

    def _rows(self, start: int) -> list[int]:
        return list(range(start, min(start + 64, len(self.prompts))))

    def _pair_logprobs(self, forward: Callable, idx: Sequence[int]) -> "torch.Tensor":
        import torch

        from biaslens.model import last_position_mask

        b = self.model.encode([self.prompts[i] for i in idx])
        last = forward(b.input_ids, attention_mask=b.attention_mask, keep=last_position_mask(b.input_ids, b.lengths))
        lp = torch.log_softmax(last.float(), dim=-1)
        return lp.gather(1, self.ids[list(idx)].to(lp.device))

    def loss(self, forward: Callable) -> "torch.Tensor":
        """The keep term on the next mini-batch; ``forward(input_ids, attention_mask=..., keep=...)``
        returns logits with gradients at the boolean ``keep`` positions (e.g. :func:`model_forward`
        of the model being trained)."""
        import torch

        idx = next(self.stream)
        q = self._pair_logprobs(forward, idx)
        p = self.base[idx].to(q.device)
        rest_p = torch.log1p(-p.exp().sum(1).clamp(max=1 - 1e-6))
        rest_q = torch.log1p(-q.exp().sum(1).clamp(max=1 - 1e-6))
        kl = (p.exp() * (p - q)).sum(1) + rest_p.exp() * (rest_p - rest_q)
        # a dead zone of TOLERANCE nats: the base was measured in other batches (other padding),
        # so an unchanged model differs from it by float noise, which Adam would blow up into
        # lr-sized steps on every weight the forget loss does not reach
        return self.weight * (kl - self.TOLERANCE).clamp(min=0.0).mean()


def keep_term(model: Any, prompts: Sequence[Any] | None, weight: float, seed: int = 0) -> "KeepTerm | None":
    """A :class:`KeepTerm`, or None when ``weight`` is 0."""
    return KeepTerm(model, prompts, weight, seed=seed) if weight else None


def value_grid(one: float | None, grid: Sequence[float] | None, validated: bool, default: Sequence[float],
               what: str, name: str) -> list[float]:
    """The values of one strength a method runs: ``one`` alone when it is given and ``grid`` is
    not, else ``grid`` (``default`` when None). Without validation there is nothing to choose
    with: the default grid's first value, and an explicit grid is refused (``what``: the grid's
    name in that message, ``name``: the single value's keyword)."""
    from biaslens.errors import BiasLensError

    values = ([float(one)] if one is not None and grid is None
              else [float(v) for v in (grid if grid is not None else default)])
    if not validated and grid is None:
        values = values[:1]
    if not validated and len(values) > 1:
        raise BiasLensError(f"a {what} grid needs validation to choose from it; pass one {name} "
                            "or validation='auto'")
    return values


def keep_weight_grid(keep_weight: float | None, keep_weights: Sequence[float] | None, validated: bool,
                     default: Sequence[float]) -> list[float]:
    """The keep weights a method runs (:func:`value_grid`)."""
    return value_grid(keep_weight, keep_weights, validated, default, "keep-weight", "keep_weight")


def for_run(keep: "KeepTerm | None", weight: float, seed: int) -> "KeepTerm | None":
    """``keep`` set up for one run of a keep-weight grid: its weight ``weight`` and its prompt
    stream restarted from ``seed`` (None when there is no term or ``weight`` is 0)."""
    if keep is None or weight <= 0:
        return None
    keep.weight = float(weight)
    keep.stream = minibatches(list(range(len(keep.prompts))), keep.batch_size, seed_all(seed))
    return keep


def model_forward(model: Any) -> Callable:
    """``forward(input_ids, attention_mask=..., keep=None)`` with gradients into ``model.params``:
    every position's logits, or ``[n_keep, vocab]`` at the boolean ``keep``."""
    return lambda ids, attention_mask=None, keep=None: plain_logits(model, ids, attention_mask, keep=keep)


def adam_run(owner: Any, names: Sequence[str], objective: Callable[[], "torch.Tensor"], lr: float,
             guard: "Guard | None", max_steps: int, eval_every: int, desc: str, progress: bool = True) -> list[float]:
    """One training run: Adam at ``lr`` on ``owner``'s parameters ``names`` (only they require
    grad meanwhile) through :func:`guarded_steps`; returns the objective per step."""
    import torch

    restore_flags = trainable(owner, names)
    opt = torch.optim.Adam([owner.param(n) for n in names], lr=lr)
    try:
        return guarded_steps(opt, objective, guard, max_steps, eval_every, desc, progress)
    finally:
        restore_flags()


def guarded_steps(opt, objective: Callable[[], "torch.Tensor"], guard: Guard | None, max_steps: int,
                  eval_every: int, desc: str, progress: bool = True) -> list[float]:
    """Minimise ``objective()`` with ``opt`` for up to ``max_steps`` steps, checking ``guard``
    (if any) every ``eval_every`` steps and stopping when it says so; returns the objective per
    step. A non-finite objective stops the run before its step is taken."""
    import torch
    from tqdm.auto import tqdm

    timer, values = Timer(), []
    bar = tqdm(range(1, max_steps + 1), desc=desc, disable=not progress)
    for step in bar:
        obj = objective()
        if not torch.isfinite(obj):
            if guard is not None:
                guard.stopped = f"step {step}: the objective is not finite"
            break
        opt.zero_grad(set_to_none=True)
        obj.backward()
        opt.step()
        values.append(obj.item())
        bar.set_postfix(objective=f"{values[-1]:.3f}", eta=f"{timer.estimate(step, max_steps) - timer.seconds():.0f}s")
        if guard is not None and (step % eval_every == 0 or step == max_steps) and not guard.check(step):
            break
    return values


class Timer:
    """Wall time and a time estimate after the first steps."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def estimate(self, done: int, total: int) -> float:
        return self.seconds() / max(done, 1) * total


def seed_all(seed: int) -> random.Random:
    import torch

    torch.manual_seed(seed)
    return random.Random(seed)


def trainable(model: "BiasModel", names: Sequence[str]) -> Callable[[], None]:
    """Make only ``names`` require grad; returns a function restoring the previous flags."""
    before = {n: p.requires_grad for n, p in model.params.items()}
    wanted = set(names)
    for n, p in model.params.items():
        p.requires_grad_(n in wanted)

    def restore() -> None:
        for n, p in model.params.items():
            p.requires_grad_(before[n])
            p.grad = None

    return restore


def unique_params(model: "BiasModel", names: Sequence[str] | None = None) -> list[str]:
    """Parameter names with tied tensors listed once (GPT-2 ties ``lm_head`` to ``wte``)."""
    seen, out = set(), []
    for n in (list(model.params) if names is None else names):
        ptr = model.param(n).data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            out.append(n)
    return out
