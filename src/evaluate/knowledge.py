"""Knowledge retention probes: does the model still complete "The capital of France is" → " Paris"?

A fact is ``(prompt, answer)`` with the answer's leading space. It counts as *known* when greedy
decoding reproduces every answer token (each answer token is the argmax given the prompt and the
answer tokens before it: teacher-forced greedy exact match; multi-token answers are the normal
case). ``mean_logprob`` is the mean over facts of log P(answer | prompt), summed over the answer's
tokens. ``accuracy`` is a fraction in [0, 1]; its CI resamples facts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from biaslens.evaluate.scoring import continuation_rows, score_rows
from biaslens.stats import SEED, mean_ci, result

if TYPE_CHECKING:
    from biaslens.model import BiasModel

__all__ = ["SCORING", "fact_accuracy"]

SCORING = ("teacher-forced greedy exact match of every answer token after the prompt; "
           "mean_logprob = mean log P(answer | prompt) summed over the answer's tokens")


def fact_accuracy(model: "BiasModel", facts: Sequence[tuple[str, str]], batch_size: int = 64,
                  seed: int = SEED) -> dict:
    """Accuracy and mean log-probability of ``facts`` = [(prompt, " answer")]."""
    facts = list(facts)
    if not facts:
        raise ValueError("no facts to evaluate")
    rows, starts = continuation_rows(model, [p for p, _ in facts], [a for _, a in facts])
    s = score_rows(model, rows, starts, batch_size=batch_size, desc="facts", greedy=True)
    correct = np.array([float(g.all()) for g in s.greedy])
    total = s.sums()
    return result(
        {"accuracy": correct.mean(), "mean_logprob": total.mean()}, len(facts),
        {"accuracy": mean_ci(correct, seed=seed), "mean_logprob": mean_ci(total, seed=seed)},
        scoring=SCORING,
    )
