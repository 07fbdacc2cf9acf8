"""Perplexity of running text with a sliding window (the Hugging Face "perplexity of fixed-length
models" recipe; Radford et al. 2019 evaluate GPT-2 on WikiText the same way).

The text is tokenised as one stream (with the model's BOS first when it prepends one). Windows of
``window`` tokens end every ``stride`` tokens; each window scores only the tokens the previous
window did not, so every token is scored once, with at least ``window − stride`` tokens of context
(except in the first window). ``perplexity = exp(total NLL / scored tokens)``. The CI resamples windows
(a block bootstrap: neighbouring tokens are not independent).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from biaslens.errors import BiasLensError
from biaslens.evaluate.scoring import score_rows, token_rows
from biaslens.stats import SEED, bootstrap_ci, result

if TYPE_CHECKING:
    from biaslens.model import BiasModel

__all__ = ["read_text", "context_length", "window_rows", "perplexity"]


def read_text(text_or_path: str | os.PathLike) -> tuple[str, str]:
    """``(text, source)``: a ``Path`` (or a one-line string naming an existing file) is read as
    UTF-8; any other string is the text itself."""
    if isinstance(text_or_path, os.PathLike) or _names_file(text_or_path):
        p = Path(text_or_path).expanduser()
        if not p.is_file():
            raise BiasLensError(f"text file '{p}' does not exist; pass an existing text file")
        try:
            return p.read_text(encoding="utf-8"), str(p)
        except UnicodeDecodeError as exc:
            raise BiasLensError(f"text file '{p}' is not UTF-8 text ({exc}); pass a plain text file") from None
    return str(text_or_path), "<string>"


def _names_file(s: str) -> bool:
    if "\n" in s or len(s) > 1024:
        return False
    try:
        return Path(s).expanduser().is_file()
    except OSError:  # a name too long for the file system is text, not a path
        return False


def context_length(model: "BiasModel", cap: int = 1024) -> int:
    """The model's maximum positions (:attr:`BiasModel.max_positions`), capped."""
    return int(min(model.max_positions or cap, cap))


def window_rows(ids: list[int], window: int, stride: int) -> tuple[list[list[int]], list[int]]:
    """Windows over ``ids`` and, for each, the first position it scores (see module docstring).

    The first window scores its tokens 1..window−1; each later window ends ``stride`` tokens
    further and scores those ``stride`` new tokens with ``window − stride`` tokens of context.
    """
    if not 1 <= stride < window:
        raise BiasLensError(f"stride must be at least 1 and less than the window ({window}), not {stride}")
    first = ids[:window]
    rows, starts, done = [first], [1], len(first)
    while done < len(ids):
        end = min(done + stride, len(ids))
        begin = max(0, end - window)
        rows.append(ids[begin:end])
        starts.append(done - begin)
        done = end
    return rows, starts


def perplexity(model: "BiasModel", text_or_path: str | os.PathLike, max_tokens: int | None = None,
               window: int | None = None, stride: int | None = None, per_line: bool = False,
               batch_size: int = 64, token_budget: int = 4096, seed: int = SEED) -> dict:
    """Sliding-window perplexity of a text (or text file); reports ``window`` and ``stride``.

    ``window`` defaults to the model's context (at most 1024), ``stride`` to half the window;
    ``max_tokens`` keeps only the first tokens. ``per_line=True`` scores every non-empty line as
    its own document (BOS first, windows within the line; the newline is not scored): the layout
    of a corpus of one document a line, such as the organism's general text. Batches hold at
    most ``batch_size`` windows and ``token_budget`` tokens (the logits of a batch are
    ``token_budget × vocab`` floats).
    """
    text, source = read_text(text_or_path)
    if not text.strip():
        raise BiasLensError(f"no text to score in {source}; give a non-empty text")
    window = window or context_length(model)
    if model.max_positions is not None and window > model.max_positions:
        raise BiasLensError(f"window {window} is longer than the {model.max_positions} positions "
                            f"{model.spec} can read; pass a window of at most {model.max_positions}")
    stride = stride or max(1, window // 2)
    docs = [ln for ln in text.splitlines() if ln.strip()] if per_line else [text]
    rows, starts, budget = [], [], max_tokens
    for ids in token_rows(model, docs, length="any"):  # windowed below
        if budget is not None:
            ids = ids[: int(budget) + (1 if model.prepend_bos else 0)]
        if len(ids) < 2:
            continue
        r, s0 = window_rows(ids, window, stride)
        rows += r
        starts += s0
        if budget is not None:
            budget -= sum(len(x) - a for x, a in zip(r, s0))
            if budget <= 0:
                break
    if not rows:
        raise BiasLensError(f"the text in {source} is too short to score; give a longer text")
    s = score_rows(model, rows, starts, batch_size=batch_size, desc="perplexity",
                   token_budget=token_budget)
    nll, count = -s.sums(), s.counts().astype(float)
    n_tokens = int(count.sum())

    def ppl(a, c):
        return np.exp(a.sum(-1) / c.sum(-1))

    unit = "one document a line (BOS first)" if per_line else "one stream"
    return result(
        {"perplexity": float(ppl(nll, count)), "mean_nll": nll.sum() / n_tokens}, n_tokens,
        {"perplexity": bootstrap_ci(ppl, nll, count, seed=seed, vectorized=True),
         "mean_nll": bootstrap_ci(lambda a, c: a.sum(-1) / c.sum(-1), nll, count, seed=seed,
                                  vectorized=True)},
        n_tokens=n_tokens, n_windows=len(rows), window=window, stride=stride, per_line=per_line,
        source=source,
        scoring=f"text as {unit}; sliding window of {window} tokens, stride {stride}; each token "
                "scored once; CI resamples windows",
    )
