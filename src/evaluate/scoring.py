"""The one scoring engine: log-probabilities of chosen tokens of many token rows, batched.

Every benchmark reduces to "log P(these tokens | the tokens before them)" for a set of token rows:
a whole sentence (CrowS-Pairs, StereoSet), a continuation after a prompt (facts, user probes),
or a window of running text (perplexity). :func:`score_rows` runs them sorted by length (so a
batch pads little), right-padded, ``batch_size`` rows at a time, with a progress bar, and reads
``log P`` only at the scored positions (``logit[target] − logsumexp(logits)``), never
materialising a full log-softmax.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from biaslens.prompts import pad_rows

if TYPE_CHECKING:
    from biaslens.model import BiasModel

__all__ = ["Scores", "token_rows", "continuation_rows", "batches_by_length", "score_rows"]


@dataclass
class Scores:
    """Per row: ``logprobs[i]`` (log P of each scored token) and ``greedy[i]`` (was it the argmax;
    filled only when asked for)."""

    logprobs: list[np.ndarray]
    greedy: list[np.ndarray]

    def sums(self) -> np.ndarray:
        return np.array([lp.sum() for lp in self.logprobs], dtype=float)

    def means(self) -> np.ndarray:
        return np.array([lp.mean() if len(lp) else np.nan for lp in self.logprobs], dtype=float)

    def counts(self) -> np.ndarray:
        return np.array([len(lp) for lp in self.logprobs], dtype=int)


def token_rows(model: "BiasModel", texts: Sequence[str], length: str = "check") -> list[list[int]]:
    """Token ids of each text as the model sees it (:meth:`BiasModel.tokenize`)."""
    return model.tokenize(texts, length=length)


def continuation_rows(model: "BiasModel", prompts: Sequence[str],
                      continuations: Sequence[str]) -> tuple[list[list[int]], list[int]]:
    """Rows ``prompt ids + continuation ids`` and the index where each continuation starts.

    The continuation is tokenised in its prompt's context (:meth:`BiasModel.continuation_ids`;
    give it its leading space, e.g. ``" Paris"``).
    """
    heads = token_rows(model, prompts)
    rows, starts = [], []
    for h, p, c in zip(heads, prompts, continuations):
        rows.append(h + model.continuation_ids(p, c))
        starts.append(len(h))
    return rows, starts


def batches_by_length(lengths: Sequence[int], batch_size: int,
                      token_budget: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of rows of similar length (longest first): at most
    ``batch_size`` rows, and at most ``token_budget`` padded tokens when given."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and len(out[-1]) < batch_size and (
                token_budget is None or (len(out[-1]) + 1) * lengths[out[-1][0]] <= token_budget):
            out[-1].append(i)
        else:
            out.append([i])
    return out


#: rows of vocabulary-wide log-softmax per call: a few MB each, where a CPU allocator reuses
#: memory, instead of one temporary as large as all the scored logits
_CE_ROWS = 64


def score_rows(
    model: "BiasModel",
    rows: Sequence[Sequence[int]],
    starts: Sequence[int] | None = None,
    ends: Sequence[int] | None = None,
    batch_size: int = 32,
    desc: str = "scoring",
    progress: bool | None = None,
    token_budget: int | None = None,
    greedy: bool = False,
) -> Scores:
    """log P(row[t] | row[:t]) for ``starts[i] <= t < ends[i]`` of every row (defaults: from
    token 1 to the end), batched by length (at most ``batch_size`` rows and ``token_budget``
    padded tokens a batch). With ``greedy=True``, ``Scores.greedy`` says whether each scored
    token was the argmax (else it is empty)."""
    import torch
    from tqdm.auto import tqdm

    n = len(rows)
    starts = [1] * n if starts is None else list(starts)
    ends = [len(r) for r in rows] if ends is None else list(ends)
    if any(s < 1 for s in starts):
        raise ValueError("a scored token needs at least one token before it (start >= 1)")
    lps: list[np.ndarray] = [np.zeros(0)] * n
    tops: list[np.ndarray] = [np.zeros(0, dtype=bool)] * n
    pad = model.tokenizer.pad_token_id
    groups = batches_by_length([len(r) for r in rows], batch_size, token_budget)
    bar = tqdm(groups, desc=desc, unit="batch", disable=(not progress) if progress is not None else None,
               leave=False)
    with torch.inference_mode():
        for idx in bar:
            x, m = pad_rows([rows[i] for i in idx], pad)
            x, m = x.to(model.device), m.to(model.device)
            # position t - 1 predicts token t: unembed only the positions that predict a scored token
            keep = torch.zeros(x.shape, dtype=torch.bool)
            for b, i in enumerate(idx):
                keep[b, starts[i] - 1 : ends[i] - 1] = True
            keep = keep.to(model.device)
            logits = model.logits_at(x, keep, attention_mask=m)  # [n_scored, vocab], row-major
            if logits.dtype != torch.float32:
                logits = logits.float()
            target = x[:, 1:][keep[:, :-1]]
            lp = -torch.cat([torch.nn.functional.cross_entropy(logits[s : s + _CE_ROWS], target[s : s + _CE_ROWS],
                                                               reduction="none")
                             for s in range(0, len(target), _CE_ROWS)]).cpu().numpy()
            top = (logits.argmax(dim=-1) == target).cpu().numpy() if greedy else None
            k = 0
            for i in idx:
                c = ends[i] - starts[i]
                lps[i] = lp[k : k + c].astype(float)
                if top is not None:
                    tops[i] = top[k : k + c]
                k += c
    return Scores(lps, tops)
