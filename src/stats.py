"""Bootstrap confidence intervals, correlation and the result record, for locate and evaluate.

Every number biaslens reports comes with the count of items it is over and a percentile bootstrap
confidence interval (Efron & Tibshirani 1993, §13.3): resample the items with replacement
``n_boot`` times with a fixed seed, recompute the statistic, and take the (α/2, 1−α/2)
percentiles. Resampling is over the items (prompts, sentence pairs, occupations, text windows),
as stated by each metric; :func:`bootstrap_mean_ci` does the same, NaN-aware, for every cell of
an effect map at once (docs/methods/tracing.md, docs/methods/evaluation.md). Non-finite numbers
become ``null`` when written (:func:`biaslens.jsonio.clean`, the one JSON-safe conversion).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["SEED", "N_BOOT", "LEVEL", "bootstrap_ci", "bootstrap_mean_ci", "mean_ci", "percent_ci",
           "pearson", "pearson_rows", "result", "quiet_nan_warnings"]

SEED = 0
N_BOOT = 1000
LEVEL = 0.95


def bootstrap_ci(
    stat: Callable[..., float],
    *arrays: Sequence[float] | np.ndarray,
    n_boot: int = N_BOOT,
    seed: int = SEED,
    level: float = LEVEL,
    vectorized: bool = False,
) -> list[float]:
    """Percentile bootstrap ``[low, high]`` of ``stat(*arrays)``, resampling rows jointly.

    ``arrays`` are aligned per item (e.g. a model score and a reference for a correlation).
    ``vectorized=True``: ``stat`` takes ``[n_boot, n]`` resampled arrays and returns ``[n_boot]``
    (one call instead of ``n_boot``).
    With fewer than two items, or a statistic that is undefined on every resample, the interval
    is ``[nan, nan]``.
    """
    arrs = [np.asarray(a, dtype=float) for a in arrays]
    n = len(arrs[0]) if arrs else 0
    if any(len(a) != n for a in arrs):
        raise ValueError("bootstrap_ci: the arrays must have one row per item")
    if n < 2:
        return [math.nan, math.nan]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    if stat is np.mean and len(arrs) == 1:  # the common case, vectorised
        vals = arrs[0][idx].mean(axis=1)
    elif vectorized:
        with np.errstate(all="ignore"):
            vals = np.asarray(stat(*(a[idx] for a in arrs)), dtype=float)
    else:
        with np.errstate(all="ignore"):
            vals = np.array([stat(*(a[i] for a in arrs)) for i in idx], dtype=float)
    vals = vals[np.isfinite(vals)]
    if len(vals) == 0:
        return [math.nan, math.nan]
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(vals, [a, 1.0 - a])
    return [float(lo), float(hi)]


def mean_ci(values: Sequence[float] | np.ndarray, **kw) -> list[float]:
    """Bootstrap CI of a mean."""
    return bootstrap_ci(np.mean, values, **kw)


def percent_ci(flags: Sequence[float] | np.ndarray, **kw) -> list[float]:
    """Bootstrap CI of a percentage of items (flags in {0, 1}, or 0.5 for a counted tie)."""
    lo, hi = bootstrap_ci(np.mean, flags, **kw)
    return [100.0 * lo, 100.0 * hi]


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant or there are fewer than 2 items."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2:
        return math.nan
    return float(pearson_rows(x[None], y[None])[0])


def pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair of ``[k, n]`` arrays (NaN where a row is constant)."""
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    den = np.sqrt((xc * xc).sum(-1) * (yc * yc).sum(-1))
    with np.errstate(all="ignore"):
        return np.where(den > 0, (xc * yc).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def result(values: dict[str, float], n: int, ci: dict[str, list[float]], **meta: Any) -> dict:
    """The record of one benchmark: ``{metric: value, ..., "n": items, "ci": {metric: [lo, hi]},
    **meta}`` (meta: how it was scored, sub-counts, per-group breakdowns)."""
    out: dict[str, Any] = {k: float(v) for k, v in values.items()}
    out["n"] = int(n)
    out["ci"] = {k: [float(a), float(b)] for k, (a, b) in ci.items()}
    out.update(meta)
    return out


def bootstrap_mean_ci(
    values: np.ndarray, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NaN-aware mean over axis 0 and a percentile bootstrap CI, resampling prompts (axis 0).

    ``values``: ``[n_prompts, ...]``. Returns ``(mean, low, high)`` of shape ``values.shape[1:]``.
    """
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    with np.errstate(all="ignore"), quiet_nan_warnings():
        mean = np.nanmean(values, axis=0)
        if n < 2:
            return mean, mean.copy(), mean.copy()
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, n, size=(n_boot, n))
        boots = np.stack([np.nanmean(values[i], axis=0) for i in idx])
        low = np.nanpercentile(boots, 100 * alpha / 2, axis=0)
        high = np.nanpercentile(boots, 100 * (1 - alpha / 2), axis=0)
    return mean, low, high


class quiet_nan_warnings:
    """Silence numpy's 'mean of empty slice' warnings (an all-NaN role is a legitimate NaN)."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)
