"""Pieces the unlearning methods share: token-masked language-model losses, quick bias and
perplexity checks for model selection, and a best-state guard for early stopping.

The quick checks are deliberately self-contained (they only need :class:`~biaslens.model.BiasModel`
methods), so λ selection and early stopping work whether or not :mod:`biaslens.evaluate` is there;
the reported before/after numbers come from :mod:`biaslens.evaluate`.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

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


def plain_logits(model: "BiasModel", input_ids, attention_mask=None) -> "Float[torch.Tensor, 'batch pos vocab']":
    """Logits from a plain Hugging Face module holding the very Parameters of ``model.params``.

    Training takes gradients through it, not through the bridge: the bridge runs GPT-2's fused
    ``c_attn`` through q/k/v views, so its gradients would miss ``model.params``; in-place updates
    of the Parameters reach both (see :meth:`biaslens.model.BiasModel.plain_module`).
    """
    module = model.plain_module()
    return module(input_ids=input_ids, attention_mask=attention_mask).logits


def lm_forward(model: "BiasModel", batch: SpanBatch) -> "torch.Tensor":
    return plain_logits(model, batch.input_ids, batch.attention_mask)


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
            nll = token_nll(model.forward(b.input_ids, attention_mask=b.attention_mask), b)
            n = int(b.target[:, 1:].sum())
            total += float(nll) * n
            count += n
    mean = total / max(count, 1)
    return math.exp(mean) if mean < 700 else float("inf")  # inf: the guard stops there


@dataclass
class Check:
    """One validation point: step, validation gap (None without prompts) and perplexity."""

    step: int
    gap: float | None
    ppl: float

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "gap": self.gap, "ppl": self.ppl}


@dataclass
class Guard:
    """Early stopping on a perplexity bound (Lu et al. 2024), keeping the best state seen.

    ``check(step)`` measures the validation gap (if prompts are given) and the perplexity; a state
    within ``ppl_bound × ppl₀`` is the new best when its gap is lower (or, without prompts, simply
    the latest). Returns False once the bound is crossed. ``finish`` puts the best state back.
    """

    model: Any
    names: list[str]
    val_prompts: Sequence[Any] | None
    ppl_texts: Sequence[str]
    ppl_bound: float
    owner: Any = None  # the model whose ``names`` are saved (default: ``model``)
    history: list[Check] = field(default_factory=list)
    best: Check | None = None
    best_state: dict[str, Any] | None = None
    stopped: str = ""

    def measure(self, step: int) -> Check:
        gap = quick_gap(self.model, self.val_prompts) if self.val_prompts else None
        c = Check(step, gap, quick_ppl(self.model, self.ppl_texts))
        self.history.append(c)
        return c

    def start(self) -> Check:
        c = self.measure(0)
        self.best, self.best_state = c, None  # None = the original weights
        return c

    @property
    def ppl0(self) -> float:
        return self.history[0].ppl

    def check(self, step: int) -> bool:
        c = self.measure(step)
        if not math.isfinite(c.ppl) or c.ppl > self.ppl_bound * self.ppl0:
            self.stopped = f"perplexity {c.ppl:.3f} > {self.ppl_bound} × {self.ppl0:.3f} at step {step}"
            return False
        if c.gap is None or self.best is None or self.best.gap is None or c.gap < self.best.gap:
            self.best, self.best_state = c, (self.owner or self.model).snapshot(self.names)
        return True

    def finish(self, original: dict[str, Any]) -> None:
        (self.owner or self.model).restore(original if self.best_state is None else self.best_state)

    def info(self) -> dict[str, Any]:
        return {"history": [c.as_dict() for c in self.history], "chosen": self.best.as_dict() if self.best else None,
                "stopped": self.stopped or "max_steps"}


def guarded_steps(opt, objective: Callable[[], "torch.Tensor"], guard: Guard, max_steps: int,
                  eval_every: int, desc: str, progress: bool = True) -> list[float]:
    """Minimise ``objective()`` with ``opt`` for up to ``max_steps`` steps, checking ``guard``
    every ``eval_every`` steps and stopping when it says so; returns the objective per step."""
    from tqdm.auto import tqdm

    timer, values = Timer(), []
    bar = tqdm(range(1, max_steps + 1), desc=desc, disable=not progress)
    for step in bar:
        obj = objective()
        opt.zero_grad(set_to_none=True)
        obj.backward()
        opt.step()
        values.append(obj.item())
        bar.set_postfix(objective=f"{values[-1]:.3f}", eta=f"{timer.estimate(step, max_steps) - timer.seconds():.0f}s")
        if (step % eval_every == 0 or step == max_steps) and not guard.check(step):
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
