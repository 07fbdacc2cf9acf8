"""Metrics on next-token logits: one interface shared by tracing, editing and evaluation.

A :class:`LogitMetric` maps the last-position logits of a batch ``[batch, vocab]`` to one number
per prompt ``[batch]``. The default bias metric is the pronoun log-ratio
``m = log P(female pronoun) - log P(male pronoun)`` (docs/methods/tracing.md); any callable on
logits works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    import torch
    from jaxtyping import Float

    from biaslens.model import BiasModel

__all__ = ["DEFAULT_PAIR", "pronoun_pair", "LogitMetric", "pronoun_ids", "pronoun_log_ratio",
           "pronoun_prob_gap", "female_share"]

DEFAULT_PAIR = (" he", " she")


def pronoun_pair(prompt: Any) -> tuple[str, str]:
    """``(male, female)`` words of a prompt: from ``.male``/``.female`` or ``meta``, else he/she."""
    male = getattr(prompt, "male", None)
    female = getattr(prompt, "female", None)
    meta = getattr(prompt, "meta", None) or {}
    male = male or meta.get("male") or DEFAULT_PAIR[0]
    female = female or meta.get("female") or DEFAULT_PAIR[1]
    return male, female


@dataclass
class LogitMetric:
    """``fn(last_logits) -> [batch]``; ``name`` says what it measures (stored in effect maps).

    ``columns`` (optional): the only vocabulary ids ``fn`` reads, for a metric that is also
    unchanged when a constant is added to every logit of a row (a log-ratio of single tokens).
    Such a metric gives the same value on logits that are ``-inf`` outside ``columns``, so a
    patching engine may unembed only those columns.
    """

    fn: Callable[["torch.Tensor"], "torch.Tensor"]
    name: str
    columns: "torch.Tensor | None" = None

    def __call__(self, last_logits: "Float[torch.Tensor, 'batch vocab']") -> "Float[torch.Tensor, 'batch']":
        return self.fn(last_logits)

    def subset(self, idx) -> "LogitMetric":
        """The metric restricted to some prompts (for metrics with per-prompt targets)."""
        sub = getattr(self, "_subset", None)
        return sub(idx) if sub else self


def pronoun_ids(model: "BiasModel", prompts: Sequence[Any]) -> tuple["torch.Tensor", "torch.Tensor"]:
    """One-token ids ``(male, female)`` of each prompt's pronoun pair, each tokenised as the
    continuation of its prompt (:meth:`BiasModel.single_token`); a pronoun that is several tokens
    there raises :class:`~biaslens.errors.VocabularyError` (these metrics read one logit)."""
    import torch

    from biaslens.prompts import as_prompt

    male, female = [], []
    for p in prompts:
        m, f = pronoun_pair(p)
        text = as_prompt(p).text
        male.append(model.single_token(m, text))
        female.append(model.single_token(f, text))
    return (torch.tensor(male, device=model.device), torch.tensor(female, device=model.device))


def _make(kind: str, male, female) -> LogitMetric:
    import torch

    def fn(logits):
        idx = torch.arange(logits.shape[0], device=logits.device)
        if kind == "log_ratio":
            lp = torch.log_softmax(logits.float(), dim=-1)
            return lp[idx, female[: logits.shape[0]]] - lp[idx, male[: logits.shape[0]]]
        p = torch.softmax(logits.float(), dim=-1)
        return p[idx, female[: logits.shape[0]]] - p[idx, male[: logits.shape[0]]]

    name = {"log_ratio": "log P(female) - log P(male)", "prob_gap": "P(female) - P(male)"}[kind]
    # log P(f) - log P(m) = logit(f) - logit(m): only the pronoun columns matter
    cols = torch.unique(torch.cat([male, female])) if kind == "log_ratio" else None
    metric = LogitMetric(fn, name, cols)
    metric._subset = lambda idx: _make(kind, male[idx], female[idx])  # type: ignore[attr-defined]
    return metric


def pronoun_log_ratio(model: "BiasModel", prompts: Sequence[Any]) -> LogitMetric:
    """``log P(female) - log P(male)`` at the next token, with each prompt's own pronoun pair."""
    return _make("log_ratio", *pronoun_ids(model, prompts))


def pronoun_prob_gap(model: "BiasModel", prompts: Sequence[Any]) -> LogitMetric:
    """``P(female) - P(male)`` at the next token."""
    return _make("prob_gap", *pronoun_ids(model, prompts))


def female_share(model: "BiasModel", prompts: Sequence[Any], batch_size: int = 64) -> "torch.Tensor":
    """P(female) / (P(female) + P(male)) at the next token for each prompt (multi-token safe)."""
    import torch

    out = []
    for s in range(0, len(prompts), batch_size):
        chunk = list(prompts[s : s + batch_size])
        b = model.encode(chunk)
        with torch.no_grad():
            lp = model.target_logprobs(b, [list(pronoun_pair(p)) for p in chunk])
        out.append(torch.sigmoid(lp[:, 1] - lp[:, 0]))
    return torch.cat(out)
